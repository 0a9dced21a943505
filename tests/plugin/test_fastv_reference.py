"""FastV through the plug-in == an independent FastV written here, layer by layer, on the tiny Llama.

Reference (per sample, no padding): layers ``0..K`` on the full sequence; layer ``K``'s eager attention of the
last token, averaged over heads, ranks the visual tokens; the top ``round(N * (1 - R))`` (ties: earliest) and
all text tokens are kept with their ORIGINAL rotary positions; the remaining layers run on the short sequence
with a causal mask over a contiguous range; final norm + lm_head.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from libra_train import LibraConfig, apply_libra, visual_span
from tests.plugin.conftest import VOCAB, tiny_llama


@torch.no_grad()
def fastv_reference(model, ids: torch.Tensor, visual: torch.Tensor, k_layer: int, ratio: float):
    """FastV on one unpadded sample ``ids [L]`` with visual mask ``visual [L]``: ``(logits [L', V], kept [L'])``."""
    lm = model.model
    hidden = lm.embed_tokens(ids[None])  # [1, L, D]
    positions = torch.arange(ids.numel())[None]
    cos, sin = lm.rotary_emb(hidden, positions)
    mask = create_causal_mask(lm.config, hidden, None, None, position_ids=positions)
    for layer in lm.layers[: k_layer + 1]:
        if layer.self_attn.layer_idx == k_layer:  # the attention probabilities of this layer
            _, probs = layer.self_attn(
                layer.input_layernorm(hidden), position_embeddings=(cos, sin), attention_mask=mask
            )
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
    alpha = probs[0, :, -1].mean(0)  # [L]: last token's row, mean over heads

    vis = visual.nonzero().squeeze(1)
    n_keep = max(1, round(vis.numel() * (1 - ratio)))
    order = sorted(
        range(vis.numel()), key=lambda i: (-float(alpha[vis[i]]), i)
    )  # highest first, ties earliest
    keep_vis = {int(vis[i]) for i in order[:n_keep]}
    kept = torch.tensor([p for p in range(ids.numel()) if not visual[p] or p in keep_vis])

    hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]  # original rotary phases
    contiguous = torch.arange(kept.numel())[None]
    mask = create_causal_mask(lm.config, hidden, None, None, position_ids=contiguous)
    for layer in lm.layers[k_layer + 1 :]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=contiguous)
    return model.lm_head(lm.norm(hidden))[0], kept


def _samples():
    g = torch.Generator().manual_seed(0)
    lengths, spans = [26, 21], [(4, 20), (2, 18)]  # 16 visual tokens each, different text around them
    samples = []
    for length, (start, end) in zip(lengths, spans, strict=True):
        ids = torch.randint(4, VOCAB, (length,), generator=g)
        visual = torch.zeros(length, dtype=torch.bool)
        visual[start:end] = True
        samples.append((ids, visual))
    return samples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("k_layer", "ratio"), [(2, 0.5), (0, 0.5), (3, 0.75), (4, 0.5)])
def test_fastv_matches_reference_single(attn, k_layer, ratio):
    reference_model = tiny_llama("eager")
    model = apply_libra(tiny_llama(attn), LibraConfig(method="fastv", layers=[k_layer], ratio=ratio))
    for ids, visual in _samples():
        expected, kept = fastv_reference(reference_model, ids, visual, k_layer, ratio)
        assert kept.numel() < ids.numel()
        with visual_span(visual[None]), torch.no_grad():
            out = model(input_ids=ids[None])
        assert torch.equal(out.libra_position_map[0], kept)
        torch.testing.assert_close(out.logits[0, -1], expected[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_matches_reference_left_padded_batch(attn):
    """A left-padded batch of two prompts of different lengths: each sample equals its own reference."""
    k_layer, ratio = 2, 0.5
    samples = _samples()
    length = max(ids.numel() for ids, _ in samples)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    visual = torch.zeros(2, length, dtype=torch.bool)
    for b, (sample_ids, sample_visual) in enumerate(samples):
        n = sample_ids.numel()
        ids[b, length - n :], mask[b, length - n :], visual[b, length - n :] = sample_ids, 1, sample_visual
    model = apply_libra(tiny_llama(attn), LibraConfig(method="fastv", layers=[k_layer], ratio=ratio))
    with visual_span(visual), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    reference_model = tiny_llama("eager")
    for b, (sample_ids, sample_visual) in enumerate(samples):
        expected, kept = fastv_reference(reference_model, sample_ids, sample_visual, k_layer, ratio)
        real = out.libra_attention_mask[b]
        assert real[-kept.numel() :].all() and not real[: -kept.numel()].any()  # still left-padded
        assert torch.equal(out.libra_position_map[b][real] - (length - sample_ids.numel()), kept)
        torch.testing.assert_close(out.logits[b][real], expected, rtol=1e-5, atol=1e-5)
