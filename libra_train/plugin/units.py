"""Compression units: which visual tokens of a sample are compressed together (``LibraConfig.unit``).

``sample``: all of a sample's visual tokens are one span (one set of intervals, one compensation token after the
last image). ``image``: each image (or video) is its own span, with its own intervals, targets, temperature and
compensation token at its end; ``frame``: each video frame too. With the paper's single image per sample the
three are the same compression.

Units are derived from the visual mask of the forward: each maximal run of visual positions is one image (the
families put text or a separator token between images: LLaVA's ``"\\n"`` after each ``<image>``, Qwen-VL's
vision start/end tokens). ``visual_span(mask, units=...)`` gives them explicitly. The family defaults
(:func:`default_unit`) are chosen so that the paper's single-image setting is unchanged and several images (or
frames) never share intervals or a compensation token.
"""

from __future__ import annotations

import torch
from torch import nn

UNIT_DEFAULTS = {  # model_type -> unit; every other model: "image"
    "qwen2_vl": "frame",
    "qwen2_5_vl": "frame",
    "qwen3_vl": "frame",
    "llava_onevision": "frame",
}


def default_unit(model: nn.Module) -> str:
    """The unit a model family compresses by when ``LibraConfig.unit`` is None."""
    return UNIT_DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None), "image")


def run_units(visual: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` long: the index of the visual run each visual position belongs to (``0, 1, ...`` per sample),
    -1 at other positions."""
    previous = torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    starts = visual & ~previous
    return (starts.long().cumsum(1) - 1).masked_fill(~visual, -1)
