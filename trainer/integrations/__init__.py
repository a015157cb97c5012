"""Adapters for training frameworks: plain PyTorch, PyTorch Lightning, Hugging Face ``Trainer``."""
