"""Hand-worked cases of every select x merge combination (shared/DESIGN.md section 1).

Every expected number below is worked out by hand in the comments from simple vectors whose cosines are
obvious (``[1,0]`` vs ``[2,0]``: 1; ``[1,0]`` vs ``[0,1]``: 0; ``[1,0]`` vs ``[-1,0]``: -1; ``[1,0]`` vs
``[1,1]``: 1/sqrt(2) = 0.7071 > theta = 0.7). Weights are ``softmax(alpha / tau)`` written out with
``math.exp``; ``tau = mean(alpha)`` over all N visual tokens.
"""

import math

import numpy as np
import pytest
import torch

from libra_train.compress import (
    MERGE_METHODS,
    SELECT_METHODS,
    compress_visual_tokens,
    compress_visual_tokens_batched,
)

E = math.exp


def softmax(*logits: float) -> list[float]:
    """``softmax`` of a few Python floats, written out."""
    z = sum(E(v) for v in logits)
    return [E(v) / z for v in logits]


def check(res, *, targets, assignment, weights, tokens, has_comp):
    assert res.target_index.tolist() == targets
    assert res.assignment.tolist() == assignment
    assert res.has_compensation is has_comp
    assert res.tokens.shape == (len(targets) + has_comp, res.tokens.shape[1])
    torch.testing.assert_close(res.weights, torch.tensor(weights, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.tokens, torch.tensor(tokens, dtype=torch.float32), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Example A, select=interval. N=8, D=3, R=0.5 -> N_t=4, intervals [0,2) [2,4) [4,6) [6,8).
#   j  x_j         alpha   interval winner
#   0  [ 1, 0, 0]  0.1
#   1  [ 3, 0, 0]  0.5     t0 (0.5 > 0.1)
#   2  [ 0, 2, 0]  0.2     t1 (tie 0.2 = 0.2 with j=3: the earliest in the interval)
#   3  [ 1, 1, 0]  0.2
#   4  [ 0, 0, 1]  0.2
#   5  [-2, 0, 0]  0.4     t2 (0.4 > 0.2)
#   6  [ 0, 0,-2]  0.0
#   7  [ 0,-1, 0]  0.4     t3 (0.4 > 0.0)
# Targets (unit): t0 = e1, t1 = e2, t2 = -e1, t3 = -e2. Cosines of the non-targets to (t0, t1, t2, t3):
#   j=0: ( 1, 0, -1, 0)            -> t0, s_max = 1 > 0.7: positive
#   j=3: (.7071, .7071, -.7071, -.7071) -> tie t0/t1 -> t0 (earliest target), s_max = .7071 > 0.7: positive
#   j=4: (0, 0, 0, 0)              -> t0 (tie: earliest), s_max = 0: negative
#   j=6: (0, 0, 0, 0)              -> t0 (tie: earliest), s_max = 0: negative
# tau = mean(alpha) = 2.0 / 8 = 0.25; alpha / tau = [0.4, 2.0, 0.8, 0.8, 0.8, 1.6, 0.0, 1.6].
X_A = [[1, 0, 0], [3, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 1], [-2, 0, 0], [0, 0, -2], [0, -1, 0]]
ALPHA_A = [0.1, 0.5, 0.2, 0.2, 0.2, 0.4, 0.0, 0.4]
T_A = [[0, 2, 0], [-2, 0, 0], [0, -1, 0]]  # t1, t2, t3: singleton groups in every merge but `mean`/`*_pos`


def _expected_a(merge):
    if merge == "igm":
        # G0 = {0, 1, 3}: softmax(0.4, 2.0, 0.8) = (.13432, .66530, .20038)
        # T0 = w0 [1,0,0] + w1 [3,0,0] + w3 [1,1,0] = [w0 + 3 w1 + w3, w3, 0] = [2.33059, .20038, 0]
        # compensation = {4, 6}: softmax(0.8, 0.0) = (.68997, .31003); C = [0, 0, c4 - 2 c6] = [0, 0, .06991]
        w0, w1, w3 = softmax(0.4, 2.0, 0.8)
        c4, c6 = softmax(0.8, 0.0)
        return dict(
            assignment=[0, 0, 1, 0, 4, 2, 4, 3],
            weights=[w0, w1, 1, w3, c4, 1, c6, 1],
            tokens=[[w0 + 3 * w1 + w3, w3, 0], *T_A, [0, 0, c4 - 2 * c6]],
            has_comp=True,
        )
    if merge == "prune":
        return dict(
            assignment=[-1, 0, 1, -1, -1, 2, -1, 3],
            weights=[0, 1, 1, 0, 0, 1, 0, 1],
            tokens=[[3, 0, 0], *T_A],
            has_comp=False,
        )
    if merge == "mean":
        # every non-target joins its most similar target: 0, 3, 4, 6 -> t0 (4 and 6 by the earliest-tie rule)
        # T0 = ([1,0,0] + [3,0,0] + [1,1,0] + [0,0,1] + [0,0,-2]) / 5 = [5, 1, -1] / 5
        return dict(
            assignment=[0, 0, 1, 0, 0, 2, 0, 3],
            weights=[0.2, 0.2, 1, 0.2, 0.2, 1, 0.2, 1],
            tokens=[[1.0, 0.2, -0.2], *T_A],
            has_comp=False,
        )
    if merge == "igm_pos":
        # G0 = {0, 1, 3, 4, 6}: softmax(0.4, 2.0, 0.8, 0.8, 0.0) = (.10409, .51556, .15529, .15529, .06977)
        # T0 = [w0 + 3 w1 + w3, w3, w4 - 2 w6] = [1.80607, .15529, .01574]
        w0, w1, w3, w4, w6 = softmax(0.4, 2.0, 0.8, 0.8, 0.0)
        return dict(
            assignment=[0, 0, 1, 0, 0, 2, 0, 3],
            weights=[w0, w1, 1, w3, w4, 1, w6, 1],
            tokens=[[w0 + 3 * w1 + w3, w3, w4 - 2 * w6], *T_A],
            has_comp=False,
        )
    # igm_neg: targets unchanged; compensation = {0, 3, 4, 6}: softmax(0.4, 0.8, 0.8, 0.0)
    # = (.21487, .32055, .32055, .14403); C = [c0 + c3, c3, c4 - 2 c6] = [.53542, .32055, .03249]
    c0, c3, c4, c6 = softmax(0.4, 0.8, 0.8, 0.0)
    return dict(
        assignment=[4, 0, 1, 4, 4, 2, 4, 3],
        weights=[c0, 1, 1, c3, c4, 1, c6, 1],
        tokens=[[3, 0, 0], *T_A, [c0 + c3, c3, c4 - 2 * c6]],
        has_comp=True,
    )


@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_interval_example(merge):
    res = compress_visual_tokens(
        torch.tensor(X_A, dtype=torch.float32), torch.tensor(ALPHA_A), 0.5, merge=merge
    )
    check(res, targets=[1, 2, 5, 7], **_expected_a(merge))


# ---------------------------------------------------------------------------------------------------------------
# Example B, select=topk. N=6, D=2, R=0.5 -> N_t=3.
#   j  x_j      alpha
#   0  [ 1, 0]  0.2    t0 (tie 0.2 with j=4 for the 3rd place: the earliest globally)
#   1  [ 0, 1]  0.3    t1
#   2  [ 2, 0]  0.1
#   3  [ 1, 1]  0.3    t2
#   4  [-1, 0]  0.2
#   5  [ 0,-3]  0.1
# (interval would pick [1, 3, 4]: a different set.) Cosines to (t0, t1, t2) = (e1, e2, [1,1]/sqrt2):
#   j=2: ( 1,  0,  .7071) -> t0, positive
#   j=4: (-1,  0, -.7071) -> t1 (s_max = 0), negative
#   j=5: ( 0, -1, -.7071) -> t0 (s_max = 0), negative
# tau = 1.2 / 6 = 0.2; alpha / tau = [1.0, 1.5, 0.5, 1.5, 1.0, 0.5].
X_B = [[1, 0], [0, 1], [2, 0], [1, 1], [-1, 0], [0, -3]]
ALPHA_B = [0.2, 0.3, 0.1, 0.3, 0.2, 0.1]


def _expected_b(merge):
    if merge == "igm":
        # G0 = {0, 2}: softmax(1.0, 0.5) = (.62246, .37754); T0 = [w0 + 2 w2, 0] = [1.37754, 0]
        # compensation = {4, 5}: softmax(1.0, 0.5); C = [-c4, -3 c5] = [-.62246, -1.13262]
        w0, w2 = softmax(1.0, 0.5)
        c4, c5 = softmax(1.0, 0.5)
        return dict(
            assignment=[0, 1, 0, 2, 3, 3],
            weights=[w0, 1, w2, 1, c4, c5],
            tokens=[[w0 + 2 * w2, 0], [0, 1], [1, 1], [-c4, -3 * c5]],
            has_comp=True,
        )
    if merge == "prune":
        return dict(
            assignment=[0, 1, -1, 2, -1, -1],
            weights=[1, 1, 0, 1, 0, 0],
            tokens=[[1, 0], [0, 1], [1, 1]],
            has_comp=False,
        )
    if merge == "mean":
        # G0 = {0, 2, 5}: ([1,0] + [2,0] + [0,-3]) / 3 = [1, -1]; G1 = {1, 4}: ([0,1] + [-1,0]) / 2
        return dict(
            assignment=[0, 1, 0, 2, 1, 0],
            weights=[1 / 3, 0.5, 1 / 3, 1, 0.5, 1 / 3],
            tokens=[[1, -1], [-0.5, 0.5], [1, 1]],
            has_comp=False,
        )
    if merge == "igm_pos":
        # G0 = {0, 2, 5}: softmax(1.0, 0.5, 0.5) = (.45186, .27407, .27407); T0 = [w0 + 2 w2, -3 w5]
        # G1 = {1, 4}: softmax(1.5, 1.0) = (.62246, .37754); T1 = [-v4, v1]
        w0, w2, w5 = softmax(1.0, 0.5, 0.5)
        v1, v4 = softmax(1.5, 1.0)
        return dict(
            assignment=[0, 1, 0, 2, 1, 0],
            weights=[w0, v1, w2, 1, v4, w5],
            tokens=[[w0 + 2 * w2, -3 * w5], [-v4, v1], [1, 1]],
            has_comp=False,
        )
    # igm_neg: compensation = {2, 4, 5}: softmax(0.5, 1.0, 0.5) = (.27407, .45186, .27407)
    # C = [2 c2 - c4, -3 c5] = [.09627, -.82221]
    c2, c4, c5 = softmax(0.5, 1.0, 0.5)
    return dict(
        assignment=[0, 1, 3, 2, 3, 3],
        weights=[1, 1, c2, 1, c4, c5],
        tokens=[[1, 0], [0, 1], [1, 1], [2 * c2 - c4, -3 * c5]],
        has_comp=True,
    )


@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_topk_example(merge):
    x, alpha = torch.tensor(X_B, dtype=torch.float32), torch.tensor(ALPHA_B)
    res = compress_visual_tokens(x, alpha, 0.5, select="topk", merge=merge)
    check(res, targets=[0, 1, 3], **_expected_b(merge))


# ---------------------------------------------------------------------------------------------------------------
# Example C, select=turbo. N=6, D=2, R=0.5 -> N_t=3: the 3 most mergeable tokens are non-targets.
#   j  x_j      alpha  r_j = max cos to another token      alpha/max  mergeability r - alpha/max
#   0  [ 1, 0]  0.1    1      (j=1)                        0.25        0.75
#   1  [ 2, 0]  0.2    1      (j=0)                        0.5         0.5
#   2  [ 0, 2]  0.2    .7071  (j=5)                        0.5         .2071
#   3  [-1, 0]  0.1    0      (j=2, j=4)                   0.25       -0.25
#   4  [ 0,-1]  0.4    0      (j=0, 1, 3)                  1.0        -1.0
#   5  [ 1, 1]  0.2    .7071  (j=0, 1, 2)                  0.5         .2071
# Most mergeable: 0, 1, then the tie 2 = 5 (bit-identical: same cosine 0.70710677 and 0.2/0.4 = 0.5 exactly):
# ties go to the earliest as target, so 2 is a target and 5 is not. Targets [2, 3, 4] = (e2, -e1, -e2).
# Cosines of the non-targets to (t0, t1, t2):
#   j=0: (0, -1, 0)            -> t0 (tie t0/t2: earliest), s_max = 0: negative
#   j=1: (0, -1, 0)            -> t0, negative
#   j=5: (.7071, -.7071, -.7071) -> t0, positive
# tau = 1.2 / 6 = 0.2; alpha / tau = [0.5, 1.0, 1.0, 0.5, 2.0, 1.0].
X_C = [[1, 0], [2, 0], [0, 2], [-1, 0], [0, -1], [1, 1]]
ALPHA_C = [0.1, 0.2, 0.2, 0.1, 0.4, 0.2]


def _expected_c(merge):
    if merge == "igm":
        # G0 = {2, 5}: softmax(1.0, 1.0) = (.5, .5); T0 = .5 [0,2] + .5 [1,1] = [.5, 1.5]
        # compensation = {0, 1}: softmax(0.5, 1.0) = (.37754, .62246); C = [c0 + 2 c1, 0] = [1.62246, 0]
        c0, c1 = softmax(0.5, 1.0)
        return dict(
            assignment=[3, 3, 0, 1, 2, 0],
            weights=[c0, c1, 0.5, 1, 1, 0.5],
            tokens=[[0.5, 1.5], [-1, 0], [0, -1], [c0 + 2 * c1, 0]],
            has_comp=True,
        )
    if merge == "prune":
        return dict(
            assignment=[-1, -1, 0, 1, 2, -1],
            weights=[0, 0, 1, 1, 1, 0],
            tokens=[[0, 2], [-1, 0], [0, -1]],
            has_comp=False,
        )
    if merge == "mean":
        # G0 = {0, 1, 2, 5}: ([1,0] + [2,0] + [0,2] + [1,1]) / 4 = [1, .75]
        return dict(
            assignment=[0, 0, 0, 1, 2, 0],
            weights=[0.25, 0.25, 0.25, 1, 1, 0.25],
            tokens=[[1, 0.75], [-1, 0], [0, -1]],
            has_comp=False,
        )
    if merge == "igm_pos":
        # G0 = {0, 1, 2, 5}: softmax(0.5, 1, 1, 1) = (.16818, .27727, .27727, .27727)
        # T0 = [w0 + 2 w1 + w5, 2 w2 + w5] = [1.0, .83182]
        w0, w1, w2, w5 = softmax(0.5, 1.0, 1.0, 1.0)
        return dict(
            assignment=[0, 0, 0, 1, 2, 0],
            weights=[w0, w1, w2, 1, 1, w5],
            tokens=[[w0 + 2 * w1 + w5, 2 * w2 + w5], [-1, 0], [0, -1]],
            has_comp=False,
        )
    # igm_neg: compensation = {0, 1, 5}: softmax(0.5, 1.0, 1.0) = (.23270, .38365, .38365)
    # C = [c0 + 2 c1 + c5, c5] = [1.38365, .38365]
    c0, c1, c5 = softmax(0.5, 1.0, 1.0)
    return dict(
        assignment=[3, 3, 0, 1, 2, 3],
        weights=[c0, c1, 1, 1, 1, c5],
        tokens=[[0, 2], [-1, 0], [0, -1], [c0 + 2 * c1 + c5, c5]],
        has_comp=True,
    )


@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_turbo_example(merge):
    x, alpha = torch.tensor(X_C, dtype=torch.float32), torch.tensor(ALPHA_C)
    res = compress_visual_tokens(x, alpha, 0.5, select="turbo", merge=merge)
    check(res, targets=[2, 3, 4], **_expected_c(merge))


def test_turbo_lam_weighs_importance():
    # Example B's tokens. Redundancy r = [1, .7071, 1, .7071, 0, 0]; alpha / max = [2/3, 1, 1/3, 1, 2/3, 1/3].
    # lam=1: mergeability = [.333, -.293, .667, -.293, -.667, -.333]: non-targets 2, 0, then the exact tie
    #        1 = 3 (same cosine, same alpha): 1 stays a target (earliest) -> targets [1, 4, 5].
    # lam=2: mergeability = [-.333, -1.293, .333, -1.293, -1.333, -.667]: non-targets 2, 0, 5 -> [1, 3, 4].
    x, alpha = torch.tensor(X_B, dtype=torch.float32), torch.tensor(ALPHA_B)
    one = compress_visual_tokens(x, alpha, 0.5, select="turbo", merge="prune", lam=1.0)
    two = compress_visual_tokens(x, alpha, 0.5, select="turbo", merge="prune", lam=2.0)
    assert one.target_index.tolist() == [1, 4, 5]
    assert two.target_index.tolist() == [1, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Ties and uneven intervals.


def test_alpha_ties_all_equal():
    # All alpha equal, x = 0 (every cosine 0, so turbo's mergeability is -1 for every token).
    # N=8, R=0.5 -> N_t=4: interval starts 0, 2, 4, 6; topk and turbo: the first four.
    # N=8, R=0.6 -> N_t=round(3.2)=3, intervals [0,2) [2,5) [5,8): starts 0, 2, 5.
    x, alpha = torch.zeros(8, 2), torch.full((8,), 0.125)
    pick = {
        s: compress_visual_tokens(x, alpha, 0.5, select=s, merge="prune").target_index for s in SELECT_METHODS
    }
    assert pick["interval"].tolist() == [0, 2, 4, 6]
    assert pick["topk"].tolist() == [0, 1, 2, 3]
    assert pick["turbo"].tolist() == [0, 1, 2, 3]
    assert compress_visual_tokens(x, alpha, 0.6, merge="prune").target_index.tolist() == [0, 2, 5]


def test_topk_ties_earliest_globally():
    # N=7, R=0.5 -> N_t=round(3.5)=4: the three 0.5s, then the first 0.1 (j=0) of the four tied 0.1s.
    alpha = torch.tensor([0.1, 0.5, 0.1, 0.5, 0.1, 0.5, 0.1])
    res = compress_visual_tokens(torch.randn(7, 3), alpha, 0.5, select="topk", merge="prune")
    assert res.target_index.tolist() == [0, 1, 3, 5]


@pytest.mark.usefixtures("precision")  # the batched form decides in float64 and in refine
@pytest.mark.parametrize("form", ["single", "batched"])
def test_identical_targets_tie_to_the_earliest(form):
    # Regression: with a float32 GEMM (MKL, D not a multiple of 4) identical target rows got different roundings
    # depending on their row position, and the token joined target 1 instead of 0.
    # N=10, D=9, R=0.5 -> N_t=5, intervals [0,2) [2,4) ... [8,10); x alternates v, u and alpha .5, .1, so the five
    # targets 0, 2, 4, 6, 8 are the same vector v. Every u has the same similarity to all five (cos(u, v) = .33:
    # negative for igm), so mean / igm_pos put it in group 0. Expected assignment [0, 0, 1, 0, 2, 0, 3, 0, 4, 0].
    v = [-0.9, -0.8, 0.2, -0.8, 0.7, 0.9, -0.5, -0.1, -0.7]
    u = [0.8, -0.5, 0.1, 0.2, 0.1, -0.1, 0.2, -0.4, -0.3]
    x, alpha = torch.tensor([v, u] * 5), torch.tensor([0.5, 0.1] * 5)
    for merge in ("mean", "igm_pos"):
        if form == "single":
            group = compress_visual_tokens(x, alpha, 0.5, merge=merge).assignment
        else:
            mask = torch.ones(1, 10, dtype=torch.bool)
            group = compress_visual_tokens_batched(x[None], alpha[None], mask, 0.5, merge=merge).assignment[0]
        assert group.tolist() == [0, 0, 1, 0, 2, 0, 3, 0, 4, 0]


def test_turbo_symmetric_tie_goes_to_the_earliest():
    # Regression: a float32 GEMM rounded S[0, 1] and S[1, 0] differently, and token 1 became the target.
    # N=3, R=0.5 -> N_t=2: one non-target. x2 = 0 (redundancy 0, least mergeable: a target). x0 and x1 are each
    # other's nearest neighbour, so r_0 = r_1 = cos(x0, x1) = 9/sqrt(37 * 32) = .26; alpha = 0, so the
    # mergeability is r for all: the tie 0 = 1 goes to the earliest as target -> targets [0, 2].
    x = torch.tensor([[2.0, -1, 2, 2, -2, -1, -3, -3, 1], [-2, 0, 2, 3, 0, 1, -3, 1, 2], [0] * 9])
    res = compress_visual_tokens(x, torch.zeros(3), 0.5, select="turbo", merge="prune")
    assert res.target_index.tolist() == [0, 2]


def test_uneven_intervals_n7():
    # N=7, R=0.5 -> N_t = round(3.5) = 4 (half to even); interval i = [floor(7i/4), floor(7(i+1)/4)):
    # [0,1) [1,3) [3,5) [5,7). alpha winners: 0 (alone), 2 (0.5 > 0.1), 3 (tie 0.3: earliest), 6 (0.9 > 0.2).
    # (Intervals [0,2) [2,4) [4,6) [6,7) would give [1, 2, 4, 6].)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    alpha = torch.tensor([0.0, 0.1, 0.5, 0.3, 0.3, 0.2, 0.9])
    res = compress_visual_tokens(x, alpha, 0.5, merge="prune")
    assert res.target_index.tolist() == [0, 2, 3, 6]
    assert torch.equal(res.tokens, x[[0, 2, 3, 6]])


def test_interval_n33_half_to_even():
    # N=33, R=0.5 -> N_t = round(16.5) = 16. Interval ends floor(33 (i+1) / 16) = 2, 4, ..., 30, 33:
    # every interval holds 2 tokens except the last, [30, 33).
    x = torch.randn(33, 2, generator=torch.Generator().manual_seed(0))
    up = compress_visual_tokens(x, torch.arange(33.0), 0.5, merge="prune")  # winner = last of each interval
    down = compress_visual_tokens(x, torch.arange(33.0).flip(0), 0.5, merge="prune")  # first of each
    assert up.target_index.tolist() == [*range(1, 31, 2), 32]
    assert down.target_index.tolist() == list(range(0, 31, 2))
    assert up.tokens.shape == (16, 2)


@pytest.mark.parametrize("select", SELECT_METHODS)
@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_ratio_zero_and_single_token_are_identity(select, merge):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    alpha = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.4])
    res = compress_visual_tokens(x, alpha, 0.0, select=select, merge=merge)
    assert torch.equal(res.tokens, x)
    assert not res.has_compensation
    assert res.target_index.tolist() == [0, 1, 2, 3, 4]
    assert res.assignment.tolist() == [0, 1, 2, 3, 4]
    assert res.weights.tolist() == [1.0] * 5
    # N=1, R=0.8: N_t = max(1, round(0.2)) = 1: the token is its own target.
    one = compress_visual_tokens(x[:1], alpha[:1], 0.8, select=select, merge=merge)
    assert torch.equal(one.tokens, x[:1])
    assert one.target_index.tolist() == [0] and not one.has_compensation


# ---------------------------------------------------------------------------------------------------------------
# Positive / negative sets, tau, theta.


def test_empty_negative_set_has_no_compensation_token():
    # N=6, R=0.5, intervals [0,2) [2,4) [4,6) -> targets 0, 2, 4 (alpha .3 > .1, .2 > .1, .2 > .1).
    # Non-targets: j=1 [.9,.1] vs t0=[1,0]: .9/sqrt(.82) = .9939; j=3 [.1,.9] vs t1=[0,1]: .9939;
    # j=5 [2,2] vs t2=[1,1]: 1. All positive -> no compensation token; igm == igm_pos.
    # tau = 1.0 / 6; alpha / tau = [1.8, .6, 1.2, .6, 1.2, .6].
    x = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 1], [2, 2]])
    alpha = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
    w0, w1 = softmax(1.8, 0.6)  # (.76852, .23148)
    v2, v3 = softmax(1.2, 0.6)  # (.64566, .35434)
    u4, u5 = softmax(1.2, 0.6)
    expected = dict(
        assignment=[0, 0, 1, 1, 2, 2],
        weights=[w0, w1, v2, v3, u4, u5],
        tokens=[[w0 + 0.9 * w1, 0.1 * w1], [0.1 * v3, v2 + 0.9 * v3], [u4 + 2 * u5, u4 + 2 * u5]],
        has_comp=False,
    )
    for merge in ("igm", "igm_pos"):
        check(compress_visual_tokens(x, alpha, 0.5, merge=merge), targets=[0, 2, 4], **expected)


