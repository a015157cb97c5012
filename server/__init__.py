"""Stagewatch service: storage, REST API and (later) live stage detection for training runs."""

__version__ = "0.1.0"
