"""TRL's SFTTrainer with Libra (``LibraSFTTrainer``): trains compressed, with the model's own loss and metrics.

The data goes through TRL's own vision collator (prompt-completion: images + text, completion-only loss), as a
TRL user's would. Needs the ``trl`` extra (``pip install -e ".[trl]"``).
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig  # noqa: E402

from libra_train import apply_libra, load, remove_libra  # noqa: E402
from libra_train.inference.generation import find_runtime  # noqa: E402
from libra_train.integrations.trl import LibraSFTTrainer  # noqa: E402
from tests.integrations.trainer_helpers import (  # noqa: E402
    CFG,
    LORA_TARGETS,
    QUESTIONS,
    LayerLengths,
    applied,
    fitted_model,
    image,
    logits_of,
    own_loss_and_metrics,
    processor,
    prompt,
    tiny_model,
    training_args,
)

pytestmark = pytest.mark.slow


def vqa_dataset(n: int, start: int = 0) -> Dataset:
    rows = []
    for i in range(start, start + n):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"images": [image(i)], "prompt": prompt(question), "completion": f" {answer} </s>"})
    return Dataset.from_list(rows)


def sft_args(tmp_path, **overrides):
    return training_args(tmp_path, config_class=SFTConfig, **{"max_steps": 1, **overrides})


def first_batch(trainer, dataset, size=2):
    """The batch of the first step (sequential sampling), built by the trainer's own collator."""
    return trainer.data_collator([dataset[i] for i in range(size)])


def test_sft_trains_compressed_with_the_models_own_loss_and_metrics(tmp_path):
    dataset = vqa_dataset(2)
    model = fitted_model()
    trainer = LibraSFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=dataset, processing_class=processor()
    )
    batch = first_batch(trainer, dataset)
    expected = own_loss_and_metrics(model, batch)  # before the step: what step 1 must log
    assert expected["compressed_length"] < expected["length"] and expected["mean_token_accuracy"] > 0
    with LayerLengths(model) as seen:
        trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert logged["entropy"] == pytest.approx(expected["entropy"], rel=1e-5)
    assert logged["mean_token_accuracy"] == pytest.approx(expected["mean_token_accuracy"], abs=1e-6)
    # gradient checkpointing (SFTConfig's default) runs each layer twice: forward and recomputation
    assert set(seen.lengths[0]) == set(seen.lengths[1]) == {expected["length"]}
    assert set(seen.lengths[2]) == set(seen.lengths[3]) == {expected["compressed_length"]}

    # evaluation goes through the same fused head
    metrics = trainer.evaluate(dataset)
    after = own_loss_and_metrics(model, batch)
    assert metrics["eval_loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(after["mean_token_accuracy"], abs=1e-6)


def test_libra_config_applies_libra_in_the_right_order(tmp_path):
    dataset = vqa_dataset(2)
    with pytest.raises(ValueError, match="no Libra applied"):
        LibraSFTTrainer(model=tiny_model(None), args=sft_args(tmp_path), train_dataset=dataset)
    trainer = LibraSFTTrainer(
        model=tiny_model(None),
        args=sft_args(tmp_path),
        train_dataset=dataset,
        processing_class=processor(),
        libra_config=CFG,
    )
    assert find_runtime(trainer.model).config == applied(CFG)
    batch = first_batch(trainer, dataset)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.item() == pytest.approx(own_loss_and_metrics(trainer.model, batch)["loss"], rel=1e-6)


def test_libra_applied_after_the_trainer_is_refused(tmp_path):
    dataset = vqa_dataset(2)
    model = tiny_model()
    trainer = LibraSFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=dataset, processing_class=processor()
    )
    remove_libra(model)
    apply_libra(model, CFG)  # now Libra's forward sits where the trainer's fused head was
    with pytest.raises(ValueError, match="replaced after the trainer was built"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs",
    [{"compute_metrics": lambda p: {}}, {"args_overrides": {"label_smoothing_factor": 0.1}}],
    ids=["compute_metrics", "label_smoothing"],
)
def test_what_the_fused_head_cannot_do_is_refused(kwargs, tmp_path):
    overrides = kwargs.pop("args_overrides", {})
    with pytest.raises(ValueError, match="does not support"):
        LibraSFTTrainer(
            model=tiny_model(), args=sft_args(tmp_path, **overrides), train_dataset=vqa_dataset(2), **kwargs
        )


def test_peft_through_sft_trainer_saves_a_loadable_adapter(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(None).save_pretrained(base_dir)
    processor().save_pretrained(base_dir)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, local_files_only=True)
    dataset = vqa_dataset(4)
    trainer = LibraSFTTrainer(
        model=model,
        args=sft_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=dataset,
        processing_class=processor(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS),
        libra_config=CFG,
    )
    batch = first_batch(trainer, dataset)
    expected = own_loss_and_metrics(trainer.model, batch)
    with LayerLengths(trainer.model) as seen:
        trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert max(seen.lengths[3]) < min(seen.lengths[1])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "libra_config.json").is_file() and not (checkpoint / "config.json").exists()
    reloaded, _ = load(checkpoint)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(trainer.model, inputs), rtol=0, atol=0)