def test_empty_positive_set_keeps_targets_unchanged():
    # N=4, R=0.5, intervals [0,2) [2,4) -> targets 0 (alpha .4 > .2) and 3 (.3 > .1): e1 and e2.
    # j=1 [0,0,1]: cosines (0, 0); j=2 [-1,-1,0]: (-.7071, -.7071). Both negative: the targets stay exactly as
    # they are and everything else is in the compensation token; igm == igm_neg.
    # tau = 1.0 / 4; compensation = {1, 2}: softmax(0.8, 0.4) = (.59869, .40131); C = [-c2, -c2, c1].
    x = torch.tensor([[1.0, 0, 0], [0, 0, 1], [-1, -1, 0], [0, 1, 0]])
    alpha = torch.tensor([0.4, 0.2, 0.1, 0.3])
    c1, c2 = softmax(0.8, 0.4)
    for merge in ("igm", "igm_neg"):
        res = compress_visual_tokens(x, alpha, 0.5, merge=merge)
        check(
            res,
            targets=[0, 3],
            assignment=[0, 2, 2, 1],
            weights=[1, c1, c2, 1],
            tokens=[[1, 0, 0], [0, 1, 0], [-c2, -c2, c1]],
            has_comp=True,
        )
        assert torch.equal(res.tokens[:2], x[[0, 3]])


