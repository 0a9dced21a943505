"""One compression point applied to whole padded sequences: the plan of one stage.

The language model's sequence holds text and visual tokens (possibly several non-contiguous visual runs per
sample) and padding. A stage gathers each sample's visual tokens, compresses them with
:func:`compress_visual_tokens_batched`, and lays the sequence out again:

    [text ..., merged targets (at their original places), compensation token, text ...]

The compensation token goes right after the sample's last visual token and takes that token's position (its
RoPE phase); merged targets keep their target's position. Samples are re-padded to the new batch maximum on
the side the input was padded on (left padding keeps every sample's last token at the end, which generation
needs).

Reserved compensation slots. Whether a point makes a compensation token depends on the data (some merged-away
token below theta), but every shape must be known on the host without reading the device. So a sample that
loses tokens at a point with a compensating merge (``igm``, ``igm_neg``) always gets the slot; an unused slot is
an *invalid* position (a hole: zero hidden state, masked out as padding is, position map -1). The row layout is
therefore tracked by two masks: ``occupied`` (real tokens and holes: what the layout moves) and ``valid`` (real
tokens: what attention sees). Holes are carried like tokens, so the host's :class:`HostLayout` stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_train.compress.batched import COMPENSATING_MERGES, compress_visual_tokens_batched
from libra_train.compress.schedule import num_targets
from libra_train.compress.types import BatchCompressionResult, to_host


@dataclass(frozen=True)
class HostLayout:
    """The host's copy of one stage's per-sample counts: enough for every shape, with no device read.

    Attributes:
        visual: visual tokens of each sample (the span the next point compresses).
        occupied: row length of each sample: real tokens plus reserved compensation slots (holes included).
    """

    visual: tuple[int, ...]
    occupied: tuple[int, ...]

    @classmethod
    def read(cls, visual: torch.Tensor, occupied: torch.Tensor) -> HostLayout:
        """Read the counts from the device (one host read), for callers that do not track them."""
        n_visual, n_occupied = to_host(torch.stack([visual.sum(1), occupied.sum(1)]))
        return cls(tuple(n_visual), tuple(n_occupied))

    def reserves(self, ratio: float, merge: str) -> list[bool]:
        """Per sample: does this point reserve a compensation slot (it removes tokens, the merge compensates)?"""
        return [merge in COMPENSATING_MERGES and num_targets(n, ratio) < n for n in self.visual]

    def after(self, ratio: float, merge: str) -> HostLayout:
        """The layout after a point that keeps ``num_targets(n, ratio)`` of each sample's ``n`` visual tokens."""
        kept = [num_targets(n, ratio) for n in self.visual]
        reserved = self.reserves(ratio, merge)
        return HostLayout(
            tuple(kept),
            tuple(o - n + k + r for o, n, k, r in zip(self.occupied, self.visual, kept, reserved)),
        )


