"""A resume cannot silently change the run: a changed recipe is refused with the list of changed keys unless
``train.resume_allow_changes`` names them; allowed changes really take effect (the new lr is in the optimizer
after DeepSpeed's restore) and are recorded; changes that cannot be resumed are one paragraph, not a traceback.

On main a new ``train.lr`` was ignored (the restored optimizer and scheduler kept the old one) while the new
checkpoint's recipe recorded it, and a changed batch layout or ZeRO stage ended in a raw traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from libra_train.config import load_recipe, save_recipe
from libra_train.training.optim import build_scheduler, lr_lambda
from libra_train.training.resume import (
    ResumeError,
    apply_current_schedule,
    check_recipe,
    recipe_changes,
    structure_problems,
)
from tests.reliability.runs import BASE, ONE_PROCESS, copy_run, run, train_records


def _checkpoint_with_recipe(tmp_path: Path, overrides: list[str]) -> Path:
    checkpoint = tmp_path / "checkpoint-2"
    save_recipe(load_recipe("demo", overrides), checkpoint / "recipe.yaml")
    return checkpoint


def _resume(checkpoint: Path, overrides: list[str]):
    return load_recipe("demo", [f"train.resume={checkpoint}", *overrides])


def test_changes_are_listed_and_refused_unless_allowed(tmp_path: Path):
    checkpoint = _checkpoint_with_recipe(tmp_path, [f"train.output_dir={tmp_path}"])
    cfg = _resume(
        checkpoint, ["train.lr=1e-3", "libra.ratio=0.8", "train.max_steps=9", "logging.log_every=1"]
    )
    with pytest.raises(ResumeError) as info:
        check_recipe(cfg, checkpoint)
    message = str(info.value)
    assert "libra.ratio 0.5 -> 0.8, train.lr 0.0003 -> 0.001, train.max_steps None -> 9" in message
    assert "train.resume_allow_changes=[libra.ratio,train.lr,train.max_steps]" in message
    assert "logging" not in message  # logging, where to write, how often to save: free to change
    allowed = _resume(
        checkpoint, ["train.lr=1e-3", "libra.ratio=0.8", "train.resume_allow_changes=[train.lr,libra]"]
    )
    assert check_recipe(allowed, checkpoint) == {"libra.ratio": (0.5, 0.8), "train.lr": (3e-4, 1e-3)}


def test_a_typo_in_the_allowed_keys_gets_a_suggestion(tmp_path: Path):
    checkpoint = _checkpoint_with_recipe(tmp_path, [])
    with pytest.raises(ResumeError, match="names 'train.learning_rate'.*did you mean"):
        check_recipe(_resume(checkpoint, ["train.resume_allow_changes=[train.learning_rate]"]), checkpoint)


@pytest.mark.parametrize(
    "change",
    [
        "train.micro_batch_size=8",
        "lora.enabled=true",
        "model.tiny.text_layers=6",
        "model.freeze_vision_tower=true",
    ],
)
def test_changes_that_cannot_be_resumed_are_one_paragraph_even_when_allowed(tmp_path: Path, change: str):
    checkpoint = _checkpoint_with_recipe(tmp_path, [])
    key = change.split("=")[0]
    extra = ["model.train_llm=false"] if key == "lora.enabled" else []
    cfg = _resume(checkpoint, [change, *extra, "train.resume_allow_changes=[model,lora,train]"])
    with pytest.raises(ResumeError, match=rf"cannot resume {checkpoint} with {key} .* -> "):
        check_recipe(cfg, checkpoint)


def test_demo_data_paths_follow_the_output_folder_and_do_not_count(tmp_path: Path):
    saved = {
        "data": {"demo": {"n_train": 40}, "train": "/a/demo_data/train.json"},
        "train": {"output_dir": "/a"},
    }
    now = {"data": {"demo": {"n_train": 40}, "train": None}, "train": {"output_dir": "/b"}}
    assert recipe_changes(saved, now) == {}
    now["data"]["demo"]["n_train"] = 80
    assert recipe_changes(saved, now) == {"data.demo.n_train": (40, 80)}


def test_keys_newer_than_the_checkpoint_count_as_their_default(tmp_path: Path):
    checkpoint = _checkpoint_with_recipe(tmp_path, [])
    text = (checkpoint / "recipe.yaml").read_text()
    (checkpoint / "recipe.yaml").write_text(
        text.replace("  skip_bad_samples: false\n", "")
    )  # an older recipe
    assert check_recipe(_resume(checkpoint, []), checkpoint) == {}
    with pytest.raises(ResumeError, match="data.skip_bad_samples False -> True"):
        check_recipe(_resume(checkpoint, ["data.skip_bad_samples=true"]), checkpoint)


def test_structure_problems_name_layout_stage_and_parameters():
    saved = {"world_size": 1, "micro_batch_size": 4, "accumulation": 1, "zero_stage": 2, "precision": "fp32"}
    saved["trainable"] = {"a.weight": [4, 4], "b.weight": [8]}
    now = {**saved, "world_size": 2, "zero_stage": 3, "trainable": {"a.weight": [4, 4], "b.weight": [16]}}
    problems = structure_problems(saved, now)
    assert len(problems) == 3
    assert "batch layout differs" in problems[0] and "ZeRO stage (train.deepspeed) differs: 2" in problems[1]
    assert "b.weight: [8] -> [16]" in problems[2]
    assert structure_problems({"step": 3}, now) == []  # an older checkpoint records nothing to compare


def _optimizer(lr: float) -> tuple[torch.optim.AdamW, LambdaLR]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": 0.0}], lr=lr)
    return optimizer, build_scheduler(optimizer, "cosine", 0.25, total_steps=8)


def _steps(optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
        optimizer.step()
        scheduler.step()


def test_the_new_lr_and_schedule_take_effect_after_the_restore():
    """What DeepSpeed's load_checkpoint does (load the optimizer's and the scheduler's state dicts) undoes a new
    lr; `apply_current_schedule` puts the run's own back, and changes nothing when nothing changed."""
    old, old_sched = _optimizer(1e-3)
    _steps(old, old_sched, 3)
    saved = (old.state_dict(), old_sched.state_dict())

    _steps(old, old_sched, 1)  # the uninterrupted run's step 4

    for lr, total in [(1e-3, 8), (5e-3, 12)]:
        torch.manual_seed(0)
        new = torch.optim.AdamW(
            [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr}], weight_decay=0.0
        )
        new_sched = build_scheduler(new, "cosine", 0.25, total_steps=total)
        intended = [(g["initial_lr"], g["weight_decay"]) for g in new.param_groups]
        new.load_state_dict(saved[0])
        new_sched.load_state_dict(saved[1])
        assert new.param_groups[0]["initial_lr"] == 1e-3  # the restore brought the old lr back
        apply_current_schedule(new, new_sched, intended)
        factor = lr_lambda("cosine", math.ceil(0.25 * total), total)
        assert new.param_groups[0]["lr"] == lr * factor(3)
        _steps(new, new_sched, 1)
        assert new_sched.get_last_lr() == [lr * factor(4)]
        if (lr, total) == (1e-3, 8):  # nothing changed: exactly the uninterrupted run's lr
            assert new_sched.get_last_lr() == old_sched.get_last_lr()


