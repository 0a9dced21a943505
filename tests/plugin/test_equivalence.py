"""The plug-in is invisible when it does nothing, reversible, and batch-invariant when it compresses.

- ``enabled=False`` / ``ratio=0``: the same logits (bit for bit) and the same generated ids as the unmodified model.
- ``apply_libra`` adds no parameter; ``remove_libra`` restores the model exactly; applying twice changes nothing.
- A padded batch (images and text-only samples mixed, right or left padding) gives each sample the logits and the
  loss it gets alone.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from libra_train import LibraConfig, apply_libra, remove_libra, visual_span
from libra_train.plugin import libra_runtime
from tests.plugin.conftest import (
    IMAGE_TOKEN,
    N_VISUAL,
    collate,
    llava_inputs,
    llava_sample,
    tiny_llama,
    tiny_llava,
)

ATTN = ["sdpa", "eager"]


def _no_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _mixed_samples() -> list[dict]:
    """Two image samples of different lengths (one with two answer spans) and a text-only one."""
    return [
        llava_sample(3, 7, answers=((2, 4), (5, 7)), seed=0),
        llava_sample(2, 5, image=False, answers=((1, 3),), seed=1),
        llava_sample(1, 4, answers=((2, 4),), seed=2),
    ]


# -- plug-in off ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "config",
    [LibraConfig(layers=[1, 3], enabled=False), LibraConfig(layers=[0, 2, 4], ratio=0.0)],
    ids=["disabled", "ratio0"],
)
def test_noop_config_gives_identical_logits(attn, side, config):
    model = tiny_llava(attn)
    batch = _no_labels(collate([llava_sample(3, 6, seed=0), llava_sample(1, 3, seed=1)], side))
    expected = model(**batch).logits
    apply_libra(model, config)
    out = model(**batch)
    assert out.logits.shape == expected.shape
    real = batch["attention_mask"].bool()
    if not config.enabled:
        assert torch.equal(out.logits, expected)
    # ratio 0 re-lays the sequence out: padding rows become zero vectors, so only real positions are identical
    assert torch.equal(out.logits[real], expected[real])
    if config.enabled:  # it did run the compression machinery, and kept everything
        positions = torch.arange(real.shape[1]).expand_as(real)
        assert torch.equal(out.libra_position_map, torch.where(real, positions, -1))
        assert [n.tolist() for n in libra_runtime(model).last_visual_tokens] == [[N_VISUAL] * 2] * 4


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    "config",
    [LibraConfig(layers=[1, 3], enabled=False), LibraConfig(layers=[0, 2, 4], ratio=0.0)],
    ids=["disabled", "ratio0"],
)
def test_noop_config_gives_identical_generation(attn, config):
    model = tiny_llava(attn)
    batch = _no_labels(collate([llava_sample(3, 5, seed=0), llava_sample(1, 3, seed=2)], "left"))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**batch, **kwargs)
    apply_libra(model, config)
    got = model.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(step_got, step_expected)


# -- apply / remove ------------------------------------------------------------------------------------------
def test_state_dict_unchanged_by_apply():
    model = tiny_llava()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_libra(model, LibraConfig(layers=[1, 3]))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in before.values())


@pytest.mark.parametrize("attn", ATTN)
def test_remove_restores_the_model(attn):
    model = tiny_llava(attn)
    batch = _no_labels(llava_inputs(pad=(0, 2)))
    configs = [
        model.config,
        model.config.text_config,
        model.config.vision_config,
        model.model.language_model.config,
    ]
    impls = [c._attn_implementation for c in configs]
    expected = model(**batch).logits

    apply_libra(model, LibraConfig(layers=[1, 3]))
    assert model.model.language_model.config._attn_implementation == f"libra_{attn}"
    compressed = model(**batch)
    assert compressed.logits.shape[1] < expected.shape[1]

    remove_libra(model)
    assert [c._attn_implementation for c in configs] == impls
    assert libra_runtime(model) is None
    assert "forward" not in vars(model)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert all(not hasattr(layer.self_attn, "_libra_runtime") for layer in model.model.language_model.layers)
    out = model(**batch)
    assert torch.equal(out.logits, expected)
    assert "libra_position_map" not in out

    apply_libra(
        model, LibraConfig(layers=[1, 3])
    )  # re-applicable after removal, same result as the first time
    assert torch.equal(model(**batch).logits, compressed.logits)


def test_remove_without_apply_warns():
    model = tiny_llava()
    with pytest.warns(UserWarning, match="not applied"):
        remove_libra(model)


def test_apply_twice_warns_and_changes_nothing():
    model = tiny_llava()
    batch = _no_labels(llava_inputs(pad=(0, 3)))
    apply_libra(model, LibraConfig(layers=[1, 3]))
    runtime, forward = libra_runtime(model), model.forward
    hooks = [dict(layer._forward_pre_hooks) for layer in model.model.language_model.layers]
    expected = model(**batch).logits
    with pytest.warns(UserWarning, match="already applied"):
        apply_libra(model, LibraConfig(method="fastv", layers=[2], ratio=0.75))
    assert libra_runtime(model) is runtime and model.forward is forward
    assert runtime.config.layers == [1, 3]
    assert [dict(layer._forward_pre_hooks) for layer in model.model.language_model.layers] == hooks
    assert torch.equal(model(**batch).logits, expected)
    remove_libra(model)  # one removal undoes it all
    assert libra_runtime(model) is None
    assert model.model.language_model.config._attn_implementation == "sdpa"


# -- batch invariance ----------------------------------------------------------------------------------------
def _real_rows(out, b: int, offset: int):
    """Logits and original positions (relative to the unpadded sample) of sample ``b``'s real output positions."""
    real = out.libra_attention_mask[b]
    position = out.libra_position_map[b][real]
    return out.logits[b][real], torch.where(position >= 0, position - offset, -1)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "config",
    [
        LibraConfig(layers=[1, 3], ratio=0.5),
        LibraConfig(layers=[0, 2], ratio=[0.75, 0.5], theta=0.95),  # more negatives: compensation tokens
        LibraConfig(method="fastv", layers=[2], ratio=0.5),
        LibraConfig(method="turbo", layers=[1], ratio=0.5),
    ],
    ids=["libra", "libra-comp", "fastv", "turbo"],
)
@pytest.mark.parametrize("with_labels", [True, False], ids=["train", "infer"])
def test_batched_equals_per_sample(attn, side, config, with_labels):
    samples = _mixed_samples()
    model = apply_libra(tiny_llava(attn), config)
    batch = collate(samples, side)
    if not with_labels:
        batch = _no_labels(batch)
    total = int((batch["labels"][:, 1:] != -100).sum()) if with_labels else None
    out = model(**batch)
    batched_counts = libra_runtime(model).last_visual_tokens
    length = batch["input_ids"].shape[1]
    assert out.logits.shape[1] < length  # it compressed

    sample_loss = 0.0
    for b, sample in enumerate(samples):
        single = collate([sample])
        if not with_labels:
            single = _no_labels(single)
        ref = model(**single, num_items_in_batch=total) if with_labels else model(**single)
        n = sample["input_ids"].numel()
        logits, positions = _real_rows(out, b, length - n if side == "left" else 0)
        ref_logits = ref.logits[0]
        if "libra_position_map" in ref:  # its real rows: a reserved compensation slot may be unused
            ref_logits, ref_positions = _real_rows(ref, 0, 0)
            assert [int(c[b]) for c in batched_counts] == [
                int(c[0]) for c in libra_runtime(model).last_visual_tokens
            ]
        else:  # text-only: not compressed, alone or in the batch
            assert sample["pixel_values"] is None
            ref_positions = torch.arange(n)
            assert all(int(c[b]) == 0 for c in batched_counts)
        assert torch.equal(positions, ref_positions)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        if with_labels:
            sample_loss = sample_loss + ref.loss
    if with_labels:  # sum-then-divide: the batch loss is the sum of per-sample token sums / all tokens
        torch.testing.assert_close(out.loss, sample_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("side", ["right", "left"])
def test_text_only_batch_is_untouched(attn, side):
    samples = [
        llava_sample(4, 6, image=False, answers=((2, 5),), seed=3),
        llava_sample(2, 3, image=False, answers=((1, 3),), seed=4),
    ]
    batch = collate(samples, side)
    assert "pixel_values" not in batch
    model = tiny_llava(attn)
    expected = model(**batch)
    apply_libra(model, LibraConfig(layers=[1, 3]))
    out = model(**batch)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)
    assert "libra_position_map" not in out


