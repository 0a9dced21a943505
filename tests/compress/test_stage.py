"""One stage over padded sequences: the layout, compression units, reserved compensation slots, host counts.

Reference for a unit: the single-sample algorithm (``compress_visual_tokens``) on that unit's tokens alone.
"""

from __future__ import annotations

import pytest
import torch

from libra_train.compress import compress_visual_tokens
from libra_train.compress.stage import HostLayout, compress_sequence

D = 8


def _sequence(length: int, spans: list[tuple[int, int]], seed: int = 0):
    """hidden [L, D], visual [L], alpha [L] and units [L] for visual spans ``[start, end)`` (one unit each)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(length, D, generator=g)
    for start, end in spans:  # similar neighbours inside a span: positives and negatives both occur
        hidden[start + 1 : end : 2] = hidden[start : end - 1 : 2] + 0.3 * torch.randn(
            (end - start) // 2, D, generator=g
        )
    alpha = torch.rand(length, generator=g)
    visual = torch.zeros(length, dtype=torch.bool)
    units = torch.full((length,), -1)
    for u, (start, end) in enumerate(spans):
        visual[start:end], units[start:end] = True, u
    return hidden, visual, alpha, units


def _batch(samples, side="right"):
    length = max(s[0].shape[0] for s in samples)
    hidden = torch.zeros(len(samples), length, D)
    visual = torch.zeros(len(samples), length, dtype=torch.bool)
    valid = torch.zeros(len(samples), length, dtype=torch.bool)
    alpha = torch.zeros(len(samples), length)
    units = torch.full((len(samples), length), -1)
    for b, (h, v, a, u) in enumerate(samples):
        n = h.shape[0]
        where = slice(length - n, length) if side == "left" else slice(0, n)
        hidden[b, where], visual[b, where], alpha[b, where], units[b, where], valid[b, where] = (
            h,
            v,
            a,
            u,
            True,
        )
    return hidden, visual, valid, alpha, units


def _expected_row(h, v, a, u, ratio, merge="igm"):
    """The compressed sequence of one unpadded sample, unit by unit with the single-sample algorithm."""
    out, source = [], []
    n_units = int(u.max()) + 1 if v.any() else 0
    last = {int(u[i]): i for i in range(len(u)) if v[i]}
    for i in range(len(v)):
        if not v[i]:
            out.append(h[i])
            source.append(i)
            continue
        unit = int(u[i])
        idx = [j for j in range(len(v)) if v[j] and u[j] == unit]
        res = compress_visual_tokens(h[idx], a[idx], ratio, merge=merge)
        targets = [idx[t] for t in res.target_index.tolist()]
        if i in targets:
            out.append(res.tokens[targets.index(i)])
            source.append(i)
        if i == last[unit] and res.has_compensation:
            out.append(res.tokens[-1])
            source.append(i)
    assert n_units == len(last)
    return torch.stack(out), source


@pytest.mark.parametrize("merge", ["igm", "igm_neg", "prune", "mean"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_each_unit_is_compressed_alone(merge, side):
    samples = [
        _sequence(30, [(2, 11), (14, 27)], seed=0),  # two images with text between
        _sequence(22, [(1, 17)], seed=1),  # one image
        _sequence(9, [], seed=2),  # text only
        _sequence(26, [(3, 9), (9, 19), (21, 24)], seed=3),  # adjacent units, and a short one
    ]
    for s in samples[3:]:
        s[3][9:19] = 1  # the adjacent second unit
        s[3][21:24] = 2
    hidden, visual, valid, alpha, units = _batch(samples, side)
    plan = compress_sequence(
        hidden, visual, valid, alpha, 0.5, merge=merge, units=units, pad_left=side == "left"
    )
    for b, (h, v, a, u) in enumerate(samples):
        tokens, source = _expected_row(h, v, a, u, 0.5, merge)
        real = plan.valid[b]
        offset = valid.shape[1] - h.shape[0] if side == "left" else 0
        torch.testing.assert_close(plan.hidden[b][real], tokens, rtol=1e-5, atol=1e-5)
        assert (plan.source[b][real] - offset).tolist() == source
        assert not plan.hidden[b][~real].any()  # padding and unused slots are zeros
    assert plan.layout.occupied == tuple(int(o) for o in plan.occupied.sum(1))
    assert plan.layout.units == tuple(tuple(int(n) for n in row) for row in
                                      [[(plan.units[b] == k).sum() for k in range(3)] for b in range(4)])  # fmt: skip


def test_one_unit_equals_no_units():
    samples = [_sequence(30, [(2, 11), (14, 27)], seed=0), _sequence(22, [(1, 17)], seed=1)]
    hidden, visual, valid, alpha, units = _batch(samples)
    one = compress_sequence(
        hidden, visual, valid, alpha, 0.5, units=units.clamp_max(0).masked_fill(~visual, -1)
    )
    none = compress_sequence(hidden, visual, valid, alpha, 0.5)
    for field in ("hidden", "valid", "occupied", "source", "kept", "visual", "dest"):
        assert torch.equal(getattr(one, field), getattr(none, field)), field


def test_reserved_slots_keep_the_host_layout_exact_over_two_points():
    samples = [_sequence(30, [(2, 11), (14, 27)], seed=0), _sequence(22, [(1, 17)], seed=1)]
    hidden, visual, valid, alpha, units = _batch(samples)
    layout = HostLayout.read(visual, valid, units)
    first = compress_sequence(hidden, visual, valid, alpha, 0.5, units=units, layout=layout)
    assert first.layout == layout.after(0.5, "igm")
    assert first.hidden.shape[1] == max(first.layout.occupied)
    alpha2 = torch.rand(first.valid.shape)
    second = compress_sequence(
        first.hidden, first.visual, first.valid, alpha2, 0.5, units=first.units, occupied=first.occupied,
        layout=first.layout,
    )  # fmt: skip
    assert second.hidden.shape[1] == max(second.layout.occupied)
    assert second.layout.occupied == tuple(int(o) for o in second.occupied.sum(1))
    assert (second.occupied >= second.valid).all()  # holes are occupied, never valid
