"""Sliding-window attention layers under compression: Qwen2-VL with ``use_sliding_window`` (layers from
``max_window_layers`` on slide) and a Mistral-style LLaVA (``sliding_window`` set, every layer slides).

A sliding layer's query ``i`` sees keys ``i - W < j <= i``. Before a compression point that is the model's own
mask; after it the plug-in rebuilds each layer's mask over the compressed sequence, a sliding layer's as the
query's last ``W`` *real* tokens (unused compensation slots are holes between them), which is what the flash
kernels' ``window_size`` does on the unpadded tokens. Checked against the real things: the unmodified eager
model's attention row (importance at a sliding point, the layer's own and PyramidDrop's next-layer one), the
eager attention probabilities of the compressed layers, the flash-attention 2 code path (the CPU stand-in of its
kernels, which gets the window from the attention's ``sliding_window`` kwarg) and cached generation, where layers
before the first point keep transformers' ``DynamicSlidingWindowLayer`` caches and the later ones cache whole.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

from libra_train import LibraConfig, apply_libra
from libra_train.plugin import libra_runtime
from libra_train.plugin.families import layer_windows
from libra_train.plugin.state import ForwardState
from tests.plugin import flash_standin
from tests.plugin.conftest import (
    IMAGE_TOKEN,
    TEXT_KWARGS,
    assert_cached_generation_equals_uncached,
    collate,
    llava_sample,
    recorded_next_layer_importance,
    tiny_clip_config,
)
from tests.plugin.family_models import collate_qwen, qwen_sample, tiny_qwen2_vl
from tests.plugin.flash_standin import assert_flash_equals_sdpa, set_language_attention

WINDOW = 10  # shorter than every sequence below (26-31 tokens) and than the compressed ones
SLIDING_FROM = 3  # Qwen2-VL: layers 3, 4, 5 slide (max_window_layers=3), layers 0-2 attend to everything


def qwen_sliding(attn: str = "sdpa"):
    return tiny_qwen2_vl(attn, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=SLIDING_FROM)


def llava_mistral(
    attn: str = "sdpa", seed: int = 0, window: int | None = WINDOW
) -> LlavaForConditionalGeneration:
    """The tiny LLaVA with a Mistral text model: no ``layer_types``, every layer slides (``sliding_window``)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=tiny_clip_config(),
        text_config=MistralConfig(**TEXT_KWARGS, sliding_window=window),
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def qwen_batch(side: str, labels: bool = False, seed: int = 0) -> dict:
    samples = [  # 28 and 23 tokens: 16 and 8 visual tokens
        qwen_sample([("text", 3), ("image", (1, 8, 8)), ("text", 7)], answers=((1, 3), (4, 6)), seed=seed),
        qwen_sample([("text", 2), ("image", (1, 8, 4)), ("text", 9)], answers=((2, 4),), seed=seed + 1),
    ]
    return collate_qwen(samples, side, labels=labels)


def llava_batch(side: str, labels: bool = False) -> dict:
    batch = collate([llava_sample(3, 7, seed=0), llava_sample(5, 10, seed=1)], side)  # 26 and 31 tokens
    return batch if labels else {k: v for k, v in batch.items() if k != "labels"}


MODELS = {"qwen2_vl": (qwen_sliding, qwen_batch), "llava-mistral": (llava_mistral, llava_batch)}


def _windows(name: str) -> tuple:
    return (None,) * SLIDING_FROM + (WINDOW,) * 3 if name == "qwen2_vl" else (WINDOW,) * 6


@pytest.mark.parametrize("name", list(MODELS))
def test_windows_are_the_ones_the_layers_use(name):
    build, _ = MODELS[name]
    model = apply_libra(build(), LibraConfig(layers=[1, 3], ratio=0.5))
    windows = libra_runtime(model).windows
    assert windows == _windows(name)
    if name == "qwen2_vl":  # Qwen2-VL's attention holds its own window (None on full layers)
        layers = model.model.language_model.layers
        assert windows == tuple(layer.self_attn.sliding_window for layer in layers)
    plain = apply_libra(tiny_qwen2_vl(), LibraConfig(layers=[1, 3], ratio=0.5))
    assert libra_runtime(plain).windows == (None,) * 6  # use_sliding_window=False (the released configs)


@pytest.mark.parametrize("name", list(MODELS))
def test_importance_at_a_sliding_point_is_the_eager_attention_row(name, recorded_importance):
    """The point's query sees only the last ``W`` keys: the part of the image outside them gets no importance."""
    build, make_batch = MODELS[name]
    batch = make_batch("right")
    with torch.no_grad():
        attentions = build("eager")(**batch, output_attentions=True).attentions
    model = apply_libra(build(), LibraConfig(layers=[3, 4], ratio=0.5))
    with torch.no_grad():
        model(**batch)
    alpha = recorded_importance[0].alpha  # at point 3
    last = batch["attention_mask"].sum(1) - 1
    expected = torch.stack([attentions[3][b].mean(0)[last[b]] for b in range(2)])
    assert (expected[0, : int(last[0]) - WINDOW + 1] == 0).all()  # the window cuts through the image
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


