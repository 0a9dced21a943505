"""Checkpoints cannot be lost: a kill at every phase of saving, re-saving and pruning leaves ``latest`` on a
complete checkpoint, no half-written or half-deleted ``checkpoint-N``, and leftovers the next start cleans up;
resuming then equals the uninterrupted run.

The phase matrix forks the test process and lets ``save_checkpoint`` (the real one, on the real file system)
SIGKILL itself at a marked point (``LIBRA_TRAIN_FAULT``) while saving the files of a stand-in engine; a real
``train.py`` run is killed the same way while it saves a step again, and resumed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from libra_train.config import load_recipe
from libra_train.training import faults, output_dir
from libra_train.training.checkpoint import load_trained_model, resolve_resume
from libra_train.training.output_dir import checkpoint_problem, read_latest, recover
from libra_train.training.resume import ResumeError
from tests.reliability.runs import BASE, ONE_PROCESS, consolidated, copy_run, losses_by_step, run
from tests.reliability.standins import save as _save
from tests.reliability.standins import version as _version


def _killed_save(out: Path, step: int, version: str, fault: str, exchange: bool = True) -> None:
    """Run `_save` in a forked child that SIGKILLs itself at ``fault``; assert that it did."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ[faults.ENV] = fault
            faults._hits.clear()
            if not exchange:
                output_dir._exchange = lambda a, b: False  # a file system without renameat2(RENAME_EXCHANGE)
            _save(out, step, version)
            os._exit(0)
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{fault}: not killed ({status})"


def _assert_never_lost(out: Path) -> None:
    """What must hold at the instant of the kill: every visible checkpoint is complete, and so is ``latest``."""
    for path in out.glob("checkpoint-*"):
        assert checkpoint_problem(path) is None, f"{path.name}: {checkpoint_problem(path)}"
    latest = read_latest(out)
    assert latest is not None and checkpoint_problem(latest) is None


SAVE_PHASES = ["save:begin", "save:engine", "save:written", "save:swapped", "save:latest"]


@pytest.mark.parametrize("phase", SAVE_PHASES)
def test_kill_while_saving_a_new_step(tmp_path: Path, phase: str):
    out = tmp_path / "run"
    _save(out, 2, "a")
    _killed_save(out, 4, "a", f"{phase} kill step=4")
    _assert_never_lost(out)
    notes = recover(out)
    assert not list(out.glob(".tmp-step-*")) and not (out / "latest.tmp").exists()
    assert phase in ("save:swapped", "save:latest") or notes, "a leftover was not reported"
    resumed = resolve_resume(load_recipe("demo", [f"train.output_dir={out}", "train.resume=latest"]))
    uninterrupted = _save(tmp_path / "clean", 4, "a") if phase == "save:latest" else None
    # Until `latest` is rewritten it names checkpoint-2: resuming there redoes steps 3-4, as uninterrupted.
    assert resumed.name == ("checkpoint-4" if phase == "save:latest" else "checkpoint-2")
    if (
        uninterrupted is not None
    ):  # the files of a save that was not interrupted (sizes: paths and RNG differ)
        mine = json.loads((resumed / "trainer_state.json").read_text())["files"]
        assert set(mine) == set(json.loads((uninterrupted / "trainer_state.json").read_text())["files"])


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-fallback"])
@pytest.mark.parametrize("phase", [*SAVE_PHASES, "save:aside", "delete:renamed"])
def test_kill_while_saving_a_step_again(tmp_path: Path, phase: str, exchange: bool):
    """A run resumed from an older checkpoint saves step 4 again: ``latest`` (= checkpoint-4) stays complete
    through the replacement (on main the old folder was deleted before the new one was renamed in)."""
    if phase == "save:aside" and exchange:
        pytest.skip("the aside rename happens only without RENAME_EXCHANGE")
    out = tmp_path / "run"
    _save(out, 2, "old")
    _save(out, 4, "old")
    _killed_save(out, 4, "new", f"{phase} kill step=4", exchange=exchange)
    if phase != "save:aside":
        _assert_never_lost(out)
    else:  # between the two renames checkpoint-4 is missing; the complete new one is waiting to be renamed in
        assert not (out / "checkpoint-4").exists()
        assert checkpoint_problem(out / ".tmp-step-4") is None
    recover(out)
    _assert_never_lost(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    latest = read_latest(out)
    assert latest.name == "checkpoint-4"
    replaced = phase in ("save:swapped", "save:latest", "save:aside", "delete:renamed")
    assert _version(latest) == ("new" if replaced else "old")
    assert _version(out / "checkpoint-2") == "old"


def test_kill_while_pruning(tmp_path: Path):
    out = tmp_path / "run"
    for step in (2, 4):
        _save(out, step, "a")
    _killed_save(out, 6, "a", "delete:renamed kill step=2")  # pruning checkpoint-2 (limit 2)
    _assert_never_lost(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert recover(out) == ["removed .deleting-checkpoint-2, left by an interrupted deletion"]
    assert read_latest(out).name == "checkpoint-6"


def test_incomplete_checkpoints_are_never_resumed_or_loaded(tmp_path: Path, reference: Path):
    """A checkpoint half-deleted by an older version (its files listed, some gone): refused in one paragraph
    (main: a bare AssertionError from DeepSpeed), skipped by ``resume=latest``, refused by the loader."""
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2", "checkpoint-4"))
    (out / "checkpoint-4" / "global_step4" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ResumeError, match=r"checkpoint-4 is not a complete checkpoint \(1 of its files"):
        resolve_resume(load_recipe("demo", [f"train.resume={out / 'checkpoint-4'}"]))
    latest = resolve_resume(load_recipe("demo", [f"train.output_dir={out}", "train.resume=latest"]))
    assert latest == out / "checkpoint-2"  # latest names checkpoint-4, which is incomplete
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        load_trained_model(out / "checkpoint-4")
    assert "checkpoint-4 is incomplete and is ignored" in " ".join(recover(out))


@pytest.mark.slow
def test_killed_while_saving_again_then_resume_latest_equals_the_uninterrupted_run(
    tmp_path: Path, reference: Path, data: list[str]
):
    """The issue's case: resume from an explicit older checkpoint into the run's folder, killed while its
    re-save of step 4 replaces the old checkpoint-4 (``latest``); ``resume=latest`` then continues exactly."""
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2", "checkpoint-4"))
    overrides = [*data, *BASE, *ONE_PROCESS]
    killed = run(out, [*overrides, f"train.resume={out / 'checkpoint-2'}"], fault="save:swapped kill step=4")
    assert killed.rc == -signal.SIGKILL, killed.describe()
    assert read_latest(out).name == "checkpoint-4" and checkpoint_problem(out / "checkpoint-4") is None
    resumed = run(out, [*overrides, "train.resume=latest"])
    assert resumed.rc == 0, resumed.describe()
    assert "removed .deleting-checkpoint-4-replaced, left by an interrupted deletion" in resumed.output
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in resumed.output
    ref, mine = losses_by_step(reference), losses_by_step(out)  # steps 3-4 of the killed run, 5-6 resumed
    assert sorted(mine) == [3, 4, 5, 6] and mine == pytest.approx({s: ref[s] for s in mine}, rel=1e-6)
    for name, tensor in consolidated(reference / "checkpoint-6").items():
        torch.testing.assert_close(consolidated(out / "checkpoint-6")[name], tensor, rtol=1e-6, atol=1e-7)