@pytest.mark.slow
def test_a_resume_with_a_changed_lr_is_refused(tmp_path: Path, reference: Path, data):
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2",))
    result = run(out, [*data, *BASE, *ONE_PROCESS, "train.resume=latest", "train.lr=1e-3"])
    assert result.rc == 1, result.describe()
    assert (
        "train.lr 0.0003 -> 0.001" in result.output
        and "train.resume_allow_changes=[train.lr]" in result.output
    )
    assert "Traceback" not in result.output and not (out / "log.jsonl").exists()


@pytest.mark.slow
def test_allowed_changes_take_effect_and_are_recorded(tmp_path: Path, reference: Path, data):
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2",))
    allow = ["train.lr=1e-3", "train.max_steps=8", "train.resume_allow_changes=[train.lr,train.max_steps]"]
    result = run(out, [*data, *BASE, *ONE_PROCESS, "train.resume=latest", *allow])
    assert result.rc == 0, result.describe()
    assert (
        "changed on resume (train.resume_allow_changes): train.lr 0.0003 -> 0.001, train.max_steps 6 -> 8"
        in (result.output)
    )
    factor = lr_lambda("cosine", math.ceil(0.05 * 8), 8)  # the recipe's warm-up ratio over the new 8 steps
    logged = {r["step"]: r["lr"] for r in train_records(out)}
    assert logged == pytest.approx({s: 1e-3 * factor(s) for s in range(3, 9)}, rel=1e-9)
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    change = {"train.lr": [0.0003, 0.001], "train.max_steps": [6, 8]}
    assert state["resumes"] == [{"step": 2, "from": str(out / "checkpoint-2"), "changes": change}]
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["changes"] == change


@pytest.mark.slow
def test_a_changed_zero_stage_is_one_paragraph(tmp_path: Path, reference: Path, data):
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2",))
    change = ["train.deepspeed=zero3", "train.resume_allow_changes=[train.deepspeed]"]
    result = run(out, [*data, *BASE, *ONE_PROCESS, "train.resume=latest", *change])
    assert result.rc == 1, result.describe()
    assert "the ZeRO stage (train.deepspeed) differs: 2 in the checkpoint, 3 now" in result.output
    assert "Traceback" not in result.output
