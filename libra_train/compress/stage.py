"""One compression point applied to whole padded sequences: the plan of one stage.

The language model's sequence holds text and visual tokens (possibly several non-contiguous visual runs per
sample) and padding. The visual tokens of a sample form one or more *compression units* (``units``: the whole
sample, or each image, or each video frame): each unit is compressed on its own, as one row of
:func:`compress_visual_tokens_batched` (its own intervals, targets, temperature and compensation token), and
the sequence is laid out again:

    [text ..., merged targets of unit 0, its compensation token, text ..., merged targets of unit 1, ...]

A unit's compensation token goes right after the unit's last visual token and takes that token's position
(its RoPE phase); merged targets keep their target's position. Samples are re-padded to the new batch maximum on
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
        units: visual tokens of each compression unit of each sample (``B`` tuples of the same length ``U``,
            zeros for the units a sample does not have): the spans the next point compresses.
        occupied: row length of each sample: real tokens plus reserved compensation slots (holes included).
    """

    units: tuple[tuple[int, ...], ...]
    occupied: tuple[int, ...]

    @property
    def visual(self) -> tuple[int, ...]:
        """Visual tokens of each sample."""
        return tuple(sum(u) for u in self.units)

    @property
    def num_units(self) -> int:
        return len(self.units[0]) if self.units else 1

    @classmethod
    def read(
        cls, visual: torch.Tensor, occupied: torch.Tensor, units: torch.Tensor | None = None
    ) -> HostLayout:
        """Read the counts from the device (one host read), for callers that do not track them."""
        n_units = 1 if units is None or not visual.any() else int(units.max()) + 1
        per_unit = unit_counts(visual, units, n_units)  # [B, U]
        counts, n_occupied = to_host(per_unit), to_host(occupied.sum(1))
        return cls(tuple(tuple(c) for c in counts), tuple(n_occupied))

    def reserves(self, ratio: float, merge: str) -> list[list[bool]]:
        """Per unit: does this point reserve a compensation slot (it removes tokens, the merge compensates)?"""
        compensates = merge in COMPENSATING_MERGES
        return [[compensates and num_targets(n, ratio) < n for n in units] for units in self.units]

    def after(self, ratio: float, merge: str) -> HostLayout:
        """The layout after a point that keeps ``num_targets(n, ratio)`` of each unit's ``n`` visual tokens."""
        kept = tuple(tuple(num_targets(n, ratio) for n in units) for units in self.units)
        reserved = self.reserves(ratio, merge)
        occupied = tuple(
            o - sum(units) + sum(k) + sum(r)
            for o, units, k, r in zip(self.occupied, self.units, kept, reserved)
        )
        return HostLayout(kept, occupied)


def unit_counts(visual: torch.Tensor, units: torch.Tensor | None, num_units: int) -> torch.Tensor:
    """``[B, U]`` visual tokens per unit (``units`` None: one unit per sample)."""
    if units is None:
        return visual.sum(1, keepdim=True)
    ids = units.clamp_min(0).masked_fill(~visual, num_units)  # non-visual positions count in a spare column
    counts = torch.zeros((visual.shape[0], num_units + 1), dtype=torch.long, device=visual.device)
    return counts.scatter_add(1, ids, torch.ones_like(ids))[:, :num_units]


