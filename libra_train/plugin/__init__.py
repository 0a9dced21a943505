"""Libra-Merging inside transformers models: ``apply_libra(model, LibraConfig(...))``."""

from libra_train.plugin.apply import apply_libra, libra_runtime, remove_libra
from libra_train.plugin.config import LibraConfig
from libra_train.plugin.loss import libra_causal_lm_loss
from libra_train.plugin.state import libra_labels, visual_span

__all__ = [
    "LibraConfig",
    "apply_libra",
    "libra_causal_lm_loss",
    "libra_labels",
    "libra_runtime",
    "remove_libra",
    "visual_span",
]
