"""Self-checks of the PyramidDrop reference (``pdrop_reference.py``), independent of the plug-in.

The reference itself was compared with the public PyramidDrop code run beside it (transformers 4.37.2; see
``docs/design-notes/issue-14.md``); these tests pin the properties that comparison relies on, against the
unmodified transformers model wherever one exists:

- keeping every token (lambda = 1) gives the unmodified model's logits and loss;
- the importance is layer ``l + 1``'s own attention row (eager ``output_attentions``) on layer ``l``'s output;
- the counts are ``int(N0 * r_k)`` of the original ``N0`` (not of the previous stage);
- the layers after a drop see renumbered positions (and would differ with the original ones);
- labels travel with their tokens; cached decoding equals the uncached forward.
"""

from __future__ import annotations

import pytest
import torch

from tests.plugin.conftest import VOCAB, tiny_llama
from tests.plugin.pdrop_reference import (
    IGNORE_INDEX,
    lambda_ratios,
    pdrop_forward,
    pdrop_generate,
    query_rows,
    stage_counts,
    visual_scores,
)

LAYERS, RATIOS = [2, 4], [0.5, 0.25]


def _batch(seed: int = 0, lengths=((3, 16, 9), (2, 16, 5), (4, 0, 7))):
    """Right-padded ``inputs_embeds`` [B, L, 32], mask, labels, spans: (prefix, visual, suffix) per sample.

    Text rows are the model's token embeddings, visual rows random features; labels supervise two answer spans
    in the first sample's suffix and one in the others' (text-only samples included).
    """
    g = torch.Generator().manual_seed(seed)
    model = tiny_llama()
    length = max(sum(parts) for parts in lengths)
    embeds = torch.zeros(len(lengths), length, 32)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    labels = torch.full((len(lengths), length), IGNORE_INDEX)
    spans = []
    for b, (prefix, n0, suffix) in enumerate(lengths):
        n = prefix + n0 + suffix
        ids = torch.randint(4, VOCAB, (n,), generator=g)
        with torch.no_grad():
            embeds[b, :n] = model.get_input_embeddings()(ids)
        embeds[b, prefix : prefix + n0] = torch.randn(n0, 32, generator=g)
        mask[b, :n] = 1
        answer = prefix + n0
        labels[b, answer + 1 : answer + 3] = ids[answer + 1 : answer + 3]
        if b == 0:
            labels[b, n - 3 : n - 1] = ids[n - 3 : n - 1]
        spans.append((prefix, n0) if n0 else None)
    return embeds, mask, labels, spans


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_keeping_everything_is_the_unmodified_model(attn, training):
    model = tiny_llama(attn)
    embeds, mask, labels, spans = _batch()
    with torch.no_grad():
        expected = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        out = pdrop_forward(
            model, embeds, mask, spans, labels, layers=LAYERS, ratios=lambda_ratios(1.0, 2), training=training
        )
    real = mask.bool()
    assert torch.equal(out.attention_mask, real)
    assert out.lengths == [mask.sum(1).tolist()] * 3
    torch.testing.assert_close(out.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_importance_is_the_next_layers_attention_row(training):
    """Facts 3-5: layer l+1's norm, q/k, rotary and softmax over all keys, heads averaged (GQA: 4 heads, 2 kv)."""
    model = tiny_llama("eager")
    embeds, mask, labels, spans = _batch()
    n = int(mask[0].sum())
    start, n0 = spans[0]
    with torch.no_grad():
        full = model(inputs_embeds=embeds[:1, :n], output_attentions=True, output_hidden_states=True)
    rows = query_rows(labels[0, :n], n - 1, training)
    assert len(rows) == (2 if training else 1)
    for point in (1, 3):  # rank before layer point + 1, on the output of layer point
        alpha = visual_scores(
            model.model.layers[point + 1],
            model.model.rotary_emb,
            full.hidden_states[point + 1][0],
            torch.arange(n),
            rows,
            start,
            n0,
        )
        attention = full.attentions[point + 1][0]  # [H, L, L] of the unmodified layer point + 1
        expected = attention.mean(0)[rows][:, start : start + n0].mean(0)
        torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-7)
        # and the forward drops by it: the top half of that row survives, in its original order
        with torch.no_grad():
            out = pdrop_forward(
                model,
                embeds[:1, :n],
                None,
                spans[:1],
                labels[:1, :n],
                layers=[point + 1],
                ratios=[0.5],
                training=training,
            )
        kept = out.positions[1][0]
        top = torch.sort(expected.topk(n0 // 2).indices).values + start
        assert torch.equal(kept[(kept >= start) & (kept < start + n0)], top)


def test_query_rows():
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX])
    assert query_rows(labels, 7, training=True) == [1, 4]  # the token before each answer run
    assert query_rows(labels, 7, training=False) == [7]
    assert query_rows(torch.full((5,), IGNORE_INDEX), 4, training=True) == []  # nothing supervised: no query


@pytest.mark.parametrize(
    ("n0", "ratios", "expected"),
    [
        (16, [0.5, 0.25], [16, 8, 4]),
        (17, [0.6, 0.36, 0.216], [17, 10, 6, 3]),  # floor
        (10, [0.55, 0.3025], [10, 5, 3]),  # of N0: chained it would be int(5 * 0.55) = 2
    ],
)
def test_stage_counts_are_floors_of_the_original_count(n0, ratios, expected):
    assert stage_counts(n0, ratios) == expected
    model = tiny_llama()
    embeds, mask, _, _ = _batch(lengths=((3, n0, 5),))
    layers = [1, 3, 5][: len(ratios)]
    with torch.no_grad():
        out = pdrop_forward(model, embeds, mask, [(3, n0)], layers=layers, ratios=ratios, training=False)
    assert [lengths[0] - 8 for lengths in out.lengths] == expected  # 8 text tokens never dropped
    for kept in out.positions:
        visual = kept[0][(kept[0] >= 3) & (kept[0] < 3 + n0)]
        assert torch.equal(kept[0], torch.sort(kept[0]).values)  # original order
        assert visual.numel() == len(kept[0]) - 8


