"""The batched form against the single-sample reference, on padded batches with a different N per sample."""

import numpy as np
import pytest
import torch

from libra_train.compress import (
    MERGE_METHODS,
    SELECT_METHODS,
    compress_visual_tokens,
    compress_visual_tokens_batched,
    num_targets,
)

# Every test runs with the similarity decisions in float64 and in refine (tests/compress/conftest.py).
pytestmark = pytest.mark.usefixtures("precision")

RATIOS = [0.0, 0.5, 2 / 3, 0.8]
LENGTHS = [7, 0, 1, 12, 33, 2]  # includes an empty span and a single token next to real work


def make_batch(lengths, d=5, seed=0, pad=1e3):
    """A padded batch ``(x [B, N, D], alpha [B, N], mask [B, N])`` that exercises every decision.

    A third of the tokens are power-of-two multiples of one of three random centres (bit-identical directions, so
    exact similarity ties between targets happen and must break to the earliest in both forms), the rest are
    noisy copies of a centre or pure noise (positives and negatives for igm). Alpha has one decimal, so alpha
    ties happen too. Padding holds ``pad``: a real batch's padding is not zero, and it must not matter.
    """
    g = torch.Generator().manual_seed(seed)
    b, n_max = len(lengths), max(lengths)
    centres = torch.randn(3, d, generator=g)
    which = torch.randint(0, 3, (b, n_max), generator=g)
    scale = 2.0 ** torch.randint(-1, 2, (b, n_max, 1), generator=g)
    noise = torch.randn(b, n_max, d, generator=g)
    kind = torch.randint(0, 3, (b, n_max, 1), generator=g)  # 0: exact multiple, 1: noisy copy, 2: noise
    x = torch.where(
        kind == 0, scale * centres[which], torch.where(kind == 1, centres[which] + 0.3 * noise, noise)
    )
    alpha = (torch.rand(b, n_max, generator=g) * 10).floor() / 10
    mask = torch.arange(n_max) < torch.tensor(lengths)[:, None]
    x = torch.where(mask[..., None], x, torch.full_like(x, pad))
    alpha = torch.where(mask, alpha, torch.full_like(alpha, 7.0))  # bigger than any real alpha
    return x, alpha, mask


def assert_matches_single(out, x, alpha, lengths, ratio, **kw):
    assert out.num_targets.tolist() == [num_targets(n, ratio) for n in lengths]
    m = out.tokens.shape[1]
    assert torch.equal(out.token_mask, torch.arange(m) < out.num_tokens[:, None])
    assert torch.equal(out.target_mask, torch.arange(out.target_index.shape[1]) < out.num_targets[:, None])
    for b, n in enumerate(lengths):
        ref = compress_visual_tokens(x[b, :n], alpha[b, :n], ratio, **kw)
        got = out.sample(b)
        assert torch.equal(got.target_index, ref.target_index), f"sample {b}"
        assert torch.equal(got.assignment, ref.assignment), f"sample {b}"
        assert got.has_compensation == ref.has_compensation, f"sample {b}"
        assert got.tokens.dtype == ref.tokens.dtype
        torch.testing.assert_close(got.weights, ref.weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.tokens, ref.tokens, rtol=1e-5, atol=1e-5)


def test_batch_exercises_every_decision():
    # Guard for the fixture: at R=0.5, igm sees positives and negatives, and ties in alpha and similarity.
    x, alpha, mask = make_batch(LENGTHS)
    out = compress_visual_tokens_batched(x, alpha, mask, 0.5)
    comp = out.num_targets[:, None]
    non_target = (out.assignment >= 0) & (out.weights < 1)
    assert ((out.assignment == comp) & mask).any()  # negatives: some compensation token
    assert (non_target & (out.assignment < comp)).any()  # positives: some non-target joins a target
    assert out.has_compensation.tolist().count(True) >= 2
    real = alpha[4, :33]
    assert real.unique().numel() < 33  # alpha ties within the 33-token sample


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("merge", MERGE_METHODS)
@pytest.mark.parametrize("select", SELECT_METHODS)
def test_batched_matches_single(select, merge, ratio):
    x, alpha, mask = make_batch(LENGTHS)
    out = compress_visual_tokens_batched(x, alpha, mask, ratio, select=select, merge=merge)
    assert_matches_single(out, x, alpha, LENGTHS, ratio, select=select, merge=merge)


