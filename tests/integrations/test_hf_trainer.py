"""transformers' Trainer with Libra: plain ``Trainer.train`` is exact; ``LibraTrainer`` adds label smoothing through
the position map and the merge config beside peft adapters; ``libra_predictions`` aligns ``compute_metrics``;
peft on top; an accelerate loop equals a plain torch loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import Trainer

from libra_train import apply_libra, load
from libra_train.integrations.hf_trainer import LibraTrainer, libra_predictions
from libra_train.plugin.loss import shift_labels_through_map
from tests.integrations.trainer_helpers import (
    CFG,
    IGNORE,
    LORA_TARGETS,
    LayerLengths,
    collate,
    fitted_model,
    logits_of,
    own_loss_and_metrics,
    processor,
    samples,
    tiny_model,
    training_args,
)

pytestmark = pytest.mark.slow


def trainer_for(model, tmp_path, train=None, cls=Trainer, **kwargs):
    args = kwargs.pop("args", None) or training_args(tmp_path)
    return cls(model=model, args=args, train_dataset=train, data_collator=collate, **kwargs)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["libra-then-trainer", "trainer-then-libra"])
def test_plain_trainer_trains_compressed_with_the_models_loss(order, tmp_path):
    """The Trainer does not patch the model, so Libra may be applied before or after building it."""
    data = samples(4)
    model = tiny_model(CFG if order == "libra-then-trainer" else None)
    trainer = trainer_for(model, tmp_path, data)
    if order == "trainer-then-libra":
        apply_libra(model, CFG)
    first = own_loss_and_metrics(model, collate(data[:2]))
    with LayerLengths(model) as seen:
        trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert seen.lengths[1][0] == first["length"] and seen.lengths[2][0] == first["compressed_length"]
    assert max(seen.lengths[3]) < min(seen.lengths[1])


def test_accumulation_4x1_equals_1x4(tmp_path):
    """num_items_in_batch reaches the loss through the map: one batch of 4 == 4 accumulated batches of 1."""
    data = samples(4)
    runs = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        args = training_args(
            tmp_path / f"{batch}x{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
        )
        trainer = trainer_for(tiny_model(), tmp_path, data, args=args)
        trainer.train()
        runs[batch] = trainer.state.log_history[0]["loss"], params(trainer.model)
    (loss4, params4), (loss1, params1) = runs[4], runs[1]
    assert loss1 == pytest.approx(loss4, rel=1e-6)
    assert not torch.equal(params4["lm_head.weight"], params(tiny_model())["lm_head.weight"])  # it stepped
    for name, value in params4.items():
        torch.testing.assert_close(params1[name], value, rtol=1e-5, atol=1e-7, msg=name)


def smoothed_loss(model, batch, epsilon: float) -> float:
    """transformers' label smoothing written out on the compressed logits, labels through the map."""
    with torch.no_grad():
        out = model(**batch)
    targets = shift_labels_through_map(batch["labels"], out.libra_position_map)
    mask = targets != IGNORE
    logp = torch.log_softmax(out.logits[mask], -1)
    nll = -logp.gather(-1, targets[mask][:, None]).mean()
    uniform = -logp.mean(-1).mean()
    return ((1 - epsilon) * nll + epsilon * uniform).item()


def test_label_smoothing_through_the_position_map(tmp_path):
    data = samples(2)
    model = tiny_model()
    batch = collate(data)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # the test can tell the query rules apart: without labels the plug-in would compress differently
    assert not torch.equal(model(**inputs).libra_position_map, model(**batch).libra_position_map)
    expected = smoothed_loss(model, batch, 0.1)
    args = training_args(tmp_path, max_steps=1, label_smoothing_factor=0.1)
    with (
        pytest.raises(RuntimeError),
        warnings.catch_warnings(),
    ):  # [B, L'] logits smoothed against [B, L] labels
        warnings.simplefilter("ignore")  # the plug-in warns that this forward has no labels
        trainer_for(tiny_model(), tmp_path, data, args=args).train()
    trainer = trainer_for(model, tmp_path, data, cls=LibraTrainer, args=args)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-6)


