"""Properties of Libra-Merging on random inputs (hypothesis), checked against float64 re-derivations of the spec.

Inputs: N in 1..40 tokens, D in 1..8 channels, float32 values in [-10, 10] (magnitudes below 1e-3 snapped to 0 so
that no vector is so small that its squared norm underflows, which would make scaling by 2 inexact), alpha in
{0} U [2^-20, 1] (attention probabilities; a subnormal mean would hit the tau clamp of ``importance_temperature``),
ratio from the paper's settings or any float in [0, 0.95].
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from libra_train.compress import (
    MERGE_METHODS,
    SELECT_METHODS,
    compress_visual_tokens,
    compress_visual_tokens_batched,
)
from libra_train.compress.similarity import use_precision

PROPS = settings(deadline=None, max_examples=50)

VALUE = st.floats(-10, 10, width=32, allow_subnormal=False).map(lambda v: 0.0 if abs(v) < 1e-3 else v)
ALPHA = st.just(0.0) | st.floats(2**-20, 1.0, width=32)
RATIO = st.sampled_from([0.0, 0.5, 2 / 3, 0.8]) | st.floats(0.0, 0.95)
REMOVING = st.sampled_from([0.5, 2 / 3, 0.8]) | st.floats(0.3, 0.95)  # removes a token whenever N >= 2
SELECT = st.sampled_from(SELECT_METHODS)
MERGE = st.sampled_from(MERGE_METHODS)
# Decisions closer than this to a tie may legitimately differ between two computations that sum in a different
# order (the float32 cosine the decisions use is accurate to an ulp or two, ~1e-7).
NEAR = 1e-5


@st.composite
def spans(draw, min_n: int = 1, max_n: int = 40, max_d: int = 8):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    x = draw(arrays(np.float32, (n, d), elements=VALUE))
    alpha = draw(arrays(np.float32, (n,), elements=ALPHA))
    return torch.from_numpy(x), torch.from_numpy(alpha)


def n_targets(n: int, ratio: float) -> int:
    return max(1, round(n * (1 - ratio)))


def cos64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in float64; a zero vector has similarity 0 with everything."""
    a, b = a.double(), b.double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mergeability64(x: torch.Tensor, alpha: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    sim = cos64(x, x)
    sim.fill_diagonal_(-math.inf)
    peak = alpha.double().max()
    scaled = alpha.double() / peak if peak > 0 else torch.zeros_like(alpha, dtype=torch.float64)
    return sim.max(1).values - lam * scaled


def near_tie(x, alpha, targets, select, merge, theta=0.7) -> bool:
    """Whether a decision of this input lies within ``NEAR`` of a tie (float64), so rounding may flip it."""
    n, t = x.shape[0], targets.numel()
    if t >= n:
        return False
    if select == "turbo":
        m = mergeability64(x, alpha)
        gap = (m[:, None] - m[None, :]).abs()
        gap.fill_diagonal_(math.inf)
        if (gap < NEAR).any():
            return True
    if merge in ("prune", "igm_neg"):
        return False
    is_target = torch.zeros(n, dtype=torch.bool)
    is_target[targets] = True
    sim = cos64(x[targets], x)[:, ~is_target]  # [T, non-targets]
    top = sim.topk(min(2, t), dim=0).values
    if t >= 2 and ((top[0] - top[1]) < NEAR).any():  # argmax over targets is ambiguous
        return True
    return merge == "igm" and bool(((top[0] - theta).abs() < NEAR).any())  # s_max on the threshold


# ---------------------------------------------------------------------------------------------------------------
# One sample against the spec.


@PROPS
@given(span=spans(), ratio=RATIO, select=SELECT, merge=MERGE)
def test_structure_and_weights_follow_the_spec(span, ratio, select, merge):
    x, alpha = span
    n = x.shape[0]
    res = compress_visual_tokens(x, alpha, ratio, select=select, merge=merge)
    n_t = n_targets(n, ratio)
    idx, group, w = res.target_index, res.assignment, res.weights.double()

    # Shapes: N_t merged targets, then at most one compensation token.
    assert res.num_targets == n_t
    assert res.tokens.shape == (n_t + res.has_compensation, x.shape[1])
    assert res.has_compensation == bool((group == n_t).any())
    # Targets: sorted, unique, in range, each heading its own group.
    assert idx.tolist() == sorted(set(idx.tolist())) and int(idx.min()) >= 0 and int(idx.max()) < n
    assert group[idx].tolist() == list(range(n_t))
    assert int(group.min()) >= -1 and int(group.max()) <= n_t

    non = torch.ones(n, dtype=torch.bool)
    non[idx] = False
    if n_t < n:
        expected_non = {"prune": {-1}, "igm_neg": {n_t}, "mean": set(range(n_t)), "igm_pos": set(range(n_t))}
        if merge in expected_non:
            assert set(group[non].tolist()) <= expected_non[merge]
        else:  # igm: nothing is dropped
            assert int(group.min()) >= 0

    # Weights: >= 0, zero for dropped tokens, each group sums to 1 and follows its rule.
    assert (w >= 0).all() and (w[group == -1] == 0).all()
    tau = alpha.double().mean()
    logits = alpha.double() / tau if tau > 0 else torch.zeros(n, dtype=torch.float64)
    for g in range(n_t + 1):
        members = group == g
        if not members.any():
            assert g == n_t  # only the compensation group may be empty
            continue
        assert math.isclose(float(w[members].sum()), 1.0, abs_tol=1e-5)
        if merge == "mean":
            rule = torch.full((int(members.sum()),), 1.0 / int(members.sum()), dtype=torch.float64)
        elif merge == "prune":
            rule = torch.ones(1, dtype=torch.float64)
        else:  # softmax of alpha / tau inside the group, tau = mean alpha over all N tokens
            rule = torch.softmax(logits[members], 0)
        torch.testing.assert_close(w[members], rule, rtol=1e-4, atol=1e-6)
        # Each output token is the weighted sum of its group.
        ref = (w[members, None] * x[members].double()).sum(0)
        torch.testing.assert_close(res.tokens[g].double(), ref, rtol=1e-5, atol=1e-4)


@PROPS
@given(span=spans(), ratio=RATIO, select=SELECT)
def test_selection_rules(span, ratio, select):
    x, alpha = span
    n = x.shape[0]
    n_t = n_targets(n, ratio)
    idx = compress_visual_tokens(x, alpha, ratio, select=select, merge="prune").target_index
    a = alpha.tolist()
    if n_t == n:
        assert idx.tolist() == list(range(n))
    elif select == "interval":  # exactly one target per interval: its first maximum
        bounds = [(i * n // n_t, (i + 1) * n // n_t) for i in range(n_t)]
        assert idx.tolist() == [max(range(s, e), key=lambda j: (a[j], -j)) for s, e in bounds]
    elif select == "topk":  # global top N_t by alpha, ties to the earliest
        assert idx.tolist() == sorted(sorted(range(n), key=lambda j: (-a[j], j))[:n_t])
    else:  # turbo: no target is more mergeable than a non-target
        m = mergeability64(x, alpha)
        non = torch.ones(n, dtype=torch.bool)
        non[idx] = False
        assert float(m[idx].max()) <= float(m[non].min()) + NEAR


@PROPS
@given(span=spans(min_n=2), ratio=REMOVING, select=SELECT, merge=st.sampled_from(["igm", "mean", "igm_pos"]))
def test_non_targets_join_their_most_similar_target(span, ratio, select, merge):
    x, alpha = span
    res = compress_visual_tokens(x, alpha, ratio, select=select, merge=merge)
    n, n_t, group = x.shape[0], res.num_targets, res.assignment
    assume(n_t < n)
    sim = cos64(x[res.target_index], x)  # [N_t, N]
    top = sim.topk(min(2, n_t), dim=0).values
    s_max, best = top[0], sim.argmax(0)
    check = torch.ones(n, dtype=torch.bool)
    check[res.target_index] = False
    if merge == "igm":
        check &= (s_max - 0.7).abs() >= NEAR  # on the threshold float32 may round either way
        negative = check & (s_max <= 0.7)
        assert (group[negative] == n_t).all(), "s_max <= theta must go to the compensation token"
        check &= ~negative
    if n_t >= 2:
        check &= (top[0] - top[1]) >= NEAR  # two targets (almost) equally similar: float32 decides
    assert torch.equal(group[check], best[check])


@PROPS
@given(span=spans(), ratio=RATIO, select=SELECT)
def test_merge_variants_relate(span, ratio, select):
    x, alpha = span
    kw = dict(select=select)
    prune = compress_visual_tokens(x, alpha, ratio, merge="prune", **kw)
    neg = compress_visual_tokens(x, alpha, ratio, merge="igm_neg", **kw)
    pos = compress_visual_tokens(x, alpha, ratio, merge="igm_pos", **kw)
    n_t = prune.num_targets
    for other in (neg, pos):  # the selection does not depend on the merge
        assert torch.equal(other.target_index, prune.target_index)
    # prune is an exact index select; igm_neg leaves the targets exactly as they are.
    assert torch.equal(prune.tokens, x[prune.target_index])
    assert torch.equal(neg.tokens[:n_t], x[neg.target_index])
    # A computed cosine lies in [-1, 1] up to a few float32 ulps (~1e-7), antipodal pairs give exactly -1
    # or a hair below, and theta=-1 would make them negative (strict >). theta = -(1 + 1e-5) is below every
    # computed cosine: every non-target is positive, which is igm_pos. Symmetrically theta = 1 + 1e-5 is above
    # every cosine (duplicates of a target included): every non-target is negative, which is igm_neg.
    all_pos = compress_visual_tokens(x, alpha, ratio, merge="igm", theta=-1.0 - 1e-5, **kw)
    all_neg = compress_visual_tokens(x, alpha, ratio, merge="igm", theta=1.0 + 1e-5, **kw)
    for got, want in ((all_pos, pos), (all_neg, neg)):
        assert torch.equal(got.target_index, want.target_index)
        assert torch.equal(got.assignment, want.assignment)
        assert got.has_compensation == want.has_compensation
        assert torch.equal(got.weights, want.weights)
        assert torch.equal(got.tokens, want.tokens)


@PROPS
@given(span=spans(), ratio=RATIO, select=SELECT, merge=MERGE)
def test_scaling_by_two_is_exact(span, ratio, select, merge):
    # Cosines are invariant to scaling x, and alpha / mean(alpha), alpha / max(alpha) to scaling alpha; a power of
    # two scales every float32 operation exactly, so decisions and weights are bit-identical and tokens double.
    x, alpha = span
    ref = compress_visual_tokens(x, alpha, ratio, select=select, merge=merge)
    got = compress_visual_tokens(2 * x, 2 * alpha, ratio, select=select, merge=merge)
    assert torch.equal(got.target_index, ref.target_index)
    assert torch.equal(got.assignment, ref.assignment)
    assert torch.equal(got.weights, ref.weights)
    assert torch.equal(got.tokens, 2 * ref.tokens)


@PROPS
@given(span=spans(), ratio=RATIO, select=SELECT, merge=MERGE, data=st.data())
def test_channel_permutation_commutes(span, ratio, select, merge, data):
    x, alpha = span
    perm = torch.tensor(data.draw(st.permutations(range(x.shape[1]))), dtype=torch.long)
    ref = compress_visual_tokens(x, alpha, ratio, select=select, merge=merge)
    got = compress_visual_tokens(x[:, perm], alpha, ratio, select=select, merge=merge)
    same = torch.equal(got.target_index, ref.target_index) and torch.equal(got.assignment, ref.assignment)
    if not same:
        # Permuting channels changes the summation order of norms and dot products, so a cosine (or a turbo
        # mergeability) may move by an ulp. A decision that sits within NEAR of a tie may then flip; that
        # is legitimate, and only then is the example discarded. Any other flip fails here.
        assert near_tie(x, alpha, ref.target_index, select, merge) or near_tie(
            x, alpha, got.target_index, select, merge
        ), "a channel permutation changed a decision that is not near a tie"
        assume(False)
    assert got.has_compensation == ref.has_compensation
    assert torch.equal(got.weights, ref.weights)  # weights depend on alpha and the groups only
    torch.testing.assert_close(got.tokens, ref.tokens[:, perm], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Batched against single.


@st.composite
def padded_batches(draw):
    b = draw(st.integers(1, 4))
    d = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))
    n_max = max(lengths)
    x = draw(arrays(np.float32, (b, n_max, d), elements=VALUE))  # padding is arbitrary, not zero
    alpha = draw(arrays(np.float32, (b, n_max), elements=ALPHA))
    mask = torch.arange(n_max) < torch.tensor(lengths)[:, None]
    return torch.from_numpy(x), torch.from_numpy(alpha), mask, lengths


@pytest.mark.parametrize("precision", ["float64", "refine"])
@PROPS
@given(batch=padded_batches(), ratio=RATIO, select=SELECT, merge=MERGE)
def test_batched_equals_per_sample(precision, batch, ratio, select, merge):
    x, alpha, mask, lengths = batch
    with use_precision(precision):  # refine: float32 similarities, float64 only where a decision is close
        out = compress_visual_tokens_batched(x, alpha, mask, ratio, select=select, merge=merge)
    assert out.num_targets.tolist() == [n_targets(n, ratio) if n else 0 for n in lengths]
    for b, n in enumerate(lengths):
        # Exact decisions, ties included: both forms decide on the same float32 cosines (cosine_matrix rounds a
        # float64 product, so a GEMM's position-dependent rounding cannot break a tie; refine recomputes every
        # decision that its float32 GEMM cannot certify the same way).
        ref = compress_visual_tokens(x[b, :n], alpha[b, :n], ratio, select=select, merge=merge)
        got = out.sample(b)
        assert torch.equal(got.target_index, ref.target_index)
        assert torch.equal(got.assignment, ref.assignment)
        assert got.has_compensation == ref.has_compensation
        torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.tokens, ref.tokens, rtol=1e-5, atol=1e-5)
