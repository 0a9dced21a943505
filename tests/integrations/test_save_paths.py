"""The merge config travels with the model through every save path, and ``libra_train.load`` re-applies it.

Each path is checked the same way: the saved directory loads back (``libra_train.load``) with the same merge
config and gives the very logits of the in-memory model it was saved from (compressed: fewer positions).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlavaForConditionalGeneration, Trainer

from libra_train import LibraConfig, apply_libra, load, remove_libra, save_merge_config
from libra_train.export import export_checkpoint
from libra_train.inference.generation import find_runtime
from tests.integrations.trainer_helpers import (
    CFG,
    LORA_TARGETS,
    applied,
    collate,
    logits_of,
    processor,
    samples,
    tiny_model,
    training_args,
)

BATCH = collate(samples(3, start=10))


def saved_key(directory) -> dict | None:
    return json.loads((directory / "config.json").read_text()).get("libra_merging")


def assert_reloads(directory, expected: torch.Tensor, cfg: LibraConfig = CFG):
    model, _ = load(directory)
    assert find_runtime(model).config == applied(cfg)
    out = logits_of(model, BATCH)
    assert out.shape[1] < BATCH["input_ids"].shape[1]  # compressed
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    return model


def test_apply_records_and_remove_clears(tmp_path):
    model = tiny_model(None)
    assert not hasattr(model.config, "libra_merging")
    cfg = LibraConfig(layers=[0, 2], ratio=[0.5, 0.25], theta=0.6)
    apply_libra(model, cfg)
    assert model.config.libra_merging == applied(cfg).to_dict()
    remove_libra(model)
    assert not hasattr(model.config, "libra_merging")
    model.save_pretrained(tmp_path)
    assert saved_key(tmp_path) is None


def test_save_pretrained_and_plain_from_pretrained(tmp_path):
    model = tiny_model()
    expected = logits_of(model, BATCH)
    model.save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    assert saved_key(tmp_path) == applied(CFG).to_dict()
    assert_reloads(tmp_path, expected)

    # plain from_pretrained: the standard model, uncompressed, with the record on its config ...
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    assert plain.config.libra_merging == applied(CFG).to_dict()
    full = logits_of(plain, BATCH)
    assert full.shape[1] == BATCH["input_ids"].shape[1]
    torch.testing.assert_close(full, logits_of(tiny_model(None), BATCH), rtol=0, atol=0)
    # ... and apply_libra without a config applies the recorded one
    torch.testing.assert_close(logits_of(apply_libra(plain), BATCH), expected, rtol=0, atol=0)


def test_load_off_clears_the_record(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    model, _ = load(tmp_path, libra="off")
    assert find_runtime(model) is None and not hasattr(model.config, "libra_merging")


def test_a_directory_without_processor_files_names_the_fix(tmp_path):
    tiny_model().save_pretrained(tmp_path)  # a Trainer given no processing_class saves no processor
    with pytest.raises(FileNotFoundError, match="processing_class"):
        load(tmp_path)


def test_trainer_save_model_checkpoints_and_export(tmp_path):
    args = training_args(tmp_path / "run", save_strategy="steps", save_steps=1)
    trainer = Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=samples(4),
        data_collator=collate,
        processing_class=processor(),
    )
    trainer.train()
    trainer.save_model(tmp_path / "final")
    expected = logits_of(trainer.model, BATCH)
    assert not torch.equal(expected, logits_of(tiny_model(), BATCH))  # it trained
    for directory in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        assert saved_key(directory) == applied(CFG).to_dict()
        assert_reloads(directory, expected)
    assert saved_key(tmp_path / "run" / "checkpoint-1") == applied(CFG).to_dict()
    # scripts/export.py takes an HF Trainer checkpoint too: the merge config comes from its config.json
    assert_reloads(export_checkpoint(tmp_path / "run" / "checkpoint-2", tmp_path / "export"), expected)


def _peft_model(base_dir):
    """Libra on a base loaded from ``base_dir`` (so the adapter names it), then a LoRA with random weights."""
    tiny_model(None).save_pretrained(base_dir)
    processor().save_pretrained(base_dir)
    base = LlavaForConditionalGeneration.from_pretrained(base_dir, local_files_only=True)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return get_peft_model(apply_libra(base, CFG), lora).eval()


def test_peft_adapter_with_save_merge_config(tmp_path):
    model = _peft_model(tmp_path / "base")
    expected = logits_of(model, BATCH)
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()  # what peft writes: adapter files only
    with pytest.raises(ValueError, match="save_merge_config"):
        load(tmp_path / "adapter")  # the base has no merge config, the adapter none yet
    assert save_merge_config(model, tmp_path / "adapter") == tmp_path / "adapter" / "libra_config.json"
    reloaded = assert_reloads(tmp_path / "adapter", expected)  # base from adapter_config.json
    assert isinstance(reloaded, PeftModel)
    model_b, _ = load(tmp_path / "adapter", base=tmp_path / "base")
    torch.testing.assert_close(logits_of(model_b, BATCH), expected, rtol=0, atol=0)


def test_adapter_without_a_local_base_names_the_fix(tmp_path):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=LORA_TARGETS))  # built from a config
    model.save_pretrained(tmp_path)
    save_merge_config(model, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match="base=DIR"):
        load(tmp_path)


def test_merged_peft_model(tmp_path):
    model = _peft_model(tmp_path / "base")
    expected = logits_of(model, BATCH)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    processor().save_pretrained(tmp_path / "merged")
    assert saved_key(tmp_path / "merged") == applied(CFG).to_dict()
    reloaded, _ = load(tmp_path / "merged")
    assert find_runtime(reloaded).config == applied(CFG)
    torch.testing.assert_close(logits_of(reloaded, BATCH), logits_of(merged, BATCH), rtol=0, atol=0)
    torch.testing.assert_close(logits_of(reloaded, BATCH), expected, rtol=1e-4, atol=1e-5)