def token_accuracy(prediction) -> dict[str, float]:
    """A metric written for a plain causal LM: position o predicts label o + 1."""
    preds, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    mask = labels != IGNORE
    return {"token_accuracy": float((preds[mask] == labels[mask]).mean())}


def test_evaluate_and_predict_with_aligned_predictions(tmp_path):
    model = fitted_model()
    data = samples(4, start=20)
    batches = [collate(data[:2]), collate(data[2:])]
    width = max(b["input_ids"].shape[1] for b in batches)
    expected = np.full((4, width), IGNORE)  # by hand: each kept position's argmax at its original position
    correct = total = 0
    for k, b in enumerate(batches):
        with torch.no_grad():
            out = model(**b)
        for row in range(2):
            for i, o in enumerate(out.libra_position_map[row].tolist()):
                if o >= 0:
                    expected[2 * k + row, o] = int(out.logits[row, i].argmax())
        targets = shift_labels_through_map(b["labels"], out.libra_position_map)
        mask = targets != IGNORE
        correct += int((out.logits.argmax(-1)[mask] == targets[mask]).sum())
        total += int(mask.sum())
    assert 0 < correct < total
    own = [own_loss_and_metrics(model, b)["loss"] for b in batches]
    trainer = trainer_for(
        model, tmp_path, compute_metrics=token_accuracy, preprocess_logits_for_metrics=libra_predictions
    )
    # transformers 5.24's LLaVA returns `image_outputs` (a ModelOutput of Nones) that the Trainer cannot gather
    ignore = ["cache", "image_outputs"]
    metrics = trainer.evaluate(data, ignore_keys=ignore)
    assert metrics["eval_loss"] == pytest.approx(np.mean(own), rel=1e-6)
    assert metrics["eval_token_accuracy"] == pytest.approx(correct / total)
    result = trainer.predict(data, ignore_keys=ignore)
    assert result.predictions.shape == result.label_ids.shape == (4, width)  # the labels' layout
    assert np.array_equal(result.predictions, expected)
    assert result.metrics["test_token_accuracy"] == pytest.approx(correct / total)


def test_lora_on_top_and_its_checkpoints(tmp_path):
    data = samples(4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(tiny_model(), lora)
    first = own_loss_and_metrics(model, collate(data[:2]))
    args = training_args(tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer = trainer_for(model, tmp_path, data, cls=LibraTrainer, args=args, processing_class=processor())
    with LayerLengths(model) as seen:
        trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert max(seen.lengths[3]) < min(seen.lengths[1])
    assert all("lora_" in name for name in params(model))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "libra_config.json").is_file()
    batch = collate(samples(2, start=10))
    base = tmp_path / "base"  # the adapter's base was built from a config: name a saved copy with base=
    tiny_model(None).save_pretrained(base)
    processor().save_pretrained(base)
    reloaded, _ = load(checkpoint, base=base)
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), rtol=0, atol=0)


def test_accelerate_loop_equals_plain_torch_loop():
    def run(use_accelerate: bool) -> list[float]:
        model = tiny_model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = DataLoader(samples(4), batch_size=2, collate_fn=collate)
        if use_accelerate:
            accelerator = Accelerator(cpu=True)
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        losses = []
        with LayerLengths(model) as seen:
            for batch in loader:
                loss = model(**batch).loss
                accelerator.backward(loss) if use_accelerate else loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        assert max(seen.lengths[3]) < min(seen.lengths[1])
        return losses

    plain, accelerated = run(False), run(True)
    assert plain == accelerated
    untrained = own_loss_and_metrics(tiny_model(), collate(samples(2, start=2)))["loss"]
    assert plain[1] != pytest.approx(untrained)  # the first step changed the model