def test_next_layer_importance_of_a_sliding_layer_is_its_attention_row(monkeypatch):
    """PyramidDrop's importance (the row the next layer will compute) honours that layer's window."""
    batch = qwen_batch("right")
    with torch.no_grad():
        attentions = qwen_sliding("eager")(**batch, output_attentions=True).attentions
    config = LibraConfig(method="fastv", layers=[2], importance="next_layer")
    alpha = recorded_next_layer_importance(qwen_sliding(), config, batch, monkeypatch)
    last = batch["attention_mask"].sum(1) - 1
    expected = torch.stack([attentions[SLIDING_FROM][b].mean(0)[last[b]] for b in range(2)])
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_sliding_layers_attend_within_their_window(name, monkeypatch, recorded_importance):
    """Eager attention probabilities after point 1 (sequence shortened): a sliding layer gives 0 to every key
    ``W`` or more tokens back in the compressed sequence, a full layer does not; and the importance recorded at
    the sliding point 3 is that compressed layer's own eager row."""
    build, make_batch = MODELS[name]
    batch = make_batch("right")
    stage_valid = {}
    compress = ForwardState.compress

    def compressed(self, layer_idx, *args, **kwargs):
        hidden = compress(self, layer_idx, *args, **kwargs)
        stage_valid[layer_idx] = self.valid.clone()  # [B, L'] real tokens of the layers from layer_idx on
        return hidden

    monkeypatch.setattr(ForwardState, "compress", compressed)
    model = apply_libra(build("eager"), LibraConfig(layers=[1, 3], ratio=0.5))
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert WINDOW < out.attentions[4].shape[-1] < out.attentions[2].shape[-1] < batch["input_ids"].shape[1]
    # Here a real token follows a hole (an unused compensation slot): slots are not tokens.
    if name == "llava-mistral":
        assert (stage_valid[2].long().diff(dim=1) > 0).any()
    for layer, window in enumerate(_windows(name)):
        if layer < 2:
            continue
        rank = stage_valid[2 if layer < 4 else 4].long().cumsum(1)  # [B, L'] real tokens up to each slot
        far = rank[:, :, None] - rank[:, None, :] >= WINDOW  # [B, L', L'] query, key: W+ real tokens apart
        probs = out.attentions[layer]  # [B, H, L', L']
        beyond = probs.masked_select(far[:, None])
        if window is None:
            assert beyond.abs().sum() > 0, f"full layer {layer} ignores keys {WINDOW}+ tokens back"
        else:
            assert (beyond == 0).all(), f"sliding layer {layer} attends beyond its window"
    assert [r.layer for r in recorded_importance] == [1, 3]
    alpha, query_index = recorded_importance[1].alpha, recorded_importance[1].query_index  # [B, L'], [B, 1]
    expected = torch.stack([out.attentions[3][b].mean(0)[query_index[b, 0]] for b in range(2)])
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("side", "with_labels"), [("left", False), ("right", True)], ids=["infer", "train"])
def test_compressed_flash_equals_sdpa_with_sliding_layers(name, side, with_labels, monkeypatch):
    """The flash path applies the window in its kernel (``window_size`` from the layer's ``sliding_window``),
    sdpa through the mask the plug-in rebuilds: the same logits, loss and gradients."""
    flash_standin.install(monkeypatch)
    build, make_batch = MODELS[name]
    config = LibraConfig(layers=[1, 3], ratio=0.5)
    sdpa = apply_libra(build(), config)
    fa2 = apply_libra(set_language_attention(build(), "flash_attention_2"), config)
    assert_flash_equals_sdpa(fa2, sdpa, make_batch(side, labels=with_labels), labels=with_labels)


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_generation_with_sliding_caches_equals_uncached(name):
    """Sliding layers before the first point keep transformers' ``DynamicSlidingWindowLayer`` (the last ``W - 1``
    keys); those after it cache their compressed prefill whole, the mask applying the window over real tokens."""
    build, make_batch = MODELS[name]
    model = apply_libra(build(), LibraConfig(layers=[1, 3], ratio=0.5))
    # (qwen: samples whose greedy tokens are text, not a vision placeholder id of the tiny vocabulary)
    batch = qwen_batch("left", seed=2) if name == "qwen2_vl" else make_batch("left")
    extra = ("mm_token_type_ids",) if name == "qwen2_vl" else ()
    gen = assert_cached_generation_equals_uncached(model, batch, 4, extra_zeros=extra)
    cache = gen.past_key_values
    assert len(cache._libra_stages) == 2
    windows = _windows(name)
    assert cache.is_sliding == [w is not None and i <= 1 for i, w in enumerate(windows)]  # point 1
    for i, window in enumerate(windows):
        held = cache.layers[i].keys.shape[2]
        if window is not None and i <= 1:
            assert held == WINDOW - 1  # the window cache dropped keys
        elif i >= 2:
            assert held == cache.get_seq_length(i) > WINDOW  # the whole compressed sequence


def test_other_layer_types_are_refused():
    """Chunked or linear attention layers (Llama 4, Qwen3-Next) have masks the plug-in does not rebuild."""
    config = SimpleNamespace(sliding_window=None, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match=r"\['chunked_attention'\].*not supported"):
        layer_windows(config, 2)
    assert layer_windows(SimpleNamespace(sliding_window=8, layer_types=None), 2) == (8, 8)  # Mistral's rule


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_window_longer_than_the_sequence_is_the_full_model(side):
    """Mistral-style configs set a window (4096) longer than most sequences: then the compressed model is the one
    without a window (the same weights), on the plain causal mask."""
    config = LibraConfig(layers=[1, 3], ratio=0.5)
    batch = llava_batch(side, labels=side == "right")
    windowed = apply_libra(llava_mistral(window=4096), config)
    plain = apply_libra(llava_mistral(window=None), config)
    assert libra_runtime(windowed).windows == (4096,) * 6 and libra_runtime(plain).windows == (None,) * 6
    with torch.no_grad():
        got, want = windowed(**batch), plain(**batch)
    real = want.libra_attention_mask
    assert torch.equal(got.libra_position_map, want.libra_position_map)
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-5, atol=1e-6)
