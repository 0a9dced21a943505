"""Export -> load gives back the training-time model: same logits, same merge config, a card that says so."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

from libra_train import LibraConfig
from libra_train.compress.schedule import token_schedule
from libra_train.export import export_checkpoint
from libra_train.flops import LLMShape, schedule_flops
from libra_train.infer import load, read_merge_config
from libra_train.inference.generation import find_runtime
from tests.export.export_helpers import N_VISUAL, TRAIN_CONFIG, batch, logits, save_checkpoint


def test_full_export_reproduces_training_logits(exported, trained, tiny, demo):
    model, processor = load(exported)
    inputs = batch(processor, demo, n=2)
    assert inputs["attention_mask"][:, 0].tolist() == [1, 0]  # a left-padded batch
    out = logits(model, inputs)
    assert out.shape[1] < inputs["input_ids"].shape[1]  # compressed: fewer output positions
    torch.testing.assert_close(out, logits(trained, inputs), rtol=0, atol=0)
    assert find_runtime(model).last_visual_tokens[1].tolist() == [18, 18]


def test_libra_off_is_the_plain_model(exported, tiny, demo):
    model, processor = load(exported, libra="off")
    assert find_runtime(model) is None
    inputs = batch(processor, demo, n=2)
    torch.testing.assert_close(logits(model, inputs), logits(tiny[0], inputs), rtol=0, atol=0)


def test_plain_from_pretrained_loads_the_export(exported, tiny, demo):
    model = LlavaForConditionalGeneration.from_pretrained(exported, local_files_only=True)
    inputs = batch(tiny[1], demo, n=1)
    torch.testing.assert_close(logits(model, inputs), logits(tiny[0], inputs), rtol=0, atol=0)


def test_lora_adapter_beside_the_base(lora, tmp_path, demo):
    peft_model, checkpoint = lora
    out = export_checkpoint(checkpoint, tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out.resolve()
    )
    model, processor = load(out)
    assert getattr(model, "_hf_peft_config_loaded", False)  # from_pretrained applied the adapter itself
    inputs = batch(processor, demo, n=2)
    torch.testing.assert_close(logits(model, inputs), logits(peft_model, inputs), rtol=0, atol=0)


def test_lora_merged(lora, tmp_path, trained, demo):
    peft_model, checkpoint = lora
    out = export_checkpoint(checkpoint, tmp_path / "merged", merge_lora=True)
    assert not (out / "adapter_config.json").exists()
    model, processor = load(out)
    inputs = batch(processor, demo, n=2)
    expected = logits(peft_model, inputs)
    assert not torch.allclose(expected, logits(trained, inputs), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        LibraConfig(layers=[0, 2], ratio=[0.5, 0.75], theta=0.6),
        LibraConfig(method="fastv", layers=[1], ratio=2 / 3, query="last_instruction"),
    ],
    ids=["libra-two-points", "fastv"],
)
def test_merge_config_round_trip(cfg, checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "export", libra_config=cfg)
    assert LibraConfig.from_pretrained(out) == cfg
    assert json.loads((out / "config.json").read_text())["libra_merging"] == cfg.to_dict()
    assert AutoConfig.from_pretrained(out, local_files_only=True).libra_merging == cfg.to_dict()
    assert read_merge_config(out) == cfg
    model, _ = load(out)
    assert find_runtime(model).config == dataclasses.replace(cfg, unit="image")  # LLaVA's default unit


def test_overrides_and_explicit_configs(exported, demo):
    model, processor = load(exported, libra={"ratio": 0.75})
    assert find_runtime(model).config == LibraConfig(layers=[1], ratio=0.75, unit="image")
    logits(model, batch(processor, demo, n=1))
    assert [t.tolist() for t in find_runtime(model).last_visual_tokens] == [[N_VISUAL], [9]]
    model, _ = load(exported, libra=LibraConfig(method="fastv", layers=[2]))
    assert find_runtime(model).config.layers == [2]
    model, _ = load(exported, libra=str(exported / "libra_config.json"))
    assert find_runtime(model).config == dataclasses.replace(TRAIN_CONFIG, unit=TRAIN_CONFIG.unit or "image")


def test_card_states_config_recipe_tokens_and_flops(exported):
    card = (exported / "README.md").read_text()
    assert "recipe **demo**" in card and "LoRA: none" in card
    assert "| layers | `[1]` |" in card and "| ratio | `0.5` |" in card
    assert "| 0-1 | 36 |" in card and "| 2-3 | 19 |" in card  # 18 targets + 1 compensation token
    shape = LLMShape(4, 128, 256)
    ratio = schedule_flops(
        token_schedule(4, N_VISUAL, [1], [0.5], compensation=True), shape
    ) / schedule_flops([N_VISUAL] * 4, shape)
    assert f"ratio **{ratio:.3f}**" in card
    assert (exported / "training_recipe.yaml").read_text().startswith("# Resolved recipe 'demo'")


def test_full_token_run_is_recorded_disabled(tiny, tmp_path, demo):
    recipe = {"name": "demo_full", "libra": {"enabled": False, "layers": [1], "ratio": 0.5}}
    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny[0], tiny[1], libra=None, recipe=recipe)
    out = export_checkpoint(checkpoint, tmp_path / "full")
    assert read_merge_config(out) == LibraConfig(enabled=False, layers=[1], ratio=0.5)
    assert "Compression: off" in (out / "README.md").read_text()
    model, processor = load(out)
    inputs = batch(processor, demo, n=2)
    torch.testing.assert_close(logits(model, inputs), logits(tiny[0], inputs), rtol=0, atol=0)


def test_export_casts_weights(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "bf16", dtype="bfloat16")
    model, _ = load(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
