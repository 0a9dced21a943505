"""``method="pdrop"`` against the PyramidDrop reference (``pdrop_reference.py``, checked against the public code).

``apply_libra(tiny_llama, LibraConfig(method="pdrop", layers=[1, 3], keep_fractions=[0.5, 0.25]))`` is
PyramidDrop's ``layer_list=[2, 4]``, ``image_token_ratio_list=[0.5, 0.25]``: the same logits (1e-5) and kept
positions for inference with left or right padding, training with labels and right padding (loss, labels
through the position map), and greedy KV-cache decoding. Then each switch on its own: the next-layer
importance is the next layer's own attention row (GQA, Qwen3's q/k norms, M-RoPE), renumbered positions are
refused for M-RoPE, and the keep rule takes floors of the ORIGINAL count of each unit.
"""

from __future__ import annotations

import pytest
import torch

from libra_train import LibraConfig, apply_libra, visual_span
from libra_train.compress.schedule import kept_of_original
from libra_train.plugin import libra_runtime
from libra_train.plugin.loss import shift_labels_through_map
from libra_train.plugin.state import ForwardState
from tests.plugin.conftest import IGNORE, recorded_next_layer_importance, tiny_llama
from tests.plugin.family_models import collate_qwen, qwen_sample, tiny_qwen2_5_vl, tiny_qwen3_vl
from tests.plugin.pdrop_reference import pdrop_forward, pdrop_generate, reference_batch

REF_LAYERS, FRACTIONS = [2, 4], [0.5, 0.25]
PDROP = LibraConfig(method="pdrop", layers=[1, 3], keep_fractions=FRACTIONS)


def _visual(spans, shape) -> torch.Tensor:
    visual = torch.zeros(shape, dtype=torch.bool)
    for b, span in enumerate(spans):
        if span is not None:
            visual[b, span[0] : span[0] + span[1]] = True
    return visual


def _left(tensor: torch.Tensor, mask: torch.Tensor, fill=0) -> torch.Tensor:
    """Right-padded rows moved to the right end (left padding)."""
    out = torch.full_like(tensor, fill)
    for b, n in enumerate(mask.sum(1).tolist()):
        out[b, tensor.shape[1] - n :] = tensor[b, :n]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_inference_equals_pyramiddrop(attn, side):
    model = tiny_llama(attn)
    embeds, mask, _, spans = reference_batch(lengths=((3, 16, 9), (2, 17, 5), (4, 0, 7)))
    with torch.no_grad():
        ref = pdrop_forward(model, embeds, mask, spans, layers=REF_LAYERS, ratios=FRACTIONS, training=False)
    visual = _visual(spans, mask.shape)
    if side == "left":
        embeds, visual, mask = _left(embeds, mask), _left(visual, mask, False), _left(mask, mask)
    apply_libra(model, PDROP)
    with visual_span(visual), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask)
    assert [n.tolist() for n in libra_runtime(model).last_visual_tokens] == [
        [16, 17, 0],
        [8, 8, 0],
        [4, 4, 0],
    ]
    for b, n in enumerate(mask.sum(1).tolist()):
        offset = mask.shape[1] - n if side == "left" else 0
        real = out.libra_attention_mask[b]
        assert torch.equal(out.libra_position_map[b][real] - offset, ref.positions[-1][b])
        torch.testing.assert_close(
            out.logits[b][real], ref.logits[b, : int(real.sum())], rtol=1e-5, atol=1e-5
        )