@dataclass
class StagePlan:
    """The compressed sequence and how it maps to the sequence it came from.

    Attributes:
        hidden: ``[B, L', D]`` compressed hidden states (padding rows and unused compensation slots are zeros).
        valid: ``[B, L']`` bool, the new 2-D padding mask (False at padding and at unused compensation slots).
        occupied: ``[B, L']`` bool, the new row layout: real tokens and reserved compensation slots.
        source: ``[B, L']`` index into the old sequence whose position (RoPE phase) each new token takes:
            a carried token's own index, its unit's last visual index for a compensation slot, 0 for padding.
        kept: ``[B, L']`` bool, an old row carried over (text, merged target, or an earlier unused slot); False
            for this point's compensation slots and padding.
        visual: ``[B, L']`` bool, merged targets: the visual span the next point compresses (compensation
            tokens are carried, never compressed again).
        units: ``[B, L']`` long, the unit of each merged target (-1 elsewhere).
        dest: ``[B, L]`` new index of every old row, -1 where it was merged away, dropped or padding.
        layout: the host's counts of the new sequence.
        result: the visual-token compression itself, one row per (sample, unit): row ``b * U + u``.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    occupied: torch.Tensor
    source: torch.Tensor
    kept: torch.Tensor
    visual: torch.Tensor
    units: torch.Tensor
    dest: torch.Tensor
    layout: HostLayout
    result: BatchCompressionResult

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    @property
    def has_compensation(self) -> torch.Tensor:
        """``[B]`` compensation tokens this point made per sample (one per unit at most)."""
        return self.result.has_compensation.view(self.hidden.shape[0], -1).sum(1)

    @property
    def num_targets(self) -> torch.Tensor:
        """``[B]`` merged targets per sample."""
        return self.result.num_targets.view(self.hidden.shape[0], -1).sum(1)


def gather_units(
    visual: torch.Tensor, units: torch.Tensor | None, layout: HostLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each unit's visual tokens, in order, front-packed: ``([B, U, N], [B, U, N] prefix mask)``.

    Sorting by ``unit * L + position`` groups each sample's visual tokens by unit, in order; unit ``u`` then
    starts where the units before it end.
    """
    bsz, length = visual.shape
    device = visual.device
    n_units, width = layout.num_units, max((max(u) for u in layout.units), default=0)
    pos = torch.arange(length, device=device)
    unit = torch.zeros_like(pos).expand(bsz, length) if units is None else units.clamp_min(0)
    key = torch.where(visual, unit * length + pos, n_units * length + pos)
    order = torch.sort(key, dim=1, stable=True).indices  # [B, L] visual first, grouped by unit
    counts = unit_counts(visual, units, n_units)  # [B, U]
    starts = counts.cumsum(1) - counts  # [B, U]
    j = torch.arange(width, device=device)
    index = (starts[..., None] + j).clamp_max(max(length - 1, 0))  # [B, U, N]
    positions = order.gather(1, index.flatten(1)).view(bsz, n_units, width) if length else index
    return positions, j < counts[..., None]


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
    units: torch.Tensor | None = None,
    layout: HostLayout | None = None,
) -> StagePlan:
    """Compress the visual tokens of padded sequences, unit by unit, and lay the sequences out again.

    Args:
        hidden: ``[B, L, D]`` hidden states entering the next layer.
        visual: ``[B, L]`` bool, the visual span (may be empty for text-only samples).
        valid: ``[B, L]`` bool, real tokens (the 2-D attention mask).
        alpha: ``[B, L]`` importance of every position (only visual positions are read).
        ratio, select, merge, theta, lam: see :func:`libra_train.compress.compress_visual_tokens`.
        pad_left: pad the new sequences on the left (else on the right).
        occupied: ``[B, L]`` bool, the row layout (real tokens and unused compensation slots of earlier
            points); default ``valid``.
        units: ``[B, L]`` long, the compression unit of each visual position (``0..U-1`` within its sample,
            units in position order); None: one unit per sample.
        layout: the host's counts for ``visual & valid`` (per unit) and ``occupied``; read if not given.

    Returns:
        A :class:`StagePlan`.
    """
    bsz, length, dim = hidden.shape
    device = hidden.device
    pos = torch.arange(length, device=device)
    visual = visual & valid
    occupied = valid if occupied is None else occupied
    layout = HostLayout.read(visual, occupied, units) if layout is None else layout
    n_units = layout.num_units
    vis_pos, vis_mask = gather_units(visual, units, layout)  # [B, U, N]
    width = vis_pos.shape[2]
    flat_pos, flat_mask = vis_pos.view(bsz * n_units, width), vis_mask.view(bsz * n_units, width)
    rows_of = torch.arange(bsz, device=device).repeat_interleave(n_units)[:, None]  # [B*U, 1] sample of a row
    x = hidden[rows_of, flat_pos]  # [B*U, N, D]
    result = compress_visual_tokens_batched(
        x,
        alpha[rows_of, flat_pos],
        flat_mask,
        ratio,
        select=select,
        merge=merge,
        theta=theta,
        lam=lam,
        counts=[n for u in layout.units for n in u],
    )
    new_layout = layout.after(ratio, merge)
    new_len = max(new_layout.occupied, default=0)

    with torch.no_grad():
        m = result.tokens.shape[1]
        # Old positions of the targets and each target's row in the merged tokens (row b*U+u, slot t),
        # scattered into [B, L] (+1 spare column so that padded target entries land nowhere).
        t_pos = flat_pos.gather(1, result.target_index).masked_fill(~result.target_mask, length)  # [B*U, T]
        merged = torch.arange(bsz * n_units, device=device)[:, None] * m + torch.arange(
            t_pos.shape[1], device=device
        )
        t_pos, merged = t_pos.view(bsz, -1), merged.view(bsz, -1)  # [B, U*T]
        is_target = torch.zeros((bsz, length + 1), dtype=torch.bool, device=device).scatter(1, t_pos, True)
        merged_of = torch.zeros((bsz, length + 1), dtype=torch.long, device=device).scatter(1, t_pos, merged)
        is_target, merged_of = is_target[:, :length], merged_of[:, :length]
        keep = occupied & (~visual | is_target)  # [B, L]

        # Each unit's compensation slot, reserved wherever a compensating merge removed tokens (the device's
        # copy of `layout.reserves`), goes right after the unit's last visual token.
        n_vis = flat_mask.sum(1)  # [B*U]
        last = flat_pos.gather(1, (n_vis - 1).clamp_min(0)[:, None]).squeeze(1) if width else n_vis  # [B*U]
        reserve = (result.num_targets < n_vis) & (merge in COMPENSATING_MERGES)  # [B*U]
        has_comp = result.has_compensation & reserve
        last, reserve, has_comp = (
            last.view(bsz, n_units),
            reserve.view(bsz, n_units),
            has_comp.view(bsz, n_units),
        )
        slot_after = torch.zeros((bsz, length + 1), dtype=torch.long, device=device)
        slot_after = slot_after.scatter_add(1, last.masked_fill(~reserve, length), reserve.long())[:, :length]
        shift = slot_after.cumsum(1) - slot_after  # [B, L] slots inserted before each position
        count = keep.sum(1) + slot_after.sum(1)
        offset = (new_len - count) if pad_left else torch.zeros_like(count)
        kept_before = keep.long().cumsum(1)  # [B, L] kept rows up to and including each position
        dest = (offset[:, None] + kept_before - 1 + shift).masked_fill(~keep, -1)  # [B, L]
        comp_dest = offset[:, None] + kept_before.gather(1, last) + shift.gather(1, last)  # [B, U]

        # Row index of every new token into bank = [hidden rows (B*L); merged rows (B*U*M); one zero row].
        b_idx = torch.arange(bsz, device=device)[:, None]
        zero_row = bsz * length + bsz * n_units * m
        row = torch.where(is_target, bsz * length + merged_of, b_idx * length + pos)  # [B, L]
        row = torch.where(valid, row, zero_row)  # unused slots of earlier points stay zero
        spare = new_len  # extra column for rows that are not kept
        where = dest.masked_fill(~keep, spare)

        def scatter(fill, values, dtype=None):
            out = torch.full((bsz, new_len + 1), fill, dtype=dtype or values.dtype, device=device)
            return out.scatter(1, where, values)

        rows = scatter(zero_row, row)
        source = scatter(0, pos.expand_as(where))
        kept = scatter(False, torch.ones_like(keep))
        real = scatter(False, valid)
        new_visual = scatter(False, is_target)
        old_units = torch.zeros_like(pos).expand(bsz, length) if units is None else units
        new_units = scatter(-1, old_units.masked_fill(~is_target, -1))
        comp_where = comp_dest.masked_fill(~reserve, spare)  # [B, U]
        unit_rows = torch.arange(bsz * n_units, device=device).view(bsz, n_units) * m
        comp_row = torch.where(
            has_comp, bsz * length + unit_rows + result.num_targets.view(bsz, n_units), zero_row
        )
        rows = rows.scatter(1, comp_where, comp_row)
        source = source.scatter(1, comp_where, last)
        slot = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(
            1, comp_where, reserve
        )
        used = torch.zeros((bsz, new_len + 1), dtype=torch.bool, device=device).scatter(
            1, comp_where, has_comp
        )
        rows, source, kept, real, new_visual, new_units, slot, used = (
            t[:, :new_len] for t in (rows, source, kept, real, new_visual, new_units, slot, used)
        )

    bank = torch.cat([hidden.reshape(-1, dim), result.tokens.reshape(-1, dim), hidden.new_zeros(1, dim)])
    return StagePlan(
        hidden=bank[rows],
        valid=real | used,
        occupied=kept | slot,
        source=source,
        kept=kept,
        visual=new_visual & kept,
        units=new_units.masked_fill(~(new_visual & kept), -1),
        dest=dest,
        layout=new_layout,
        result=result,
    )
