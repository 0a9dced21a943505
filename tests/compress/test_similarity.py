"""libra_train/compress/similarity.py: refine (float32 bulk, float64 where undecided) decides exactly as float64.

``refine`` is forced on CPU (``auto`` picks float64 here). Every test compares against the float64 path, the
reference's own numbers, bit for bit; the guards check that each input really puts decisions inside the error
bound, so that the float64 recompute is what makes them equal.
"""

import numpy as np
import pytest
import torch

from libra_train.compress import compress_visual_tokens, compress_visual_tokens_batched
from libra_train.compress import similarity as S
from libra_train.compress.types import cosine_matrix

DIMS = [4, 33, 256, 1000, 4096]


def random_tokens(b, n, d, seed=0, kind="gaussian"):
    """``[B, N, D]`` tokens: i.i.d. Gaussian, or LLM-like hidden states.

    LLM-like: a shared mean direction (hidden states are anisotropic), a low-rank smooth "image" part, a few
    massive channels, and noise. Cosines then crowd together in a narrow band, where near ties are common.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(b, n, d, generator=g)
    mean = torch.randn(d, generator=g)
    basis = torch.randn(8, d, generator=g)
    z = torch.randn(b, n, 8, generator=g).cumsum(1) / 4  # neighbouring tokens are similar
    x = 2 * mean + z @ basis + 0.5 * torch.randn(b, n, d, generator=g)
    x[..., :2] *= 20
    return x


def interval_targets(x, counts):
    """``(targets [B, T, D], target_mask [B, T])``: every other token, ``counts[b]`` real ones per sample."""
    t = max(counts)
    targets = x[:, ::2][:, :t].clone()
    return targets, torch.arange(t) < torch.tensor(counts)[:, None]


def ambiguous(targets, tokens, tmask, theta, token_mask=None) -> torch.Tensor:
    """``[B, N]`` the columns refine recomputes in float64."""
    return S._match_estimate(S._normalize(targets), S._normalize(tokens), tmask, theta, token_mask)[2]


def assert_match_equal(targets, tokens, tmask, theta, token_mask=None):
    want_best, want_pos = S.target_match(targets, tokens, tmask, theta, precision="float64")
    got_best, got_pos = S.target_match(
        targets, tokens, tmask, theta, token_mask=token_mask, precision="refine"
    )
    cols = torch.ones_like(want_pos) if token_mask is None else token_mask
    assert torch.equal(got_best[cols], want_best[cols])
    assert torch.equal(got_pos[cols], want_pos[cols])
    return want_best, want_pos


def assert_redundancy_equal(x, mask):
    want = S.redundancy(x, mask, precision="float64")
    got = S.redundancy(x, mask, precision="refine")
    assert torch.equal(got, want)  # the value, bit for bit (it feeds a top-k)
    return want


# ---------------------------------------------------------------------------------------------------------------
# Random data.


@pytest.mark.parametrize("kind", ["gaussian", "llm"])
@pytest.mark.parametrize("d", DIMS)
def test_random_data_matches_float64(d, kind):
    x = random_tokens(3, 40, d, seed=d, kind=kind)
    targets, tmask = interval_targets(x, [16, 5, 1])
    sim = cosine_matrix(targets, x).masked_fill(~tmask[..., None], float("-inf"))
    s_max = sim.max(1).values
    for theta in (0.7, float(s_max.median()), float(s_max.quantile(0.3))):
        assert_match_equal(targets, x, tmask, theta)
    mask = torch.arange(40) < torch.tensor([[40], [17], [2]])
    assert_redundancy_equal(x, mask)


def test_llm_like_data_needs_the_recompute():
    # Guard for the test above: on crowded cosines some columns are undecided by float32 and refined.
    x = random_tokens(3, 40, 1000, seed=1000, kind="llm")
    targets, tmask = interval_targets(x, [16, 5, 1])
    sim = cosine_matrix(targets, x).masked_fill(~tmask[..., None], float("-inf"))
    assert ambiguous(targets, x, tmask, float(sim.max(1).values.median())).any()


# ---------------------------------------------------------------------------------------------------------------
# Exact duplicates: every column a tie, more ambiguous columns than any fixed cap.


@pytest.mark.parametrize("d", [9, 4096])
def test_identical_targets_and_tokens(d):
    g = torch.Generator().manual_seed(d)
    v, u = torch.randn(2, d, generator=g)
    # 12 targets v (times powers of two: the same unit vector, exactly) and then 12 targets u, in both samples;
    # 96 tokens cycling v, u, 3v. Every column ties among 12 targets: the earliest wins (0 for v, 12 for u).
    scale = 2.0 ** torch.randint(-2, 3, (2, 24, 1), generator=g)
    targets = torch.cat([v.expand(12, d), u.expand(12, d)])[None] * scale  # [2, 24, D]
    tokens = torch.stack([v, u, 3 * v]).repeat(32, 1).expand(2, 96, d).clone()
    tmask = torch.ones(2, 24, dtype=torch.bool)
    tmask[1, 13:] = False  # sample 1: one u target only (13 real targets)
    amb = ambiguous(targets, tokens, tmask, 0.7)
    assert int(amb[0].sum()) == 96 and int(amb[1].sum()) == 64  # sample 1's u columns have a single u target
    for theta in (0.7, 1.0, float(np.nextafter(np.float32(1), np.float32(0)))):
        best, positive = assert_match_equal(targets, tokens, tmask, theta)
        assert best[0].tolist() == [0, 12, 0] * 32
        assert positive.all() == (theta < 1)  # duplicates have cosine exactly 1.0 in float32
    # Turbo: every token has exact duplicates, so r = 1 for all, from full float64 rows.
    r = assert_redundancy_equal(tokens, torch.ones(2, 96, dtype=torch.bool))
    assert (r == 1).all()


def test_mixed_duplicates_and_noise():
    # Half of the tokens are one vector (and its multiples), half noise; targets include several copies.
    x = random_tokens(2, 64, 300, seed=3)
    x[:, ::2] = x[:, :1] * torch.tensor([1.0, 2, 0.5, 4])[None, :, None].repeat(1, 8, 1)
    targets, tmask = interval_targets(x, [32, 20])
    for theta in (0.7, 0.05, -0.05):
        assert_match_equal(targets, x, tmask, theta)
    assert_redundancy_equal(x, torch.arange(64) < torch.tensor([[64], [41]]))


# ---------------------------------------------------------------------------------------------------------------
# theta exactly on a value, and one float32 ulp either side (as test_batched.py::test_theta_is_strict).


@pytest.mark.parametrize("d", [2, 300, 4096])
def test_theta_on_a_value_and_one_ulp_either_side(d):
    x = random_tokens(2, 30, d, seed=d, kind="llm")
    targets, tmask = interval_targets(x, [8, 3])
    sim = cosine_matrix(targets, x).masked_fill(~tmask[..., None], float("-inf"))
    s_max = sim.max(1).values  # [B, N] the float32 values the decision is made on
    for b, j in ((0, 1), (0, 17), (1, 29)):
        v = np.float32(s_max[b, j])
        for theta, positive in (
            (v, False),
            (np.nextafter(v, np.float32(2)), False),
            (np.nextafter(v, -v), True),
        ):
            _, got = assert_match_equal(targets, x, tmask, float(theta))
            assert bool(got[b, j]) is positive  # strict: s_max > theta
            assert ambiguous(targets, x, tmask, float(theta))[b, j]  # ... and float32 alone could not tell


def test_theta_exact_hand_case():
    # [3, 4] against the target [1, 0]: cosine exactly float32(0.6) (test_select_merge.py::test_theta_is_strict).
    targets, tokens = torch.tensor([[[1.0, 0]]]), torch.tensor([[[1.0, 0], [3, 4]]])
    cos = np.float32(0.6)
    for theta, positive in ((cos, False), (np.nextafter(cos, np.float32(0)), True)):
        _, got = assert_match_equal(targets, tokens, torch.ones(1, 1, dtype=torch.bool), float(theta))
        assert got.tolist() == [[True, positive]]


# ---------------------------------------------------------------------------------------------------------------
# Turbo: S[i, j] and S[j, i].


@pytest.mark.parametrize("d", [9, 4096])
def test_redundancy_of_mutual_neighbours_is_symmetric(d):
    # Tokens come in pairs (2k, 2k+1) of near-duplicates: each is the other's nearest neighbour, so
    # r_{2k} = S[2k, 2k+1] and r_{2k+1} = S[2k+1, 2k] must be the same float32 value (a float32 GEMM rounds
    # them apart). The pairs' similarities crowd near 1, so many rows are refined.
    x = random_tokens(2, 64, d, seed=d)
    x[:, 1::2] = x[:, ::2] + 1e-3 * random_tokens(2, 32, d, seed=d + 1)
    mask = torch.arange(64) < torch.tensor([[64], [37]])
    r = assert_redundancy_equal(x, mask)
    assert torch.equal(r[0, ::2], r[0, 1::2]) and torch.equal(r[1, :36:2], r[1, 1:36:2])
    # End to end: with alpha = 0 the mergeability is r, and each pair's tie goes to the earliest as target.
    alpha = torch.zeros(2, 64)
    with S.use_precision("refine"):
        got = compress_visual_tokens_batched(x, alpha, mask, 0.5, select="turbo", merge="prune")
    with S.use_precision("float64"):
        want = compress_visual_tokens_batched(x, alpha, mask, 0.5, select="turbo", merge="prune")
    assert torch.equal(got.target_index, want.target_index)
    ref = compress_visual_tokens(x[0], alpha[0], 0.5, select="turbo", merge="prune")
    assert torch.equal(got.sample(0).target_index, ref.target_index)


def test_redundancy_with_crowded_neighbours():
    # Token 0 of each sample has 24 neighbours x_0 + sigma * noise at cosines 1 - ~1e-6 that differ by an ulp or
    # two, as much as the float32 GEMM's error: its row is refined in float64, and its value is the true maximum,
    # not that of whichever neighbour float32 ranks first (which is another one in about half of the samples).
    x = random_tokens(8, 25, 4096, seed=9)
    x[:, 1:] = x[:, :1] + 0.002 * random_tokens(8, 24, 4096, seed=10)
    mask = torch.ones(8, 25, dtype=torch.bool)
    r = assert_redundancy_equal(x, mask)
    assert (1 - r[:, 0] < 1e-4).all()
    _, amb = S._redundancy_estimate(S._normalize(x), mask)
    assert amb[:, 0].all()


def test_turbo_regression_vectors():
    # test_select_merge.py::test_turbo_symmetric_tie_goes_to_the_earliest's tokens: r_0 = r_1 exactly.
    x = torch.tensor([[2.0, -1, 2, 2, -2, -1, -3, -3, 1], [-2, 0, 2, 3, 0, 1, -3, 1, 2], [0] * 9])[None]
    r = assert_redundancy_equal(x, torch.ones(1, 3, dtype=torch.bool))
    assert r[0, 0] == r[0, 1] and r[0, 2] == 0


# ---------------------------------------------------------------------------------------------------------------
# Padding, small shapes, zero vectors.


def test_padded_targets_and_empty_samples():
    x = random_tokens(3, 20, 64, seed=5, kind="llm")
    targets, tmask = interval_targets(x, [10, 1, 1])
    tmask[2] = False  # sample 2: no target at all
    junk = targets.clone()
    junk[~tmask] = x[:, :1].expand(-1, 10, -1)[~tmask]  # padded target slots copy a real token (cosine 1)
    for t in (targets, junk):
        best, positive = assert_match_equal(t, x, tmask, 0.7)
        assert (best[2] == 0).all() and not positive[2].any()
    best1, _ = assert_match_equal(targets[:, :1], x, tmask[:, :1], 0.7)  # T = 1
    assert (best1 == 0).all()


def test_token_mask_skips_padding():
    # Zero padding columns have the same estimate (0) for every target: a tie each, undecided by float32.
    # token_mask keeps them out of the float64 work; the real columns are unaffected.
    x = random_tokens(2, 30, 64, seed=6)
    mask = torch.arange(30) < torch.tensor([[30], [12]])
    x = x.masked_fill(~mask[..., None], 0.0)
    targets, tmask = interval_targets(x, [15, 6])
    assert ambiguous(targets, x, tmask, 0.7)[~mask].all()
    assert not ambiguous(targets, x, tmask, 0.7, token_mask=mask)[~mask].any()
    assert_match_equal(targets, x, tmask, 0.7, token_mask=mask)


def test_empty_and_single_token():
    x0, m0 = torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool)
    t, tm = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    for precision in ("float64", "refine"):
        best, positive = S.target_match(t, x0, tm, 0.7, precision=precision)
        assert best.shape == positive.shape == (2, 0)
        assert S.redundancy(x0, m0, precision=precision).shape == (2, 0)
    one = torch.randn(2, 1, 8)
    assert_match_equal(one, one, torch.ones(2, 1, dtype=torch.bool), 0.7)
    r = assert_redundancy_equal(one, torch.tensor([[True], [False]]))
    assert (r == float("-inf")).all()  # no other token


def test_all_zero_vectors():
    # A zero vector has cosine 0 with everything: every column ties at exactly 0 -> target 0, positive iff 0 > theta.
    zeros = torch.zeros(2, 12, 16)
    tmask = torch.ones(2, 6, dtype=torch.bool)
    for theta in (-0.5, 0.0, 0.7):
        best, positive = assert_match_equal(zeros[:, :6], zeros, tmask, theta)
        assert (best == 0).all() and positive.all() == (theta < 0)
    mixed = random_tokens(2, 12, 16, seed=7)
    mixed[:, 3:9] = 0
    assert_match_equal(mixed[:, ::2], mixed, tmask, 0.0)
    assert_match_equal(zeros[:, :6], mixed, tmask, 0.0)
    r = assert_redundancy_equal(zeros, torch.ones(2, 12, dtype=torch.bool))
    assert (r == 0).all()
    assert_redundancy_equal(mixed, torch.ones(2, 12, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# The bound, the host read, the setting.


@pytest.mark.parametrize("kind", ["positive", "llm"])
def test_error_bound_holds(kind):
    # All-positive vectors make every rounding error of a dot product push the same way: the worst case for
    # accumulation. |float32 estimate - float64-then-rounded value| stays within delta.
    x = torch.rand(2, 64, 4096) if kind == "positive" else random_tokens(2, 64, 4096, kind="llm")
    a = S._normalize(x)
    est = a.float() @ a.float().transpose(1, 2)
    gap = (est.double() - cosine_matrix(x, x).double()).abs().max()
    assert 0 < gap <= S.error_bound(4096)


def test_error_bound_formula():
    d = 64
    assert (d + 3) * 2.0**-24 <= S.error_bound(d) <= (d + 4) * 2.0**-24  # IEEE float32: (D + 2) u + u + slack
    assert S.error_bound(d, 2.0**-10) >= 2 * 2.0**-10  # TF32 inputs lose 13 bits, each side
    assert S.error_bound(d, 2.0**-7) >= 2 * 2.0**-7


def test_matmul_input_roundoff_follows_the_settings():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def roundoff():
        return S.matmul_input_roundoff(cpu), S.matmul_input_roundoff(cuda)

    assert roundoff() == (0, 0)
    try:
        torch.set_float32_matmul_precision("high")  # TF32 on both backends
        assert roundoff() == (2.0**-10, 2.0**-10)
        torch.set_float32_matmul_precision("medium")  # oneDNN may use bf16, CUDA TF32
        assert roundoff() == (2.0**-7, 2.0**-10)
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # the per-backend API overrides the legacy one
        assert roundoff() == (2.0**-7, 0)
        # Only CUDA's flag set by the new API: torch.get_float32_matmul_precision() raises ("mix of the legacy and
        # new APIs"), so oneDNN's inherited setting is unknown and assumed bf16.
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        with pytest.raises(RuntimeError, match="legacy"):
            torch.get_float32_matmul_precision()
        assert roundoff() == (2.0**-7, 2.0**-10)
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest" and roundoff() == (0, 0)


def test_refine_reads_one_value_from_the_device():
    syncs = pytest.importorskip("libra_train.bench.syncs")
    x = random_tokens(2, 48, 64, seed=8)
    x[:, 1::2] = x[:, ::2]  # duplicates: the recompute runs
    targets, tmask = interval_targets(x, [24, 10])
    mask = torch.ones(2, 48, dtype=torch.bool)
    for fn in (
        lambda: S.target_match(targets, x, tmask, 0.7, token_mask=mask, precision="refine"),
        lambda: S.target_match(targets, x + 1e-3 * torch.randn_like(x), tmask, 2.0, precision="refine"),
        lambda: S.redundancy(x, mask, precision="refine"),
    ):
        _, counter = syncs.count_syncs(fn)
        assert counter.total == 1, counter  # the size of the float64 recompute
    _, counter = syncs.count_syncs(lambda: S.redundancy(x, mask, precision="float64"))
    assert counter.total == 0


def test_auto_precision_follows_float64_speed(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert S.resolve_precision(None, cpu) == "float64"
    for capability, precision in (
        ((9, 0), "float64"),
        ((8, 0), "float64"),
        ((8, 9), "refine"),
        ((8, 6), "refine"),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert S.resolve_precision(None, cuda) == precision, capability  # H100, A100: fast; L40S, A10: 1/64
        assert S.resolve_precision("refine", cuda) == "refine"
    assert S.resolve_precision(None, torch.device("mps")) == "refine"


def test_precision_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert S.resolve_precision(None, cpu) == "float64" and S.resolve_precision("refine", cuda) == "refine"
    with S.use_precision("refine"):
        assert S.resolve_precision(None, cpu) == "refine"
        with S.use_precision("float64"):
            assert S.resolve_precision(None, cuda) == "float64"
        assert S.resolve_precision(None, cpu) == "refine"
        assert S.resolve_precision("float64", cpu) == "float64"  # an explicit argument wins
    assert S.resolve_precision(None, cpu) == "float64"
    with pytest.raises(ValueError, match="'float64', 'refine'"):
        S.use_precision("fp32").__enter__()
    with pytest.raises(ValueError, match="not one of"):
        S.redundancy(torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), precision="half")