def test_training_with_labels_equals_pyramiddrop():
    """Right padding, two answer spans in one sample, a text-only one: loss, and labels through the map."""
    model = tiny_llama("sdpa").train()
    embeds, mask, labels, spans = reference_batch()
    ref = pdrop_forward(model, embeds, mask, spans, labels, layers=REF_LAYERS, ratios=FRACTIONS)
    apply_libra(model, PDROP)
    with visual_span(_visual(spans, mask.shape)):
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    shifted = shift_labels_through_map(labels, out.libra_position_map)  # what each kept position predicts
    for b, kept in enumerate(ref.positions[-1]):
        n = kept.numel()
        assert torch.equal(out.libra_position_map[b][:n], kept)
        assert torch.equal(shifted[b, : n - 1], ref.labels[b, 1:n])  # PyramidDrop's labels, shifted
        torch.testing.assert_close(out.logits[b, :n], ref.logits[b, :n], rtol=1e-5, atol=1e-5)
    out.loss.backward()  # the ranking is detached; the kept tokens carry the gradient
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_cached_decoding_equals_pyramiddrop(attn):
    """A left-padded batch through ``generate``; each decode step's position continues the renumbered prefill
    (PyramidDrop decodes one sample at a time: its position ids break at batch 2)."""
    model = tiny_llama(attn)
    embeds, mask, _, spans = reference_batch(lengths=((3, 16, 5), (2, 16, 2)))
    new_tokens = 4
    tokens, step_logits, _ = pdrop_generate(
        model, embeds, mask, spans, layers=REF_LAYERS, ratios=FRACTIONS, max_new_tokens=new_tokens
    )
    apply_libra(model, PDROP)
    model.generation_config.eos_token_id = None
    visual = _left(_visual(spans, mask.shape), mask, False)
    with visual_span(visual), torch.no_grad():
        gen = model.generate(
            inputs_embeds=_left(embeds, mask),
            attention_mask=_left(mask, mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(gen.sequences, tokens)
    for got, want in zip(gen.logits, step_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stages = gen.past_key_values._libra_stages
    assert [s.removed.tolist() for s in stages] == [
        [8, 8],
        [12, 12],
    ]  # what each stage's positions were lowered by


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_renumbering_changes_what_later_layers_see(positions):
    """Only ``positions`` differs: the kept tokens are the same, the outputs are not (RoPE is relative)."""
    model = tiny_llama()
    embeds, mask, _, spans = reference_batch(lengths=((3, 16, 6),))
    apply_libra(model, LibraConfig(method="pdrop", layers=[1], keep_fractions=[0.5], positions=positions))
    with visual_span(_visual(spans, mask.shape)), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask)
        ref = pdrop_forward(model, embeds, mask, spans, layers=[2], ratios=[0.5], training=False)
    assert torch.equal(out.libra_position_map[0], ref.positions[-1][0])
    close = torch.allclose(out.logits[0], ref.logits[0], rtol=1e-5, atol=1e-5)
    assert close == (positions == "renumber")


# -- the next-layer importance -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build", [tiny_qwen2_5_vl, tiny_qwen3_vl], ids=["qwen2_5_vl-mrope-bias", "qwen3_vl-qk-norm"]
)
def test_next_layer_importance_is_the_next_layers_attention_row(build, monkeypatch):
    """Before layer ``l + 1`` runs, its own norm, q/k projections (biases, Qwen3's per-head q/k norms) and rotary
    (M-RoPE, mixed into cos/sin) on layer ``l``'s output: the row its eager attention then computes."""
    samples = [
        qwen_sample([("text", 3), ("image", (1, 8, 8)), ("text", 7)], seed=0),
        qwen_sample([("text", 2), ("image", (1, 8, 4)), ("text", 5)], seed=1),
    ]
    batch = collate_qwen(samples, "right")
    with torch.no_grad():
        attentions = build("eager")(**batch, output_attentions=True).attentions
    config = LibraConfig(method="fastv", layers=[1], ratio=0.5, importance="next_layer")
    alpha = recorded_next_layer_importance(build("sdpa"), config, batch, monkeypatch)
    last = batch["attention_mask"].sum(1) - 1
    expected = torch.stack([attentions[2][b].mean(0)[last[b]] for b in range(2)])  # layer 2, heads averaged
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


def test_next_layer_importance_replaces_the_layers_own(monkeypatch):
    """With ``importance="next_layer"`` the hybrid attention records nothing at the point."""
    recorded = []
    monkeypatch.setattr(ForwardState, "record_importance", lambda self, idx, *a: recorded.append(idx))
    model = apply_libra(tiny_llama(), PDROP)
    embeds, mask, _, spans = reference_batch()
    with visual_span(_visual(spans, mask.shape)), torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=mask)
    assert recorded == []