def test_image_sample_without_a_later_query_is_not_compressed():
    """An answer before the image: the query cannot see the image, so the sample is left whole."""
    model = tiny_llava()
    before_image = llava_sample(5, 3, answers=(), seed=5)
    before_image["labels"][2:4] = before_image["input_ids"][2:4]
    batch = collate([before_image])
    expected = model(**batch)
    apply_libra(model, LibraConfig(layers=[1, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(**batch)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.loss, expected.loss)


def _two_image_sample(seed: int, prefix: int, middle: int, suffix: int) -> dict:
    """Two images (32 visual tokens in two runs) in one sample; ``pixel_values`` is ``[2, 3, 16, 16]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (prefix + middle + suffix + 2 * N_VISUAL,), generator=g)
    ids[prefix : prefix + N_VISUAL] = IMAGE_TOKEN
    ids[prefix + N_VISUAL + middle : prefix + 2 * N_VISUAL + middle] = IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[-3:-1] = ids[-3:-1]
    return {"input_ids": ids, "labels": labels, "pixels": torch.randn(2, 3, 16, 16, generator=g)}


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_per_sample_with_two_images(side):
    """Several visual runs in one sample form one visual span; the batch still equals each sample alone."""
    samples = [_two_image_sample(0, 2, 3, 5), _two_image_sample(1, 1, 2, 4)]
    model = apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9))
    batch = collate([{**s, "pixel_values": None} for s in samples], side)
    batch["pixel_values"] = torch.cat([s["pixels"] for s in samples])
    out = model(**batch)
    assert [int(c[0]) for c in libra_runtime(model).last_visual_tokens][:2] == [2 * N_VISUAL, 17]
    total = int((batch["labels"][:, 1:] != -100).sum())
    length, loss = batch["input_ids"].shape[1], 0.0
    for b, sample in enumerate(samples):
        single = collate([{**sample, "pixel_values": None}])
        ref = model(**single, pixel_values=sample["pixels"], num_items_in_batch=total)
        n = sample["input_ids"].numel()
        logits, positions = _real_rows(out, b, length - n if side == "left" else 0)
        assert torch.equal(positions, ref.libra_position_map[0])
        torch.testing.assert_close(logits, ref.logits[0], rtol=1e-5, atol=1e-5)
        loss = loss + ref.loss
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_compressed_tokens_keep_their_original_rotary_phase(side):
    """Targets keep their own position; a compensation token takes the last position of the span it came from.

    With two points the layout is ``[..., targets, comp of point 2, comp of point 1, text ...]``: point 2's
    compensation token sits at the last position of the span point 2 compressed (the last point-1 target), point
    1's (carried unchanged) at the last original visual position.
    """
    model = apply_libra(tiny_llava(), LibraConfig(layers=[0, 2], ratio=[0.75, 0.5], theta=0.95))
    batch = _no_labels(collate([llava_sample(3, 6, seed=0), llava_sample(1, 3, seed=1)], side))
    rotary = model.model.language_model.rotary_emb
    runtime = libra_runtime(model)
    seen = {}

    def capture(idx, module, args, kwargs):
        state = runtime.forward
        seen[idx] = (
            kwargs["position_embeddings"],
            state.position_map.clone(),
            state.visual.clone(),
            state.valid,
        )

    layers = model.model.language_model.layers
    for idx in (1, 3):  # right after each point, after Libra's own pre-hook
        layers[idx].register_forward_pre_hook(functools.partial(capture, idx), with_kwargs=True)
    with torch.no_grad():
        model(**batch)

    last_visual = [int((ids == IMAGE_TOKEN).nonzero().max()) for ids in batch["input_ids"]]
    (_, map1, visual1, _), ((cos, sin), map2, _, valid2) = seen[1], seen[3]
    for b in range(2):
        comp = (map2[b] < 0) & valid2[b]
        assert int(comp.sum()) == 2  # one compensation token per point in this setting
        last_target = int(map1[b][visual1[b]].max())  # the last token of the span point 2 compressed
        expected = map2[b].clone()
        expected[comp] = torch.tensor([last_target, last_visual[b]])
        expected[~valid2[b]] = 0
        ref_cos, ref_sin = rotary(cos, expected[None])
        torch.testing.assert_close(cos[b][valid2[b]], ref_cos[0][valid2[b]], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[b][valid2[b]], ref_sin[0][valid2[b]], rtol=0, atol=1e-6)


def test_last_visual_tokens_describe_the_last_forward():
    """After a text-only forward the counts of an earlier image batch must not linger (they would be misread)."""
    model = apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5))
    model(**_no_labels(collate([llava_sample(3, 7, seed=0), llava_sample(1, 4, seed=2)])))
    assert [c.tolist() for c in libra_runtime(model).last_visual_tokens] == [[16, 16], [8, 8], [4, 4]]
    model(**_no_labels(collate([llava_sample(3, 7, image=False, seed=0)])))
    counts = libra_runtime(model).last_visual_tokens
    assert counts is None or all(c.tolist() == [0] for c in counts), counts


# -- calling conventions -------------------------------------------------------------------------------------
def test_return_dict_false_gives_the_tuple():
    """``return_dict=False`` (plain tuple outputs) works as on the unmodified model: ``(loss, logits, ...)``."""
    model = apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5))
    batch = collate([llava_sample(3, 7, seed=0), llava_sample(1, 4, seed=2)])
    expected = model(**batch)
    out = model(**batch, return_dict=False)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], expected.loss)
    assert torch.equal(out[1], expected.logits)


def test_positional_attention_mask_is_used():
    """``model(input_ids, attention_mask)`` passes the padding mask positionally: it must not be ignored."""
    model = apply_libra(tiny_llama(), LibraConfig(layers=[1], ratio=0.5))
    ids = torch.randint(4, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 6:14] = True
    with visual_span(visual):
        expected = model(input_ids=ids, attention_mask=mask)
        out = model(ids, mask)
    assert out.libra_attention_mask.sum(1).tolist() == expected.libra_attention_mask.sum(1).tolist()
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)


def test_deepcopy_of_a_patched_model_runs_the_copy():
    """A deep copy (EMA, trl reference models) is an independent patched model, not a window on the original."""
    config = LibraConfig(layers=[1, 3], ratio=0.5)
    original = apply_libra(tiny_llava(), config)
    batch = _no_labels(collate([llava_sample(3, 5, answers=(), seed=0)]))
    before = original(**batch).logits
    clone = copy.deepcopy(original)
    expected_model = apply_libra(tiny_llava(), config)
    with torch.no_grad():
        for model in (clone, expected_model):
            model.lm_head.weight.mul_(2.0)
    torch.testing.assert_close(clone(**batch).logits, expected_model(**batch).logits, rtol=0, atol=0)
    torch.testing.assert_close(original(**batch).logits, before, rtol=0, atol=0)
    assert libra_runtime(clone) is not libra_runtime(original)
    remove_libra(clone)  # removing the copy's plug-in leaves the original's in place
    torch.testing.assert_close(original(**batch).logits, before, rtol=0, atol=0)
    assert libra_runtime(original) is not None