@dataclass
class StagePlan:
    """The compressed sequence and how it maps to the sequence it came from.

    Attributes:
        hidden: ``[B, L', D]`` compressed hidden states (padding rows and unused compensation slots are zeros).
        valid: ``[B, L']`` bool, the new 2-D padding mask (False at padding and at unused compensation slots).
        occupied: ``[B, L']`` bool, the new row layout: real tokens and reserved compensation slots.
        source: ``[B, L']`` index into the old sequence whose position (RoPE phase) each new token takes:
            a carried token's own index, the last visual index for a compensation slot, 0 for padding.
        kept: ``[B, L']`` bool, an old row carried over (text, merged target, or an earlier unused slot); False
            for this point's compensation slot and padding.
        visual: ``[B, L']`` bool, merged targets: the visual span the next point compresses (compensation
            tokens are carried, never compressed again).
        dest: ``[B, L]`` new index of every old row, -1 where it was merged away, dropped or padding.
        layout: the host's counts of the new sequence.
        result: the visual-token compression itself.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    occupied: torch.Tensor
    source: torch.Tensor
    kept: torch.Tensor
    visual: torch.Tensor
    dest: torch.Tensor
    layout: HostLayout
    result: BatchCompressionResult

    @property
    def length(self) -> int:
        return self.hidden.shape[1]


def gather_visual(visual: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sample's visual tokens, in order, front-packed: ``([B, N], [B, N] prefix mask)``.

    ``width`` is the most visual tokens of a sample, if the caller knows it (else it is read from the device).
    """
    n = visual.sum(1)
    if width is None:
        width = max(to_host(n)) if visual.numel() else 0
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
    occupied: torch.Tensor | None = None,
    layout: HostLayout | None = None,
) -> StagePlan:
    """Compress the visual tokens of padded sequences and lay the sequences out again.

    Args:
        hidden: ``[B, L, D]`` hidden states entering the next layer.
        visual: ``[B, L]`` bool, the visual span (may be empty for text-only samples).
        valid: ``[B, L]`` bool, real tokens (the 2-D attention mask).
        alpha: ``[B, L]`` importance of every position (only visual positions are read).
        ratio, select, merge, theta, lam: see :func:`libra_train.compress.compress_visual_tokens`.
        pad_left: pad the new sequences on the left (else on the right).
        occupied: ``[B, L]`` bool, the row layout (real tokens and unused compensation slots of earlier
            points); default ``valid``.
        layout: the host's counts for ``visual & valid`` and ``occupied``; read from the device if not given.

    Returns:
        A :class:`StagePlan`.
    """
    bsz, length, dim = hidden.shape
    device = hidden.device
    pos = torch.arange(length, device=device)
    visual = visual & valid
    occupied = valid if occupied is None else occupied
    layout = HostLayout.read(visual, occupied) if layout is None else layout
    vis_pos, vis_mask = gather_visual(visual, max(layout.visual, default=0))  # [B, N]
    x = hidden.gather(1, vis_pos[..., None].expand(-1, -1, dim))
    result = compress_visual_tokens_batched(
        x,
        alpha.gather(1, vis_pos),
        vis_mask,
        ratio,
        select=select,
        merge=merge,
        theta=theta,
        lam=lam,
        counts=layout.visual,
    )
    new_layout = layout.after(ratio, merge)
    new_len = max(new_layout.occupied, default=0)

    with torch.no_grad():
        # Old positions of the targets, and each target's output slot, scattered into [B, L] (+1 spare column
        # so that padded target entries land nowhere).
        t_pos = vis_pos.gather(1, result.target_index).masked_fill(~result.target_mask, length)  # [B, T]
        slots = torch.arange(t_pos.shape[1], device=device).expand_as(t_pos)
        is_target = torch.zeros((bsz, length + 1), dtype=torch.bool, device=device).scatter(1, t_pos, True)
        slot_of = torch.zeros((bsz, length + 1), dtype=torch.long, device=device).scatter(1, t_pos, slots)
        is_target, slot_of = is_target[:, :length], slot_of[:, :length]
        keep = occupied & (~visual | is_target)  # [B, L]

        n_vis = vis_mask.sum(1)
        if vis_pos.shape[1]:
            last_vis = vis_pos.gather(1, (n_vis - 1).clamp_min(0)[:, None]).squeeze(1)  # [B]
        else:  # no visual token in the whole batch
            last_vis = torch.full((bsz,), -1, dtype=torch.long, device=device)
        # The device's copy of `layout.reserves`: a slot wherever tokens were removed by a compensating merge.
        reserve = (result.num_targets < n_vis) & (merge in COMPENSATING_MERGES)  # [B]
        has_comp = result.has_compensation
        after_comp = reserve[:, None] & (pos > last_vis[:, None])  # tokens shifted by the compensation slot
        count = keep.sum(1) + reserve.long()
        offset = (new_len - count) if pad_left else torch.zeros_like(count)
        dest = offset[:, None] + keep.long().cumsum(1) - 1 + after_comp.long()
        dest = dest.masked_fill(~keep, -1)  # [B, L]
        comp_dest = offset + (keep & (pos <= last_vis[:, None])).sum(1)  # [B]

        # Row index of every new token into bank = [hidden rows (B*L); merged rows (B*M); one zero row].
        m = result.tokens.shape[1]
        b_idx = torch.arange(bsz, device=device)[:, None]
        merged_row = bsz * length + b_idx * m
        zero_row = bsz * length + bsz * m
        row = torch.where(is_target, merged_row + slot_of, b_idx * length + pos)  # [B, L]
        row = torch.where(valid, row, zero_row)  # unused slots of earlier points stay zero
        spare = new_len  # extra column for tokens that are not kept
        where = dest.masked_fill(~keep, spare)
        rows = torch.full((bsz, new_len + 1), zero_row, dtype=torch.long, device=device)
        rows = rows.scatter(1, where, row)
        source = torch.zeros((bsz, new_len + 1), dtype=torch.long, device=device).scatter(
            1, where, pos.expand_as(where)
        )
        kept = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(1, where, True)
        real = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(1, where, valid)
        new_visual = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(
            1, where, is_target
        )
        comp_where = comp_dest.masked_fill(~reserve, spare)[:, None]
        comp_row = torch.where(has_comp, merged_row[:, 0] + result.num_targets, zero_row)
        rows = rows.scatter(1, comp_where, comp_row[:, None])
        source = source.scatter(1, comp_where, last_vis.clamp_min(0)[:, None])
        slot = (torch.arange(new_len + 1, device=device) == comp_where)[
            :, :new_len
        ]  # [B, L'] the reserved slot
        rows, source, kept, real, new_visual = (
            t[:, :new_len] for t in (rows, source, kept, real, new_visual)
        )
        new_valid = real | (slot & has_comp[:, None])
        new_occupied = kept | slot

    bank = torch.cat([hidden.reshape(-1, dim), result.tokens.reshape(-1, dim), hidden.new_zeros(1, dim)])
    return StagePlan(
        hidden=bank[rows],
        valid=new_valid,
        occupied=new_occupied,
        source=source,
        kept=kept,
        visual=new_visual & kept,
        dest=dest,
        layout=new_layout,
        result=result,
    )
