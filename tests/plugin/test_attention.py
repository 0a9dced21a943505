"""Hybrid attention: the importance the plug-in records is the same row of the eager attention probabilities.

The reference is the model's own eager attention (``output_attentions=True``): layer ``l``'s probabilities
``[B, H, L, L]``, the query token rows, averaged over heads, then over query tokens.
"""

from __future__ import annotations

import pytest
import torch

from libra_train import LibraConfig, apply_libra, visual_span
from libra_train.plugin.attention import query_attention
from tests.plugin.conftest import IGNORE, collate, llava_sample, tiny_llama, tiny_llava


def _expected_rows(attentions: torch.Tensor, queries: list[list[int]]) -> torch.Tensor:
    """``attentions [B, H, L, L]`` -> ``[B, L]``: mean over heads, then over each sample's query rows."""
    return torch.stack([attentions[b][:, q].mean(0).mean(0) for b, q in enumerate(queries)])


def _label_queries(labels: torch.Tensor, first_only: bool = False) -> list[list[int]]:
    """The token before each answer span, written out per sample (independent of the plug-in's vectorised form)."""
    queries = []
    for row in labels.tolist():
        starts = [i - 1 for i in range(1, len(row)) if row[i] != IGNORE and row[i - 1] == IGNORE]
        queries.append(starts[:1] if first_only else starts)
    return queries


def _last_real(mask: torch.Tensor) -> list[list[int]]:
    return [[max(i for i, m in enumerate(row) if m)] for row in mask.tolist()]


SAMPLES = [
    llava_sample(3, 8, answers=((2, 4), (6, 8)), seed=0),  # two answer spans: two query tokens
    llava_sample(1, 4, answers=((2, 4),), seed=2),
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["answer_starts", "last_instruction", "inference"])
def test_importance_is_the_eager_attention_row(recorded_importance, attn, side, mode):
    batch = collate(SAMPLES, side)
    labels = batch.pop("labels")
    reference = tiny_llava("eager")
    attentions = reference(**batch, output_attentions=True).attentions  # 6 x [B, H, L, L]
    if mode == "inference":
        queries = _last_real(batch["attention_mask"])
    else:
        queries = _label_queries(labels, first_only=mode == "last_instruction")
        assert [len(q) for q in queries] == ([2, 1] if mode == "answer_starts" else [1, 1])

    query = mode if mode != "inference" else "answer_starts"
    model = apply_libra(tiny_llava(attn), LibraConfig(layers=[1, 3], ratio=0.5, query=query))
    model(**batch, **({} if mode == "inference" else {"labels": labels}))
    assert [r.layer for r in recorded_importance] == [1, 3]
    layer, alpha = recorded_importance[0][:2]
    torch.testing.assert_close(alpha, _expected_rows(attentions[1], queries), rtol=1e-5, atol=1e-7)
    assert torch.allclose(alpha.sum(1), torch.ones(2))  # a full softmax row: not renormalised over the image


@pytest.mark.parametrize("side", ["right", "left"])
def test_second_point_importance_is_the_compressed_attention_row(recorded_importance, side):
    """At the second point the sequence is compressed: compare with the eager probabilities of that layer."""
    batch = collate(SAMPLES, side)
    labels = batch.pop("labels")
    originals = _label_queries(labels)
    model = apply_libra(tiny_llava("eager"), LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9))
    out = model(**batch, labels=labels, output_attentions=True)
    (_, first, *_), (_, alpha, position_map, _) = recorded_importance
    assert alpha.shape[1] < first.shape[1]
    # the query tokens' places in the sequence the layer saw, through the map of that sequence
    queries = [[position_map[b].tolist().index(q) for q in qs] for b, qs in enumerate(originals)]
    torch.testing.assert_close(alpha, _expected_rows(out.attentions[3], queries), rtol=1e-5, atol=1e-7)

    recorded_importance.clear()  # the sdpa model records the same numbers
    apply_libra(tiny_llava("sdpa"), LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9))(**batch, labels=labels)
    torch.testing.assert_close(recorded_importance[1].alpha, alpha, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explicit_query_index_on_a_text_model(recorded_importance, attn):
    """A text LM with ``visual_span``: several explicit query tokens, left padding, GQA (4 heads, 2 kv heads)."""
    ids = torch.randint(4, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 5:13] = True
    query_index = torch.tensor([[14, 19, 16], [19, 15, 17]])
    attentions = tiny_llama("eager")(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model = apply_libra(tiny_llama(attn), LibraConfig(layers=[2], ratio=0.5))
    with visual_span(visual, query_index=query_index):
        model(input_ids=ids, attention_mask=mask)
    ((layer, alpha, *_),) = recorded_importance
    assert layer == 2
    torch.testing.assert_close(
        alpha, _expected_rows(attentions[2], query_index.tolist()), rtol=1e-5, atol=1e-7
    )
    assert torch.equal(alpha[1, :3], torch.zeros(3))  # padding gets no attention


# -- query_attention against a dense softmax -----------------------------------------------------------------
def _dense(query, key, scaling, query_index, query_mask, key_valid):
    bsz, heads, length, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # GQA: head h reads kv head h // group
    scores = query @ key.transpose(-1, -2) * scaling  # [B, H, L, L]
    allowed = torch.ones(length, length).tril().bool() & key_valid[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)  # [B, L, L]
    out = torch.zeros(bsz, length)
    for b in range(bsz):
        rows = [int(q) for q, m in zip(query_index[b], query_mask[b], strict=True) if m]
        out[b] = probs[b, rows].mean(0)
    return out


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_query_attention_matches_dense_softmax(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    bsz, length, dim = 3, 11, 8
    query = torch.randn(bsz, heads, length, dim, generator=g)
    key = torch.randn(bsz, kv_heads, length, dim, generator=g)
    key_valid = torch.ones(bsz, length, dtype=torch.bool)
    key_valid[1, :4] = False  # left padding
    key_valid[2, 8:] = False  # right padding
    query_index = torch.tensor([[10, 3, 7], [10, 6, 0], [7, 2, 0]])
    query_mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    got = query_attention(query, key, 0.3, query_index, query_mask, key_valid)
    expected = _dense(query, key, 0.3, query_index, query_mask, key_valid)
    assert got.dtype == torch.float32 and got.shape == (bsz, length)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not got.requires_grad


def test_query_attention_half_precision_is_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 9, 8, generator=g)
    key = torch.randn(2, 2, 9, 8, generator=g)
    index, qmask, valid = (
        torch.tensor([[8], [5]]),
        torch.ones(2, 1, dtype=torch.bool),
        torch.ones(2, 9).bool(),
    )
    got = query_attention(query.bfloat16(), key.bfloat16(), 0.35, index, qmask, valid)
    expected = _dense(query.bfloat16().float(), key.bfloat16().float(), 0.35, index, qmask, valid)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