def test_tau_is_mean_alpha_over_all_visual_tokens():
    # N=4, R=0.5, intervals [0,2) [2,4) -> targets 1 (.3 > .1) and 2 (1.1 > .5); 0 joins t0, 3 joins t1.
    # tau = mean over all 4 tokens = 2.0 / 4 = 0.5; alpha / tau = [.2, .6, 2.2, 1.0].
    # G0 = {0, 1}: softmax(.2, .6) = (.40131, .59869); T0 = [2 w0 + w1, 0] = [1.40131, 0]
    # G1 = {2, 3}: softmax(2.2, 1.0) = (.76852, .23148); T1 = [0, w2 + 3 w3] = [0, 1.46297]
    # (tau = the group's own mean would give w0 = .26894 and w3 = .32082 instead.)
    x = torch.tensor([[2.0, 0], [1, 0], [0, 1], [0, 3]])
    alpha = torch.tensor([0.1, 0.3, 1.1, 0.5])
    w0, w1 = softmax(0.2, 0.6)
    w2, w3 = softmax(2.2, 1.0)
    check(
        compress_visual_tokens(x, alpha, 0.5),
        targets=[1, 2],
        assignment=[0, 0, 1, 1],
        weights=[w0, w1, w2, w3],
        tokens=[[2 * w0 + w1, 0], [0, w2 + 3 * w3]],
        has_comp=False,
    )


