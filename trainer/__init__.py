"""Stagewatch's training side: what a training job imports.

It never imports the server: the contract between the two is the HTTP/WebSocket protocol, not shared code.
Today it holds reference recipes (model + data + loop) in :mod:`trainer.recipes`; the worker client that
streams metrics and applies decay commands will live here too.
"""
