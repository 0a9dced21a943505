"""A used output folder is never overwritten silently: a fresh run into a folder with checkpoints refuses,
``resume=latest`` without a ``latest`` file takes the newest complete checkpoint, and a lock stops a second run
in the same folder (the lock of a dead process is taken over, with a message).

On main a fresh run pruned or overwrote the earlier checkpoints, ``resume=latest`` without ``latest`` started
from step 0 over them, and two runs in one folder both "succeeded", interleaving checkpoints and logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from libra_train.config import load_recipe
from libra_train.training.checkpoint import resolve_resume
from libra_train.training.output_dir import (
    LOCK_FILE,
    OutputDirError,
    acquire_lock,
    clear_previous_run,
    refuse_used_folder,
)
from tests.reliability.runs import BASE, ONE_PROCESS, copy_run, run, start, train_records
from tests.reliability.standins import save


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path: Path):
    lock = acquire_lock(tmp_path)
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    with pytest.raises(OutputDirError, match=rf"is in use by another run \(pid {info['pid']} on "):
        acquire_lock(tmp_path)  # a second open file of the same lock: what a second run would hold
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_lock(tmp_path).release()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path: Path):
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "node7", "started": "yesterday"}))
    lock = acquire_lock(tmp_path)  # flock: a dead holder's lock is free, whatever its file says
    assert lock.took_over == f"pid {pid} on node7, started yesterday"
    lock.release()


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path: Path):
    save(tmp_path, 2, "a")
    with pytest.raises(OutputDirError, match="train.resume=latest.*train.overwrite_output_dir=true"):
        refuse_used_folder(tmp_path)
    (tmp_path / "log.jsonl").write_text("{}\n")
    assert clear_previous_run(tmp_path) == [
        f"train.overwrite_output_dir=true: deleted the earlier run's 1 checkpoint(s), latest and log.jsonl in {tmp_path}"
    ]
    refuse_used_folder(tmp_path)  # empty now
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "log.jsonl").exists()


def test_resume_latest_without_the_pointer_takes_the_newest_complete_checkpoint(tmp_path: Path):
    for step in (2, 4, 6):
        save(tmp_path, step, "a", limit=None)
    (tmp_path / "latest").unlink()
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()  # an incomplete one is passed over
    cfg = load_recipe("demo", [f"train.output_dir={tmp_path}", "train.resume=latest"])
    assert resolve_resume(cfg) == tmp_path / "checkpoint-4"  # main: None, a fresh start over the checkpoints


@pytest.mark.slow
def test_train_py_refuses_a_fresh_run_into_a_used_folder(tmp_path: Path, reference: Path, data):
    out = copy_run(reference, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("checkpoint-*")}
    result = run(out, [*data, *BASE, *ONE_PROCESS])
    assert result.rc == 1, result.describe()
    assert (
        "already holds checkpoints of an earlier run (3: checkpoint-2, checkpoint-4, checkpoint-6"
        in result.output
    )
    assert "train.resume=latest" in result.output and "train.overwrite_output_dir=true" in result.output
    assert "Traceback" not in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("checkpoint-*")} == before


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused_while_the_first_goes_on(tmp_path: Path, data):
    out = tmp_path / "run"
    overrides = [*data, *BASE, *ONE_PROCESS]
    first = start(out, [*overrides, "train.max_steps=500"], fault="step_end sleep=0.2")  # runs until stopped
    first.wait_for(lambda: len(train_records(out)) >= 1)
    second = run(out, [*overrides, "train.resume=latest"])
    assert second.rc == 1, second.describe()
    assert f"train.output_dir={out} is in use by another run (pid {first.proc.pid} on " in second.output
    assert first.proc.poll() is None  # the first run goes on
    os.kill(first.proc.pid, signal.SIGTERM)
    done = first.finish()
    assert done.rc == 128 + signal.SIGTERM, done.describe()
    steps = [r["step"] for r in train_records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one run's records only
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_overwrite_output_dir_starts_over_and_takes_over_a_stale_lock(tmp_path: Path, reference: Path, data):
    out = copy_run(reference, tmp_path / "run")
    (out / "log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    pid = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": "node7", "started": "yesterday"}))
    result = run(out, [*data, *BASE, *ONE_PROCESS, "train.overwrite_output_dir=true"])
    assert result.rc == 0, result.describe()
    assert f"took over the lock {out / LOCK_FILE} of pid {pid} on node7, started yesterday" in result.output
    assert "deleted the earlier run's 3 checkpoint(s), latest and log.jsonl" in result.output
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]
