"""Batching: right-pad the per-token tensors, concatenate the per-image (and per-video) ones.

LLaVA-style models take the visual inputs of a batch as one stack of images and scatter their features into
the positions of the image tokens, in order, so a batch may mix image and text-only samples: ``pixel_values``
holds the images of the image samples only, in sample order, and is absent when no sample has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from libra_train.data.encode import IGNORE_INDEX

# Per-token keys and their padding values (the pad id of input_ids is an argument).
TOKEN_PAD = {"labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad trailing dims of `t` up to `shape` (LLaVA-NeXT: images with fewer tiles than the batch's most)."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


def collate(
    batch: Sequence[dict[str, torch.Tensor]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Stack samples from `SupervisedDataset` into a batch.

    Args:
        batch: samples with ``input_ids[L_i]``, ``labels[L_i]``, ``attention_mask[L_i]`` and optionally
            per-image tensors (``pixel_values[n_img_i, ...]``, ``image_sizes``, ``image_grid_thw``, ...).
        pad_token_id: id used to pad input_ids (labels are padded with -100, attention_mask with 0).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor cores).
        padding_side: ``right`` (training) or ``left`` (generation prompts: every row ends at the last column).

    Returns:
        ``input_ids[B, L]``, ``labels[B, L]``, ``attention_mask[B, L]`` (padded on `padding_side`), each per-image
        key concatenated over the samples that have it: ``pixel_values[sum n_img_i, ...]``.
    """
    if not batch:
        raise ValueError("empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(s["input_ids"]) for s in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, torch.Tensor] = {}
    present = {k for s in batch for k in s}
    token_keys = {"input_ids": pad_token_id} | {k: v for k, v in TOKEN_PAD.items() if k in present}
    for key, value in token_keys.items():
        rows = [
            F.pad(
                s[key],
                (0, length - len(s[key])) if padding_side == "right" else (length - len(s[key]), 0),
                value=value,
            )
            if key in s
            else torch.full((length,), value, dtype=s["input_ids"].dtype)  # a key only some samples have
            for s in batch
        ]  # [L] each
        out[key] = torch.stack(rows)  # [B, L]
    image_keys = sorted(present - token_keys.keys())
    for key in image_keys:
        parts = [s[key] for s in batch if key in s]  # [n_img_i, ...] each
        if key == "pixel_values_videos" and parts[0].dim() == 5 and len({p.shape[1] for p in parts}) > 1:
            # [n_videos, frames, C, H, W] (LLaVA-OneVision): zero frames would be encoded as frames
            raise ValueError(
                f"videos with {sorted({p.shape[1] for p in parts})} frames in one batch: this model stacks a "
                "batch's videos, so every video needs the same number of frames; give the records the same "
                "number of frame files (or video files the processor samples to a fixed num_frames)"
            )
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        out[key] = torch.cat([_pad_to(p, [p.shape[0], *shape]) for p in parts])  # [sum n_img_i, ...]
    return out


@dataclass
class Collator:
    """`collate` as a picklable callable for `DataLoader(collate_fn=...)` (works with worker processes)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id, self.pad_to_multiple_of)
