"""The hybrid attention on every attention backend: flash-attention 2 (through a CPU stand-in), flex, sdpa, eager.

transformers' flash path (``integrations/flash_attention.py`` -> ``_flash_attention_forward``: unpad with the
2-D mask, varlen kernel with int32 ``cu_seqlens``, pad back) runs for real here; only the two CUDA kernels are
replaced by the pure-torch stand-in of ``flash_standin.py``, checked first against sdpa on the unmodified
model. With Libra / FastV applied, flash must give what sdpa gives: compressed logits, position maps, loss,
gradients and greedy generation with left padding.
"""

from __future__ import annotations

import pytest
import torch

from libra_train import LibraConfig, apply_libra
from libra_train.plugin import libra_runtime
from libra_train.plugin.attention import supported_backends
from tests.plugin import flash_standin
from tests.plugin.conftest import collate, llava_sample, tiny_llava

CONFIGS = {
    "libra": LibraConfig(layers=[1, 3], ratio=0.5),
    "libra-comp": LibraConfig(layers=[0, 2], ratio=[0.75, 0.5], theta=0.95),  # compensation tokens
    "fastv": LibraConfig(method="fastv", layers=[2], ratio=0.5),
}


def _set_language_attention(model, name: str):
    """Switch the LLM's attention backend after construction (a flash model cannot be built without a GPU)."""
    decoder = model.model.language_model
    for config in {id(m.config): m.config for m in decoder.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = name
    return model


def _mixed(side: str, labels: bool = True) -> dict:
    samples = [
        llava_sample(3, 7, answers=((2, 4), (5, 7)), seed=0),
        llava_sample(2, 5, image=False, answers=((1, 3),), seed=1),
        llava_sample(1, 4, answers=((2, 4),), seed=2),
    ]
    batch = collate(samples, side)
    if not labels:
        del batch["labels"]
    return batch


@pytest.fixture
def flash(monkeypatch):
    flash_standin.install(monkeypatch)
    return flash_standin.CALLS


@pytest.mark.parametrize("side", ["right", "left"])
def test_standin_flash_equals_sdpa_on_the_unmodified_model(flash, side):
    batch = _mixed(side, labels=False)
    with torch.no_grad():
        expected = tiny_llava("sdpa")(**batch).logits
        got = _set_language_attention(tiny_llava("sdpa"), "flash_attention_2")(**batch).logits
    assert flash["flash_attn_varlen_func"] > 0  # the padded batch went through unpad + varlen
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_compressed_flash_equals_sdpa(flash, side, method):
    batch = _mixed(side)
    sdpa = apply_libra(tiny_llava("sdpa"), CONFIGS[method])
    fa2 = apply_libra(_set_language_attention(tiny_llava("sdpa"), "flash_attention_2"), CONFIGS[method])
    assert fa2.model.language_model.config._attn_implementation == "libra_flash_attention_2"
    expected, got = sdpa(**batch), fa2(**batch)
    assert flash["flash_attn_varlen_func"] > 0
    assert got.logits.shape[1] < batch["input_ids"].shape[1]  # it compressed
    assert torch.equal(got.libra_position_map, expected.libra_position_map)
    assert torch.equal(got.libra_attention_mask, expected.libra_attention_mask)
    real = got.libra_attention_mask
    torch.testing.assert_close(got.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
    expected.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(sdpa.named_parameters(), fa2.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["libra", "fastv"])
def test_flash_greedy_generation_with_left_padding_equals_sdpa(flash, method):
    batch = _mixed("left", labels=False)
    ids = {}
    for name in ("sdpa", "flash_attention_2"):
        model = apply_libra(_set_language_attention(tiny_llava("sdpa"), name), CONFIGS[method])
        with torch.no_grad():
            ids[name] = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert libra_runtime(model) is not None
    assert torch.equal(ids["flash_attention_2"], ids["sdpa"])
    assert flash["flash_attn_varlen_func"] > 0


def test_flex_attention_inference_equals_sdpa(monkeypatch):
    """flex_attention's BlockMask path (inference: torch has no flex backward on CPU), run eagerly."""
    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = masking.create_block_mask
    monkeypatch.setattr(  # no inductor compile: minutes on this CPU, the same numbers
        flex_integration,
        "compile_friendly_flex_attention",
        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw),
    )
    monkeypatch.setattr(
        masking, "create_block_mask", lambda *a, _compile=False, **k: block_mask(*a, _compile=False, **k)
    )
    batch = _mixed("right", labels=False)
    with torch.no_grad():
        expected = apply_libra(tiny_llava("sdpa"), CONFIGS["libra-comp"])(**batch)
        got = apply_libra(
            _set_language_attention(tiny_llava("sdpa"), "flex_attention"), CONFIGS["libra-comp"]
        )(**batch)
    assert torch.equal(got.libra_position_map, expected.libra_position_map)
    real = got.libra_attention_mask
    torch.testing.assert_close(got.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, message", [("paged|eager", "paged attention"), ("no_such_kernel", "not a registered")]
)
def test_unsupported_backend_is_refused_naming_the_supported_ones(name, message):
    model = _set_language_attention(tiny_llava("sdpa"), name)
    with pytest.raises(ValueError, match=message) as info:
        apply_libra(model, LibraConfig(layers=[1]))
    for supported in ("eager", "sdpa", "flash_attention_2", "flex_attention"):
        assert supported in str(info.value)
    assert set(supported_backends()) >= {"eager", "sdpa", "flash_attention_2", "flash_attention_3"}
