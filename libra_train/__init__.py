"""libra-train: fine-tune LLaVA-style models with Libra-Merging visual-token compression inside the LLM.

The public names are imported lazily so that ``import libra_train.compress`` (pure torch) stays light and
does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LibraConfig": "libra_train.plugin",
    "apply_libra": "libra_train.plugin",
    "remove_libra": "libra_train.plugin",
    "visual_span": "libra_train.plugin",
    "libra_labels": "libra_train.plugin",
    "libra_causal_lm_loss": "libra_train.plugin",
    "load": "libra_train.infer",
    "export_checkpoint": "libra_train.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'libra_train' has no attribute {name!r}")
