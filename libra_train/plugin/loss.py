"""Causal-LM loss of a compressed sequence, from the original labels through the position map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

IGNORE_INDEX = -100


def shift_labels_through_map(labels: torch.Tensor, position_map: torch.Tensor) -> torch.Tensor:
    """Next-token targets ``[B, L']`` for a compressed sequence.

    A surviving token at original position ``o`` predicts what position ``o`` predicted in the full sequence,
    ``labels[o + 1]``; compensation tokens and padding (``position_map == -1``) predict nothing. Answer tokens
    are text and are never compressed, so every supervised label keeps its predictor.

    Args:
        labels: ``[B, L]`` original labels (``-100`` = not trained on), aligned with the input ids.
        position_map: ``[B, L']`` original position of each compressed position, ``-1`` for none.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, L]: target predicted at each position
    target = shifted.gather(1, position_map.clamp_min(0))
    return target.masked_fill(position_map < 0, IGNORE_INDEX)


def libra_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position_map: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss (same reduction, same ``num_items_in_batch`` rule) on compressed logits.

    Args:
        logits: ``[B, L', V]`` logits of the compressed sequence.
        labels: ``[B, L]`` original labels.
        position_map: ``[B, L']`` as returned in the model output (``libra_position_map``).
        num_items_in_batch: supervised tokens of the whole (accumulated) batch for a sum-then-divide loss.
    """
    return ForCausalLMLoss(
        logits,
        None,
        vocab_size=logits.shape[-1],
        num_items_in_batch=num_items_in_batch,
        shift_labels=shift_labels_through_map(labels, position_map),
    )