def test_lambda_ratios_are_powers():
    assert lambda_ratios(0.5, 3) == [0.5, 0.25, 0.125]
    # a power is not always the typed decimal: int(125 * 0.6**3) = 26 but int(125 * 0.216) = 27
    assert stage_counts(125, lambda_ratios(0.6, 3))[-1] == 26
    assert stage_counts(125, [0.6, 0.36, 0.216])[-1] == 27


def test_labels_travel_with_their_tokens():
    model = tiny_llama().train()
    embeds, mask, labels, spans = _batch()
    with torch.no_grad():
        out = pdrop_forward(model, embeds, mask, spans, labels, layers=LAYERS, ratios=RATIOS)
    for b, kept in enumerate(out.positions[-1]):
        n = kept.numel()
        assert torch.equal(out.labels[b, :n], labels[b, kept])
        assert (out.labels[b, n:] == IGNORE_INDEX).all()
        assert int((out.labels[b] != IGNORE_INDEX).sum()) == int((labels[b] != IGNORE_INDEX).sum())
    assert out.lengths[-1] == [mask[0].sum() - 12, mask[1].sum() - 12, mask[2].sum()]  # 16 -> 4; text-only


def _by_hand(model, embeds, kept: torch.Tensor, layer: int, renumber: bool):
    """The unmodified model's own forward, its input to ``layer`` reduced to ``kept`` by forward pre-hooks.

    Layers from ``layer`` on get the rotary phases of ``0..len(kept) - 1`` (``renumber``) or of the kept tokens'
    original positions, and no mask (sdpa: causal by flag on the short unpadded sequence).
    """
    positions = torch.arange(kept.numel()) if renumber else kept
    rotary = model.model.rotary_emb(embeds, positions[None])

    def hook(module, args, kwargs):
        hidden = args[0][:, kept] if module is model.model.layers[layer] else args[0]
        contiguous = torch.arange(kept.numel())[None]
        return (hidden,), {
            **kwargs,
            "position_embeddings": rotary,
            "position_ids": contiguous,
            "attention_mask": None,
        }

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.model.layers[layer:]]
    try:
        with torch.no_grad():
            return model(inputs_embeds=embeds, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def test_layers_after_a_drop_see_renumbered_positions():
    model = tiny_llama("sdpa")
    embeds, mask, _, spans = _batch(lengths=((3, 16, 6),))
    with torch.no_grad():
        out = pdrop_forward(model, embeds, mask, spans, layers=[1], ratios=[0.5], training=False)
    kept = out.positions[1][0]
    assert kept.numel() == 25 - 8
    expected = _by_hand(model, embeds, kept, 1, renumber=True)
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-5, atol=1e-5)
    original = _by_hand(model, embeds, kept, 1, renumber=False)
    assert float((out.logits[0] - original).abs().max()) > 1e-3  # the positions do matter here


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decoding_equals_the_uncached_forward(attn):
    """Fact 13: decode positions continue the renumbered ones; the cache after a drop holds the short prefill.

    The uncached reference forward runs on prompt + generated tokens with the query pinned to the prompt's last
    token (``prompt_lengths``, the public code's ``prompt_len``), so it drops exactly what the prefill dropped.
    """
    model = tiny_llama(attn)
    embeds, mask, _, spans = _batch(lengths=((3, 16, 5), (2, 16, 2)))
    new_tokens = 4
    tokens, step_logits, prefill = pdrop_generate(
        model, embeds, mask, spans, layers=LAYERS, ratios=RATIOS, max_new_tokens=new_tokens
    )
    assert prefill.caches[0].get_seq_length(0) == 24 + new_tokens - 1
    assert prefill.caches[0].get_seq_length(LAYERS[-1]) == 24 - 12 + new_tokens - 1
    for b in range(2):
        n = int(mask[b].sum())
        for step in range(new_tokens):
            with torch.no_grad():
                generated = model.get_input_embeddings()(tokens[b : b + 1, :step])
            sequence = torch.cat([embeds[b : b + 1, :n], generated], 1)
            with torch.no_grad():
                out = pdrop_forward(
                    model,
                    sequence,
                    None,
                    spans[b : b + 1],
                    layers=LAYERS,
                    ratios=RATIOS,
                    training=False,
                    prompt_lengths=[n - 16],
                )
            assert torch.equal(out.positions[-1][0][: prefill.lengths[-1][b]], prefill.positions[-1][b])
            torch.testing.assert_close(step_logits[step][b], out.logits[0, -1], rtol=1e-5, atol=1e-5)
            assert int(out.logits[0, -1].argmax()) == int(tokens[b, step])


def test_bad_arguments_are_refused():
    model = tiny_llama()
    embeds, mask, _, spans = _batch()
    with pytest.raises(ValueError, match="one ratio each"):
        pdrop_forward(model, embeds, mask, spans, layers=[2, 4], ratios=[0.5])
    with pytest.raises(ValueError, match="right padding"):
        pdrop_forward(model, embeds, mask.flip(1), spans, layers=[2], ratios=[0.5])
