"""Adapters for training frameworks: plain PyTorch, PyTorch Lightning, Hugging Face ``Trainer``.

Import the one you use; this package imports none of them, so ``lightning`` and ``transformers`` stay optional.

- :mod:`trainer.integrations.pytorch`: ``StagewatchHook``, a hook on ``optimizer.step()`` for a loop of your own.
- :mod:`trainer.integrations.lightning`: ``StagewatchCallback`` (``pip install 'stagewatch[lightning]'``).
- :mod:`trainer.integrations.huggingface`: ``StagewatchCallback`` (``pip install 'stagewatch[huggingface]'``).

Each one logs at ``step`` = optimizer steps done and applies the server's commands through
:class:`trainer.torch.CommandApplier` at the step boundary, on every rank (pass the run on rank 0, ``None`` on the
others); the commands it applied go into the framework's checkpoints.
"""

__all__: list[str] = []