def test_theta_is_strict():
    # N=2, R=0.5 -> N_t = round(1.0) = 1, target j=0 (alpha .75 > .25). x1 = [3,4]: normalised to
    # [3/5, 4/5]; its cosine with e1, as the float32 the decision is made on, is exactly float32(0.6).
    # theta = that value: s_max > theta is False -> negative. One float32 step below: positive.
    x = torch.tensor([[1.0, 0], [3, 4]])
    alpha = torch.tensor([0.75, 0.25])
    cos = np.float32(0.6)
    neg = compress_visual_tokens(x, alpha, 0.5, theta=float(cos))
    check(neg, targets=[0], assignment=[0, 1], weights=[1, 1], tokens=[[1, 0], [3, 4]], has_comp=True)
    # tau = 0.5; G0 = {0, 1}: softmax(1.5, 0.5) = (.73106, .26894); T0 = [w0 + 3 w1, 4 w1]
    pos = compress_visual_tokens(x, alpha, 0.5, theta=float(np.nextafter(cos, np.float32(0))))
    w0, w1 = softmax(1.5, 0.5)
    check(
        pos, targets=[0], assignment=[0, 0], weights=[w0, w1], tokens=[[w0 + 3 * w1, 4 * w1]], has_comp=False
    )


# ---------------------------------------------------------------------------------------------------------------
# Gradient and errors.


