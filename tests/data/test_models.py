"""build_tiny_llava, load_model_and_processor, pick_attn_implementation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from libra_train import models
from libra_train.models import build_tiny_llava, load_model_and_processor, pick_attn_implementation


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_llava")
    model, processor = build_tiny_llava(out, seed=1)
    return out, model, processor


def test_tiny_llava_config_and_image_tokens(tiny):
    model, processor = tiny
    cfg = model.config
    assert (
        cfg.image_token_id
        == processor.tokenizer.convert_tokens_to_ids("<image>")
        == processor.image_token_id
        == 4
    )
    assert cfg.vision_feature_select_strategy == processor.vision_feature_select_strategy == "default"
    assert processor.tokenizer.convert_ids_to_tokens(range(5)) == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    assert cfg.text_config.vocab_size == len(processor.tokenizer)
    enc = processor(
        text=["USER: <image>\nwhat colour ?"], images=[Image.new("RGB", (60, 40), "red")], return_tensors="pt"
    )
    assert int((enc["input_ids"] == 4).sum()) == 36 and enc["pixel_values"].shape == (1, 3, 48, 48)
    with torch.no_grad():  # the processor's expansion matches what the model produces (else ValueError)
        assert torch.isfinite(model(**enc).logits).all()
    _, big = build_tiny_llava(image_size=64, patch_size=16)
    assert big(text=["<image>"], images=[Image.new("RGB", (64, 64))])["input_ids"][0].count(4) == 16


def test_save_and_load_round_trip(saved):
    out, model, processor = saved
    rng = torch.get_rng_state()
    again, _ = build_tiny_llava(seed=1)  # same seed, same weights; the caller's RNG state is left alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    loaded, loaded_processor = load_model_and_processor(out)
    assert (
        type(loaded).__name__ == "LlavaForConditionalGeneration"
        and loaded.config._attn_implementation == "sdpa"
    )
    text, image = ["USER: <image>\nwhat shape ?"], [Image.new("RGB", (48, 48), "blue")]
    a, b = (
        processor(text=text, images=image, return_tensors="pt"),
        loaded_processor(text=text, images=image, return_tensors="pt"),
    )
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert loaded_processor.chat_template == processor.chat_template
    with torch.no_grad():
        assert torch.allclose(model.eval()(**a).logits, loaded.eval()(**b).logits, atol=1e-6)
    bf16, _ = load_model_and_processor(out, torch_dtype="bfloat16", attn_implementation="eager")
    assert bf16.dtype == torch.bfloat16 and bf16.config._attn_implementation == "eager"


def test_load_errors_say_what_to_do(saved, tmp_path):
    with pytest.raises(
        FileNotFoundError, match="huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir"
    ):
        load_model_and_processor(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_processor(tmp_path)
    with pytest.raises(ValueError, match="'llava' model, not family='qwen2_vl'"):
        load_model_and_processor(saved[0], family="qwen2_vl")
    with pytest.raises(ValueError, match="unknown model family"):
        load_model_and_processor(saved[0], family="blip")


def test_pick_attn_implementation(monkeypatch):
    assert pick_attn_implementation("eager") == "eager"
    expected = (
        "flash_attention_2"
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn")
        else "sdpa"
    )
    assert pick_attn_implementation() == expected
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None
    )
    assert pick_attn_implementation("auto") == "flash_attention_2"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert pick_attn_implementation("auto") == "sdpa"