# -- config and refusals ----------------------------------------------------------------------------------------
def test_pdrop_preset():
    cfg = LibraConfig(method="pdrop", layers=[7, 15, 23])
    assert (cfg.select_method, cfg.merge_method, cfg.importance_source, cfg.position_rule) == (
        "topk",
        "prune",
        "next_layer",
        "renumber",
    )
    assert cfg.kept_fractions == [0.5, 0.25, 0.125]  # PyramidDrop's scripts (lambda 0.5)
    assert LibraConfig(method="pdrop", layers=[3, 7]).kept_fractions == [0.5, 0.25]
    assert LibraConfig(method="pdrop", layers=[1], positions="original").position_rule == "original"
    libra = LibraConfig()
    assert (libra.importance_source, libra.position_rule, libra.kept_fractions) == ("layer", "original", None)
    assert LibraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"importance": "previous"}, "importance"),
        ({"positions": "shifted"}, "positions"),
        ({"keep_fractions": [0.5]}, "1 values for 2 layers"),
        ({"keep_fractions": [0.25, 0.5]}, "none larger"),
        ({"keep_fractions": [0.5, 0.0]}, r"\(0, 1\]"),
    ],
)
def test_invalid_pdrop_switches(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LibraConfig(method="pdrop", layers=[1, 3], **kwargs)


def test_renumbering_is_refused_for_mrope():
    model = tiny_qwen2_5_vl()
    with pytest.raises(ValueError, match=r"M-RoPE.*positions=\"original\""):
        apply_libra(model, LibraConfig(method="pdrop", layers=[1]))
    assert libra_runtime(model) is None
    apply_libra(model, LibraConfig(method="pdrop", layers=[1], positions="original"))


def test_keep_rule_is_a_floor_of_each_units_original_count():
    """Two images in one sample (units of 16 and 11 tokens, text between): each keeps ``floor(N0 * f_k)`` of its
    own original N0 at every point: 9 and 6, then 5 and 3 (one span of 27 would keep 16, then 9)."""
    fractions = [0.6, 0.35]
    model = tiny_llama()
    ids = torch.randint(4, 64, (1, 36), generator=torch.Generator().manual_seed(0))
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 2:18] = visual[0, 21:32] = True  # 16 + 11 visual tokens, text between
    apply_libra(model, LibraConfig(method="pdrop", layers=[1, 3], keep_fractions=fractions))
    with visual_span(visual), torch.no_grad():
        out = model(input_ids=ids)
    counts = [[kept_of_original(n, f) for n in (16, 11)] for f in fractions]
    assert counts == [[9, 6], [5, 3]]
    kept = out.libra_position_map[0]
    assert [int(((kept >= 2) & (kept < 18)).sum()), int(((kept >= 21) & (kept < 32)).sum())] == counts[-1]
    assert [n.tolist() for n in libra_runtime(model).last_visual_tokens] == [[27], [15], [8]]


def test_labels_text_only_and_no_answer_samples_are_left_whole():
    model = apply_libra(tiny_llama().train(), PDROP)
    embeds, mask, labels, spans = reference_batch()
    labels[1] = IGNORE  # a sample without an answer: no query, not compressed
    with visual_span(_visual(spans, mask.shape)):
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    assert [n.tolist() for n in libra_runtime(model).last_visual_tokens] == [[16, 0, 0], [8, 0, 0], [4, 0, 0]]
    assert out.libra_attention_mask[1].sum() == mask[1].sum()