@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_gradient_flows_to_x_not_alpha(merge):
    # d sum(tokens) / d x[j, c] = weight of j in its group: the hand-worked weights of example A.
    x = torch.tensor(X_A, dtype=torch.float32, requires_grad=True)
    alpha = torch.tensor(ALPHA_A, requires_grad=True)
    res = compress_visual_tokens(x, alpha, 0.5, merge=merge)
    assert res.tokens.requires_grad
    res.tokens.sum().backward()
    expected = torch.tensor(_expected_a(merge)["weights"], dtype=torch.float32)
    torch.testing.assert_close(x.grad, expected[:, None].expand(8, 3), rtol=1e-5, atol=1e-6)
    dropped = [0, 3, 4, 6] if merge == "prune" else []
    assert (x.grad[dropped] == 0).all() and (x.grad.abs().sum(1) > 0).sum() == 8 - len(dropped)
    assert alpha.grad is None  # importance is a decision signal: no gradient path


def test_invalid_arguments_raise():
    x, alpha = torch.randn(6, 2), torch.rand(6)
    with pytest.raises(ValueError, match="select"):
        compress_visual_tokens(x, alpha, 0.5, select="random")
    with pytest.raises(ValueError, match="merge"):
        compress_visual_tokens(x, alpha, 0.5, merge="sum")
    for ratio in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            compress_visual_tokens(x, alpha, ratio)
