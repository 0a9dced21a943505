"""The training loop over DeepSpeed: set-up, loss step, checkpoints and resume, logging, evaluation.

``train.py`` (repository root) drives it top to bottom; the modules are small and usable on their own:

* `dist`: launcher variables, process group, collectives;
* `setup`: build the model, choose what trains, Libra, LoRA, gradient checkpointing;
* `batches`: demo data, datasets, the sharded resumable loader;
* `optim`: AdamW param groups and the warm-up + decay schedule;
* `loop`: the loss step and the step loop;
* `evaluate`: held-out loss and short-answer accuracy;
* `checkpoint`: atomic save, resume, and `load_trained_model` (a consolidated model for inference);
* `output_dir`: the run's folder: lock, kill-safe replace / delete of checkpoints, clean-up, disk space;
* `resume`: what a resume may change (recipe diff, structure), the restored lr schedule;
* `supervise`: errors on any rank end every rank; SIGTERM / Ctrl-C stop at a step boundary;
* `faults`: test-only fault points (``LIBRA_TRAIN_FAULT``);
* `metrics`: JSONL, progress bar, wandb, TensorBoard.

Submodules are imported on first use (``import libra_train.training`` stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"load_trained_model": "libra_train.training.checkpoint"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'libra_train.training' has no attribute {name!r}")
