"""Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision (and Qwen2-VL video) through today's ``apply_libra``, unchanged.

The same equivalences as ``test_families.py`` / ``test_equivalence.py`` for each family and input kind
(images, video, both in one sample): the plug-in off is the unmodified model; a padded batch gives each sample
what it gets alone (inference left-padded, training right-padded with labels, loss sum-then-divide); cached greedy
generation equals the uncached forward with the same compression decision; the recorded importance is the eager
attention row of the unmodified model; gradient checkpointing changes nothing; compressed tokens keep their own
M-RoPE phase. The families' internals are written down in ``family_models.py``; the compression units of each
family are tested in ``test_units.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

from libra_train import LibraConfig, apply_libra
from libra_train.plugin import libra_runtime, visual_span
from libra_train.plugin.apply import find_decoder
from tests.plugin import flash_standin
from tests.plugin.conftest import IGNORE, assert_cached_generation_equals_uncached
from tests.plugin.family_models import (
    DEEPSTACK_LAYERS,
    IMAGE,
    OV_IMAGE,
    OV_VIDEO,
    VIDEO,
    collate_onevision,
    collate_qwen,
    onevision_counts,
    onevision_sample,
    qwen_sample,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from tests.plugin.flash_standin import assert_flash_equals_sdpa, set_language_attention

CFG = LibraConfig(
    layers=[1, 3], ratio=0.5, theta=0.9
)  # point 1 is Qwen3-VL's first allowed point (2 DeepStack)


@dataclass(frozen=True)
class Case:
    """A family and an input kind: how to build the model and two samples of different visual counts."""

    build: object
    samples: object  # (model) -> list of two samples with answers
    collate: object  # (samples, side, labels) -> batch
    visual_ids: tuple[int, ...]
    extra_zeros: tuple[str, ...] = ()  # [B, L] inputs to extend with zeros for each generated token


def _qwen(build, kinds, frames_as_runs=False):
    def samples(model):
        layouts = {
            "image": ([("image", (1, 8, 8))], [("image", (1, 8, 4))]),  # 16 and 8 tokens
            "video": ([("video", (2, 4, 4))], [("video", (4, 4, 4))]),  # 2 x 4 and 4 x 4 tokens
            "mixed": ([("image", (1, 4, 4)), ("text", 2), ("video", (2, 4, 4))], [("video", (2, 8, 4))]),
        }[kinds]
        return [
            qwen_sample(
                [("text", 3), *layouts[0], ("text", 7)],
                answers=((1, 3), (4, 6)),
                frames_as_runs=frames_as_runs,
                seed=0,
            ),
            qwen_sample(
                [("text", 2), *layouts[1], ("text", 5)],
                answers=((2, 4),),
                frames_as_runs=frames_as_runs,
                seed=1,
            ),
        ]

    return Case(build, samples, collate_qwen, (IMAGE, VIDEO), ("mm_token_type_ids",))


def _onevision(kind):
    def samples(model):
        if kind == "image":
            specs = [dict(image_size=(16, 32)), dict(image_size=(32, 32))]  # 52 and 88 tokens
        else:
            specs = [dict(frames=3), dict(frames=3)]  # 3 x 4 + 1 newline
        return [
            onevision_sample(model, 3, 7, answers=((1, 3), (4, 6)), seed=0, **specs[0]),
            onevision_sample(model, 2, 5 if kind == "image" else 9, answers=((2, 4),), seed=1, **specs[1]),
        ]

    return Case(tiny_llava_onevision, samples, collate_onevision, (OV_IMAGE, OV_VIDEO))


CASES = {
    "qwen2_vl-video": _qwen(tiny_qwen2_vl, "video"),
    "qwen2_5_vl-image": _qwen(tiny_qwen2_5_vl, "image"),
    "qwen2_5_vl-video": _qwen(tiny_qwen2_5_vl, "video"),
    "qwen2_5_vl-mixed": _qwen(tiny_qwen2_5_vl, "mixed"),
    "qwen3_vl-image": _qwen(tiny_qwen3_vl, "image", frames_as_runs=True),
    "qwen3_vl-video": _qwen(tiny_qwen3_vl, "video", frames_as_runs=True),
    "onevision-image": _onevision("image"),
    "onevision-video": _onevision("video"),
}


def _no_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _visual(batch: dict, case: Case) -> torch.Tensor:
    return torch.isin(batch["input_ids"], torch.tensor(case.visual_ids))


# -- what the plug-in relies on (the facts in family_models.py) -------------------------------------------------
@pytest.mark.parametrize("build", [tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl, tiny_llava_onevision])
def test_find_decoder_is_the_text_model(build):
    model = build()
    assert find_decoder(model) is model.model.language_model


def test_qwen2_5_vl_video_positions_are_time_scaled():
    """Temporal M-RoPE ids of a video step by ``tokens_per_second * second_per_grid_ts`` (images: by 1)."""
    model = tiny_qwen2_5_vl()
    sample = qwen_sample([("text", 2), ("video", (3, 4, 4)), ("text", 2)])
    positions, _ = model.model.get_rope_index(
        sample["input_ids"][None], sample["mm_token_type_ids"][None], video_grid_thw=sample["video_grid_thw"]
    )
    temporal = positions[0, 0][sample["input_ids"] == VIDEO]
    assert temporal.tolist() == [3] * 4 + [5] * 4 + [7] * 4  # start 3, tokens_per_second 2, 4 tokens a frame
    model3 = tiny_qwen3_vl()
    sample3 = qwen_sample([("text", 2), ("video", (3, 4, 4)), ("text", 2)], frames_as_runs=True)
    positions3, _ = model3.model.get_rope_index(
        sample3["input_ids"][None],
        sample3["mm_token_type_ids"][None],
        video_grid_thw=sample3["video_grid_thw"],
    )
    frames = positions3[0, 0][sample3["input_ids"] == VIDEO].view(3, 4)
    assert (frames == frames[:, :1]).all() and (frames[1:, 0] > frames[:-1, 0]).all()  # one run per frame


def test_onevision_visual_counts_and_newlines():
    """anyres: base tile (16) + un-padded grid with a newline per row; video: 2x2-pooled frames + one newline."""
    model = tiny_llava_onevision()
    counts, video = onevision_counts(model, [(16, 16), (16, 32), (32, 32)], frames=3)
    assert counts == [16 + 4 * 4 + 4, 16 + 4 * 8 + 4, 16 + 8 * 8 + 8]
    assert video == 3 * 4 + 1
    with torch.no_grad():
        feats = model.model.get_video_features(torch.randn(1, 3, 3, 16, 16), return_dict=True).pooler_output
    torch.testing.assert_close(feats[0, -1], model.model.image_newline)  # the last video token is the newline


# -- the plug-in off ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_disabled_is_the_unmodified_model(name):
    case = CASES[name]
    model = case.build()
    batch = _no_labels(case.collate(case.samples(model), "left"))
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected, expected_gen = model(**batch).logits, model.generate(**batch, **kwargs)
        apply_libra(model, LibraConfig(layers=[1, 3], enabled=False))
        out, gen = model(**batch), model.generate(**batch, **kwargs)
    assert torch.equal(out.logits, expected)
    assert "libra_position_map" not in out
    assert torch.equal(gen.sequences, expected_gen.sequences)
    for got, want in zip(gen.logits, expected_gen.logits, strict=True):
        assert torch.equal(got, want)


# -- batch invariance -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("side", "with_labels"), [("left", False), ("right", True)], ids=["infer", "train"])
def test_batched_equals_per_sample(name, side, with_labels):
    case = CASES[name]
    model = case.build()
    samples = case.samples(model)
    model = apply_libra(model, CFG)
    batch = case.collate(samples, side, labels=with_labels)
    counts = _visual(batch, case).sum(1)
    # different visual counts in one batch (OneVision stacks a batch's videos: same frames, different text)
    assert counts[0] != counts[1] or name == "onevision-video"
    total = int((batch["labels"][:, 1:] != IGNORE).sum()) if with_labels else None
    with torch.no_grad():
        out = model(**batch)
    kept = libra_runtime(model).last_visual_tokens
    assert torch.equal(kept[0], counts)
    assert (kept[-1] < counts).all() and out.logits.shape[1] < batch["input_ids"].shape[1]  # it compressed
    length, loss = batch["input_ids"].shape[1], 0.0
    for b, sample in enumerate(samples):
        single = case.collate([sample], side, labels=with_labels)
        with torch.no_grad():
            ref = model(**single, num_items_in_batch=total) if with_labels else model(**single)
        n = sample["input_ids"].numel()
        offset = length - n if side == "left" else 0
        real, alone = out.libra_attention_mask[b], ref.libra_attention_mask[0]  # alone: reserved slots too
        positions = out.libra_position_map[b][real]
        assert torch.equal(
            torch.where(positions >= 0, positions - offset, -1), ref.libra_position_map[0][alone]
        )
        torch.testing.assert_close(out.logits[b][real], ref.logits[0][alone], rtol=1e-5, atol=1e-5)
        if with_labels:
            loss = loss + ref.loss
    if with_labels:
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


# -- generation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_cached_generation_equals_uncached_forward(name):
    case = CASES[name]
    model = case.build()
    batch = _no_labels(case.collate(case.samples(model), "left"))
    model = apply_libra(model, CFG)
    gen = assert_cached_generation_equals_uncached(model, batch, 3, extra_zeros=case.extra_zeros)
    cache = gen.past_key_values
    assert len(cache._libra_stages) == 2
    assert cache.get_seq_length(CFG.layers[0] + 1) < cache.get_seq_length(0)  # the compressed KV cache


# -- importance -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_labels", [False, True], ids=["infer", "train"])
def test_importance_is_the_eager_attention_row(name, with_labels, recorded_importance):
    case = CASES[name]
    reference = case.build("eager")
    batch = case.collate(case.samples(reference), "right", labels=True)
    labels = batch.pop("labels")
    with torch.no_grad():
        attentions = reference(**batch, output_attentions=True).attentions  # per LLM layer [B, H, L, L]
    assert len(attentions) == 6
    if with_labels:
        queries = [
            [i - 1 for i in range(1, len(row)) if row[i] != IGNORE and row[i - 1] == IGNORE]
            for row in labels.tolist()
        ]
    else:
        queries = [[int(m.nonzero().max())] for m in batch["attention_mask"]]
    model = apply_libra(case.build("sdpa"), CFG)
    with torch.no_grad():
        model(**batch, **({"labels": labels} if with_labels else {}))
    first, _ = recorded_importance
    layer, alpha = first.layer, first.alpha
    assert layer == 1
    expected = torch.stack([attentions[1][b][:, q].mean(0).mean(0) for b, q in enumerate(queries)])
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)


# -- training ---------------------------------------------------------------------------------------------------
def _loss_and_grads(case: Case, checkpointing: bool):
    model = case.build()
    batch = case.collate(case.samples(model), "right", labels=True)
    model = apply_libra(model, CFG).train()
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["qwen2_5_vl-mixed", "qwen3_vl-video", "onevision-image", "onevision-video"])
def test_gradient_checkpointing_equals_plain_backward(name):
    plain, plain_grads = _loss_and_grads(CASES[name], False)
    ckpt, ckpt_grads = _loss_and_grads(CASES[name], True)
    assert torch.equal(plain.libra_position_map, ckpt.libra_position_map)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("language_model.layers.5" in key for key in plain_grads)
    assert any(
        "visual" in key or "vision_tower" in key for key in plain_grads
    )  # the tower is trained through
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


# -- M-RoPE phases after compression ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen2_5_vl-video", "qwen2_5_vl-mixed", "qwen3_vl-video"])
def test_compressed_tokens_keep_their_mrope_phase(name):
    """After a point, each surviving token's cos/sin are the rotary of its ORIGINAL 3-axis position.

    Qwen2.5-VL's video positions are time-scaled (``tokens_per_second``), Qwen3-VL's M-RoPE is interleaved; the
    compensation token takes the last visual position of its span.
    """
    case = CASES[name]
    model = case.build()
    batch = _no_labels(case.collate(case.samples(model), "left"))
    with torch.no_grad():
        full_positions, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"),
            attention_mask=batch["attention_mask"],
        )  # [3, B, L]
    assert not torch.equal(full_positions[0], full_positions[1])  # really multi-axis
    # one span per sample: its compensation token takes the sample's last visual position (checked below)
    model = apply_libra(model, LibraConfig(layers=[2], ratio=0.5, theta=0.95, unit="sample"))
    runtime, seen = libra_runtime(model), {}

    def capture(module, args, kwargs):
        seen.update(embeddings=kwargs["position_embeddings"], map=runtime.forward.position_map.clone())
        seen["valid"] = runtime.forward.valid.clone()

    decoder = model.model.language_model
    decoder.layers[3].register_forward_pre_hook(capture, with_kwargs=True)  # runs after Libra's own pre-hook
    with torch.no_grad():
        model(**batch)
    cos, _ = seen["embeddings"]
    visual = _visual(batch, case)
    for b in range(2):
        source = seen["map"][b].clone()
        last_visual = int(visual[b].nonzero().max())
        source[(source < 0) & seen["valid"][b]] = last_visual  # compensation tokens
        source[~seen["valid"][b]] = 0
        expected, _ = decoder.rotary_emb(cos, full_positions[:, b : b + 1, source])
        real = seen["valid"][b]
        torch.testing.assert_close(cos[b][real], expected[0][real], rtol=0, atol=1e-6)


# -- Qwen3-VL's DeepStack ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [[0, 3], [0]])
def test_qwen3_vl_point_before_the_last_deepstack_layer_is_refused(layers):
    """Such a point would break the forward inside ``Qwen3VLTextModel._deepstack_process`` (an IndexError: the
    full-length ``visual_pos_masks`` indexes the compressed hidden states), so ``apply_libra`` refuses it, naming
    the first allowed point, and leaves the model untouched."""
    model = tiny_qwen3_vl()
    with pytest.raises(ValueError, match=rf"(?i)deepstack.*first allowed point is {DEEPSTACK_LAYERS - 1}\b"):
        apply_libra(model, LibraConfig(layers=layers, ratio=0.5))
    assert libra_runtime(model) is None
    assert model.model.language_model.config._attn_implementation == "sdpa"
    apply_libra(model, LibraConfig(layers=[DEEPSTACK_LAYERS - 1], ratio=0.5))  # the first allowed point


def test_qwen3_vl_deepstack_features_reach_the_layers_before_the_point():
    """At point ``DEEPSTACK_LAYERS - 1`` every DeepStack addition happened before compression: dropping the
    DeepStack features (zeroed mergers) must change the compressed output."""
    case = CASES["qwen3_vl-image"]
    outputs = []
    for zero in (False, True):
        model = case.build()
        if zero:
            with torch.no_grad():
                for merger in model.model.visual.deepstack_merger_list:
                    for p in merger.parameters():
                        p.zero_()
        batch = _no_labels(case.collate(case.samples(model), "left"))
        apply_libra(model, LibraConfig(layers=[DEEPSTACK_LAYERS - 1], ratio=0.5))
        with torch.no_grad():
            outputs.append(model(**batch).logits)
    assert outputs[0].shape == outputs[1].shape
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)


# -- found while testing the families -----------------------------------------------------------------------------
def test_decoding_after_compression_removed_all_padding():
    """A left-padded pair whose compressed lengths are equal (sdpa): the stage's 2-D mask is all ones and
    ``create_causal_mask`` returns None for it; that None is still the stage's mask, not "no stage here" (before
    main's 1fbd4e0 the layer kept the full-length mask and sdpa raised a size mismatch at the first decode step;
    OneVision video, 23 and 24 tokens both compressed to 17, hit it in ``test_cached_generation_...``)."""
    from tests.plugin.conftest import tiny_llama

    model = apply_libra(tiny_llama("sdpa"), LibraConfig(method="fastv", layers=[2], ratio=0.5))
    ids = torch.randint(4, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, 0], mask[0, 0] = 0, 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 4:12] = True  # 20 real tokens, 8 visual: 16 after keeping round(8 * 0.5) = 4
    visual[1, 3:12] = True  # 21 real tokens, 9 visual: 16 after keeping round(9 * 0.5) = 4
    with visual_span(visual), torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).libra_attention_mask.all()  # no padding left
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert gen.shape == (2, 23)


# -- flash-attention 2 (the CPU stand-in of its kernels) ------------------------------------------------------------
FLASH_CASES = ["qwen2_5_vl-mixed", "onevision-image", "onevision-video"]


@pytest.mark.parametrize("name", FLASH_CASES)
@pytest.mark.parametrize(("side", "with_labels"), [("left", False), ("right", True)], ids=["infer", "train"])
def test_compressed_flash_equals_sdpa(name, side, with_labels, monkeypatch):
    """The language model on transformers' flash path (unpad, varlen kernel, pad back; M-RoPE cos/sin for
    Qwen2.5-VL) gives what sdpa gives with the units of each family: maps, logits, loss and gradients."""
    flash_standin.install(monkeypatch)
    case = CASES[name]
    sdpa = apply_libra(case.build(), CFG)
    fa2 = apply_libra(set_language_attention(case.build(), "flash_attention_2"), CFG)
    assert find_decoder(fa2).config._attn_implementation == "libra_flash_attention_2"
    batch = case.collate(case.samples(sdpa), side, labels=with_labels)
    assert_flash_equals_sdpa(fa2, sdpa, batch, labels=with_labels)


@pytest.mark.parametrize("name", ["qwen2_5_vl-mixed", "onevision-video"])
def test_flash_greedy_generation_equals_sdpa(name, monkeypatch):
    flash_standin.install(monkeypatch)
    case = CASES[name]
    ids = {}
    for backend in ("sdpa", "flash_attention_2"):
        model = apply_libra(set_language_attention(case.build(), backend), CFG)
        batch = _no_labels(case.collate(case.samples(model), "left"))
        with torch.no_grad():
            ids[backend] = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(ids["flash_attention_2"], ids["sdpa"])
    assert flash_standin.CALLS["flash_attn_varlen_func"] > 0