@pytest.mark.parametrize("select", SELECT_METHODS)
def test_padding_values_do_not_matter(select):
    x, alpha, mask = make_batch(LENGTHS, pad=0.0)
    # Adversarial padding: every padding row copies its sample's first token (a cosine-1 neighbour for it, were
    # padding seen by turbo's redundancy or igm's similarity), with a large alpha (were it seen by selection/tau).
    junk_x = torch.where(mask[..., None], x, x[:, :1])
    junk_alpha = torch.where(mask, alpha, torch.full_like(alpha, 3.0))
    for merge in MERGE_METHODS:
        a = compress_visual_tokens_batched(x, alpha, mask, 0.5, select=select, merge=merge)
        b = compress_visual_tokens_batched(junk_x, junk_alpha, mask, 0.5, select=select, merge=merge)
        for field in ("tokens", "target_index", "assignment", "weights", "has_compensation", "num_targets"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (merge, field)


@pytest.mark.parametrize("ratio", RATIOS)
def test_output_padding_is_zero(ratio):
    """``BatchCompressionResult.tokens``: 'then padding (zeros)' (libra_train/compress/types.py)."""
    x, alpha, mask = make_batch(LENGTHS)
    for merge in MERGE_METHODS:
        out = compress_visual_tokens_batched(x, alpha, mask, ratio, merge=merge)
        assert (out.tokens[~out.token_mask] == 0).all(), merge


def test_turbo_tie_in_a_batch_matches_single():
    # Regression: a float32 batched GEMM rounded S[1, 2] and S[2, 1] differently in this batch layout
    # (0.65795171 vs 0.65795165), and the later token became the target.
    # Sample 1: x = [0, a, b], alpha = 0, R=0.5 -> N_t=2. Redundancy r = (0, cos(a, b), cos(b, a)) = (0, .658, .658);
    # the least mergeable are 0 and then the earliest of the tie, 1 -> targets [0, 1] (the single form agrees;
    # so does this sample batched alone). Sample 0 is ten arbitrary tokens.
    x = torch.zeros(2, 10, 5)
    x[0] = torch.arange(50.0).view(10, 5) % 7 - 3
    x[1, 1] = torch.tensor([0, 1.5, 1, 1, 1])
    x[1, 2] = torch.tensor([0, 0, 1, 1, 3.0])
    alpha, mask = torch.zeros(2, 10), torch.arange(10) < torch.tensor([[10], [3]])
    single = compress_visual_tokens(x[1, :3], alpha[1, :3], 0.5, select="turbo", merge="prune")
    assert single.target_index.tolist() == [0, 1]
    out = compress_visual_tokens_batched(x, alpha, mask, 0.5, select="turbo", merge="prune")
    assert out.sample(1).target_index.tolist() == [0, 1]


def test_theta_is_strict():
    # Sample 1 is test_select_merge.py::test_theta_is_strict's case: target [1, 0], token [3, 4] whose float32 cosine
    # with it is exactly float32(0.6). theta = that value: negative (compensation token); one step below: positive.
    x = torch.zeros(2, 3, 2)
    x[0] = torch.tensor([[1.0, 1], [0, 1], [1, 0]])
    x[1, :2] = torch.tensor([[1.0, 0], [3, 4]])
    alpha = torch.tensor([[0.2, 0.5, 0.3], [0.75, 0.25, 0.0]])
    mask = torch.arange(3) < torch.tensor([[3], [2]])
    cos = np.float32(0.6)
    neg = compress_visual_tokens_batched(x, alpha, mask, 0.5, theta=float(cos))
    pos = compress_visual_tokens_batched(x, alpha, mask, 0.5, theta=float(np.nextafter(cos, np.float32(0))))
    assert neg.sample(1).assignment.tolist() == [0, 1] and neg.has_compensation[1]
    assert pos.sample(1).assignment.tolist() == [0, 0] and not pos.has_compensation[1]
    torch.testing.assert_close(neg.sample(1).tokens, torch.tensor([[1.0, 0], [3, 4]]))


def test_batched_gradient_matches_single():
    # d sum(real tokens) / d x[b, j] = weight of j in its group; padding gets no gradient; alpha none at all.
    x, alpha, mask = make_batch(LENGTHS)
    x.requires_grad_(True)
    alpha.requires_grad_(True)
    out = compress_visual_tokens_batched(x, alpha, mask, 0.5)
    out.tokens[out.token_mask].sum().backward()
    assert alpha.grad is None
    assert (x.grad[~mask] == 0).all()
    torch.testing.assert_close(x.grad, out.weights[..., None].expand_as(x), rtol=1e-6, atol=1e-6)
    xs = x.detach()[3, :12].requires_grad_(True)
    compress_visual_tokens(xs, alpha.detach()[3, :12], 0.5).tokens.sum().backward()
    torch.testing.assert_close(x.grad[3, :12], xs.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("select", SELECT_METHODS)
@pytest.mark.parametrize("merge", MERGE_METHODS)
def test_bf16_input(select, merge):
    # x exactly representable in bf16, so both runs see the same float32 cosines and make the same decisions.
    x, alpha, mask = make_batch(LENGTHS)
    x32 = x.bfloat16().float()
    ref = compress_visual_tokens_batched(x32, alpha, mask, 0.5, select=select, merge=merge)
    out = compress_visual_tokens_batched(x32.bfloat16(), alpha, mask, 0.5, select=select, merge=merge)
    assert out.tokens.dtype == torch.bfloat16
    for field in ("target_index", "assignment", "weights", "has_compensation"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    # Merging accumulates in float32 and rounds once: the float32 result rounded to bf16, bit for bit.
    assert torch.equal(out.tokens, ref.tokens.bfloat16())
    torch.testing.assert_close(out.tokens.float(), ref.tokens, rtol=2**-8, atol=1e-6)
    # ... and the single-sample form agrees (bf16 in, bf16 out).
    single = compress_visual_tokens(x32[4, :33].bfloat16(), alpha[4, :33], 0.5, select=select, merge=merge)
    assert single.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(out.sample(4).tokens, single.tokens, rtol=2**-7, atol=1e-2)


def test_llava_sized_batch():
    # B=4, N=576 (LLaVA-1.5's visual tokens), D=64: interval + igm (libra) and topk + prune (fastv).
    lengths = [576, 400, 1, 0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 576, 64, generator=g)
    # Intervals are the pairs (2k, 2k+1). Every other pair is two similar tokens (the non-target is positive);
    # in the others the two are independent (the non-target is negative: 64-d random vectors have cos < 0.7).
    x[:, 1::4] = x[:, ::4] + 0.5 * torch.randn(4, 144, 64, generator=g)
    alpha = torch.rand(4, 576, generator=g)
    mask = torch.arange(576) < torch.tensor(lengths)[:, None]
    out = compress_visual_tokens_batched(x, alpha, mask, 0.5)
    assert out.num_targets.tolist() == [288, 200, 1, 0]
    assert out.tokens.shape == (4, 288 + out.has_compensation[:2].any().item(), 64)
    assert out.has_compensation[:2].all() and (out.assignment[:2] < out.num_targets[:2, None]).any()
    assert_matches_single(out, x, alpha, lengths, 0.5)
    # fastv: global top-k by alpha (ties earliest), an exact index select. Checked against a plain-Python ranking
    # instead of the single-sample form, whose per-group loop is slow at this size.
    fastv = compress_visual_tokens_batched(x, alpha, mask, 0.5, select="topk", merge="prune")
    for b, n in enumerate(lengths):
        a = alpha[b, :n].tolist()
        top = sorted(sorted(range(n), key=lambda j: (-a[j], j))[: num_targets(n, 0.5)])
        got = fastv.sample(b)
        assert got.target_index.tolist() == top
        assert torch.equal(got.tokens, x[b, top])


def test_all_empty_batch():
    x, alpha, mask = torch.zeros(3, 0, 4), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool)
    out = compress_visual_tokens_batched(x, alpha, mask, 0.5)
    assert out.num_targets.tolist() == [0, 0, 0] and out.tokens.shape == (3, 0, 4)
    assert not out.has_compensation.any()


def test_non_prefix_mask_raises():
    x, alpha = torch.randn(2, 4, 3), torch.rand(2, 4)
    for bad in ([[1, 1, 1, 1], [1, 0, 1, 0]], [[0, 1, 1, 1], [1, 1, 1, 1]]):
        with pytest.raises(ValueError, match="prefix"):
            compress_visual_tokens_batched(x, alpha, torch.tensor(bad, dtype=torch.bool), 0.5)


def test_invalid_arguments_raise():
    x, alpha, mask = torch.randn(2, 4, 3), torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="select"):
        compress_visual_tokens_batched(x, alpha, mask, 0.5, select="random")
    with pytest.raises(ValueError, match="merge"):
        compress_visual_tokens_batched(x, alpha, mask, 0.5, merge="sum")
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            compress_visual_tokens_batched(x, alpha, mask, ratio)
