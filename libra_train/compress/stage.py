"""One compression point applied to whole padded sequences: the plan of one stage.

The language model's sequence holds text and visual tokens (possibly several non-contiguous visual runs per
sample) and padding. A stage gathers each sample's visual tokens, compresses them with
:func:`compress_visual_tokens_batched`, and lays the sequence out again:

    [text ..., merged targets (at their original places), compensation token, text ...]

The compensation token goes right after the sample's last visual token and takes that token's position (its
RoPE phase); merged targets keep their target's position. Samples are re-padded to the new batch maximum on
the side the input was padded on (left padding keeps every sample's last token at the end, which generation
needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_train.compress.batched import compress_visual_tokens_batched
from libra_train.compress.types import BatchCompressionResult


@dataclass
class StagePlan:
    """The compressed sequence and how it maps to the sequence it came from.

    Attributes:
        hidden: ``[B, L', D]`` compressed hidden states (padding rows are zeros).
        valid: ``[B, L']`` bool, the new 2-D padding mask.
        source: ``[B, L']`` index into the old sequence whose position (RoPE phase) each new token takes:
            a kept token's own index, the last visual index for a compensation token, 0 for padding.
        kept: ``[B, L']`` bool, an old token carried over (text or merged target); False for compensation
            tokens and padding.
        visual: ``[B, L']`` bool, merged targets: the visual span the next point compresses (compensation
            tokens are carried, never compressed again).
        dest: ``[B, L]`` new index of every old token, -1 where it was merged away, dropped or padding.
        result: the visual-token compression itself.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    source: torch.Tensor
    kept: torch.Tensor
    visual: torch.Tensor
    dest: torch.Tensor
    result: BatchCompressionResult

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


def gather_visual(visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sample's visual tokens, in order, front-packed: ``([B, N], [B, N] prefix mask)``."""
    n = visual.sum(1)
    width = int(n.max()) if visual.numel() else 0
    order = torch.sort((~visual).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # visual first
    return order, torch.arange(width, device=visual.device) < n[:, None]


def compress_sequence(
    hidden: torch.Tensor,
    visual: torch.Tensor,
    valid: torch.Tensor,
    alpha: torch.Tensor,
    ratio: float,
    *,
    select: str = "interval",
    merge: str = "igm",
    theta: float = 0.7,
    lam: float = 1.0,
    pad_left: bool = False,
) -> StagePlan:
    """Compress the visual tokens of padded sequences and lay the sequences out again.

    Args:
        hidden: ``[B, L, D]`` hidden states entering the next layer.
        visual: ``[B, L]`` bool, the visual span (may be empty for text-only samples).
        valid: ``[B, L]`` bool, real tokens (the 2-D attention mask).
        alpha: ``[B, L]`` importance of every position (only visual positions are read).
        ratio, select, merge, theta, lam: see :func:`libra_train.compress.compress_visual_tokens`.
        pad_left: pad the new sequences on the left (else on the right).

    Returns:
        A :class:`StagePlan`.
    """
    bsz, length, dim = hidden.shape
    device = hidden.device
    pos = torch.arange(length, device=device)
    visual = visual & valid
    vis_pos, vis_mask = gather_visual(visual)  # [B, N]
    x = hidden.gather(1, vis_pos[..., None].expand(-1, -1, dim))
    result = compress_visual_tokens_batched(
        x, alpha.gather(1, vis_pos), vis_mask, ratio, select=select, merge=merge, theta=theta, lam=lam
    )

    with torch.no_grad():
        # Old positions of the targets, and each target's output slot, scattered into [B, L] (+1 spare column
        # so that padded target entries land nowhere).
        t_pos = vis_pos.gather(1, result.target_index).masked_fill(~result.target_mask, length)  # [B, T]
        slots = torch.arange(t_pos.shape[1], device=device).expand_as(t_pos)
        is_target = torch.zeros((bsz, length + 1), dtype=torch.bool, device=device).scatter(1, t_pos, True)
        slot_of = torch.zeros((bsz, length + 1), dtype=torch.long, device=device).scatter(1, t_pos, slots)
        is_target, slot_of = is_target[:, :length], slot_of[:, :length]
        keep = valid & (~visual | is_target)  # [B, L]

        n_vis = vis_mask.sum(1)
        if vis_pos.shape[1]:
            last_vis = vis_pos.gather(1, (n_vis - 1).clamp_min(0)[:, None]).squeeze(1)  # [B]
        else:  # no visual token in the whole batch
            last_vis = torch.full((bsz,), -1, dtype=torch.long, device=device)
        has_comp = result.has_compensation
        after_comp = has_comp[:, None] & (pos > last_vis[:, None])  # tokens shifted by the compensation token
        count = keep.sum(1) + has_comp.long()
        new_len = int(count.max())
        offset = (new_len - count) if pad_left else torch.zeros_like(count)
        dest = offset[:, None] + keep.long().cumsum(1) - 1 + after_comp.long()
        dest = dest.masked_fill(~keep, -1)  # [B, L]
        comp_dest = offset + (keep & (pos <= last_vis[:, None])).sum(1)  # [B]

        # Row index of every new token into bank = [hidden rows (B*L); merged rows (B*M); one zero row].
        m = result.tokens.shape[1]
        b_idx = torch.arange(bsz, device=device)[:, None]
        merged_row = bsz * length + b_idx * m
        row = torch.where(is_target, merged_row + slot_of, b_idx * length + pos)  # [B, L]
        zero_row = bsz * length + bsz * m
        spare = new_len  # extra column for tokens that are not kept
        where = dest.masked_fill(~keep, spare)
        rows = torch.full((bsz, new_len + 1), zero_row, dtype=torch.long, device=device)
        rows = rows.scatter(1, where, row)
        source = torch.zeros((bsz, new_len + 1), dtype=torch.long, device=device).scatter(
            1, where, pos.expand_as(where)
        )
        kept = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(1, where, True)
        new_visual = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(
            1, where, is_target
        )
        comp_where = comp_dest.masked_fill(~has_comp, spare)[:, None]
        rows = rows.scatter(1, comp_where, (merged_row[:, 0] + result.num_targets)[:, None])
        source = source.scatter(1, comp_where, last_vis[:, None])
        rows, source, kept, new_visual = (
            rows[:, :new_len],
            source[:, :new_len],
            kept[:, :new_len],
            new_visual[:, :new_len],
        )
        new_valid = kept | (torch.arange(new_len + 1, device=device) == comp_where)[:, :new_len]

    bank = torch.cat([hidden.reshape(-1, dim), result.tokens.reshape(-1, dim), hidden.new_zeros(1, dim)])
    return StagePlan(
        hidden=bank[rows],
        valid=new_valid,
        source=source,
        kept=kept,
        visual=new_visual & kept,
        dest=dest,
        result=result,
    )
