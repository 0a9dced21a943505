"""Libra-Merging as pure tensor code (torch only, no transformers).

Shape notation: ``B`` batch, ``N`` visual tokens of a sample (padded to the batch maximum), ``D`` channels,
``T`` targets (padded to the batch maximum), ``M`` output tokens (targets + compensation token).

- :func:`compress_visual_tokens`: one sample, written to read like the spec (shared/DESIGN.md section 1).
- :func:`compress_visual_tokens_batched`: a padded batch, vectorised; equal to the single-sample form per sample.
- :func:`token_schedule`: token counts per layer for a hierarchical schedule.
"""

from libra_train.compress.batched import compress_visual_tokens_batched
from libra_train.compress.schedule import num_targets, token_schedule
from libra_train.compress.single import compress_visual_tokens
from libra_train.compress.types import (
    MERGE_METHODS,
    SELECT_METHODS,
    BatchCompressionResult,
    CompressionResult,
)

__all__ = [
    "MERGE_METHODS",
    "SELECT_METHODS",
    "BatchCompressionResult",
    "CompressionResult",
    "compress_visual_tokens",
    "compress_visual_tokens_batched",
    "num_targets",
    "token_schedule",
]
