"""Preemption: SIGTERM and Ctrl-C save a checkpoint at the next step boundary (all ranks agree on the step) and
exit with "resume with train.resume=latest"; a second signal exits at once; the ranks exit when the launcher dies.

On main Ctrl-C printed a KeyboardInterrupt traceback and saved nothing, SIGTERM killed the ranks mid-step, and
killing the launcher left both ranks training as orphans. The runs sleep at every step end (a test-only fault)
so that a signal lands mid-run.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from libra_train.training.output_dir import checkpoint_problem, read_latest
from tests.reliability.runs import (
    BASE,
    ONE_PROCESS,
    TWO_PROCESSES,
    eval_records,
    losses_by_step,
    run,
    start,
    train_records,
)

pytestmark = pytest.mark.slow
SLOW_STEPS = "step_end sleep=0.5"
CLOSE = {"rel": 1e-5, "abs": 1e-6}  # two processes vs one: fp32 summation order only (tests/training)


def _stopped_at(result) -> int:
    line = next(line for _, line in result.lines if line.startswith("stopped at step "))
    return int(line.split()[3])


def _assert_saved_and_resumable(out: Path, step: int) -> None:
    latest = read_latest(out)
    assert latest == out / f"checkpoint-{step}" and checkpoint_problem(latest) is None
    assert not list(out.glob(".tmp-step-*"))


def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_one_checkpoint(
    tmp_path: Path, reference, data
):
    out = tmp_path / "run"
    overrides = [*data, *BASE, *TWO_PROCESSES, "train.save_steps=null"]
    launch = start(out, overrides, ranks=2, fault=SLOW_STEPS)
    launch.wait_for(lambda: len(train_records(out)) >= 2)
    os.kill(launch.ranks()[1], signal.SIGTERM)  # what a scheduler may send to one process only
    sent = time.monotonic() - launch.started
    result = launch.finish()
    assert result.rc == 128 + signal.SIGTERM, result.describe()
    step = _stopped_at(result)
    assert 2 <= step < 6 and f"(SIGTERM (rank 1)); checkpoint: {out / f'checkpoint-{step}'}" in result.output
    assert "resume with train.resume=latest" in result.output and "Traceback" not in result.output
    assert result.seconds - sent < 30, result.describe()
    _assert_saved_and_resumable(out, step)
    assert {f"rng_state_{r}.pth" for r in (0, 1)} <= {p.name for p in (out / f"checkpoint-{step}").iterdir()}

    resumed = run(out, [*overrides, "train.resume=latest"], ranks=2)
    assert resumed.rc == 0, resumed.describe()
    assert losses_by_step(out) == pytest.approx(losses_by_step(reference), **CLOSE)
    assert eval_records(out)[-1]["eval_loss"] == pytest.approx(
        eval_records(reference)[-1]["eval_loss"], **CLOSE
    )


def test_ctrl_c_under_the_deepspeed_launcher_saves_at_the_next_step(tmp_path: Path, data):
    """The terminal sends SIGINT to every process; DeepSpeed's launcher also forwards a SIGTERM to the ranks
    right away: one request, not a second signal, so the ranks still save."""
    out = tmp_path / "run"
    launch = start(out, [*data, *BASE, *TWO_PROCESSES, "train.max_steps=200"], nproc=2, fault=SLOW_STEPS)
    launch.wait_for(lambda: len(train_records(out)) >= 2)
    os.killpg(launch.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    result = launch.finish()
    assert result.rc not in (0, None), result.describe()  # DeepSpeed's runner dies of its KeyboardInterrupt
    assert result.count("SIGINT received: finishing this step, saving a checkpoint and stopping") == 1
    assert "SIGINT received again" not in result.output and "SIGTERM" not in result.output
    step = _stopped_at(result)
    assert "resume with train.resume=latest" in result.output
    _assert_saved_and_resumable(out, step)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path: Path, data):
    out = tmp_path / "run"
    launch = start(out, [*data, *BASE, *ONE_PROCESS], fault="step_end sleep=5")
    launch.wait_for(lambda: len(train_records(out)) >= 1)  # now in the 5 s pause after step 1
    os.killpg(launch.proc.pid, signal.SIGINT)
    time.sleep(1.5)
    os.killpg(launch.proc.pid, signal.SIGINT)
    second = time.monotonic() - launch.started
    result = launch.finish()
    assert result.rc == 128 + signal.SIGINT, result.describe()
    assert "SIGINT received again: stopped at once without saving" in result.output
    assert result.seconds - second < 3, result.describe()
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".tmp-step-*"))


def test_the_ranks_stop_when_the_launcher_is_killed(tmp_path: Path, data):
    out = tmp_path / "run"
    launch = start(out, [*data, *BASE, *TWO_PROCESSES, "train.max_steps=200"], nproc=2, fault=SLOW_STEPS)
    launch.wait_for(lambda: len(train_records(out)) >= 2)
    ranks = launch.ranks()
    assert sorted(ranks) == [0, 1]
    launch.proc.kill()  # SIGKILL the `deepspeed` command: nothing is forwarded to the ranks
    killed = time.monotonic()
    gone = psutil.wait_procs([psutil.Process(pid) for pid in ranks.values()], timeout=60)[1] == []
    waited = time.monotonic() - killed
    result = launch.finish(timeout=30)
    assert gone, f"ranks still running 60 s after the launcher was killed: {result.describe()}"
    assert waited < 30, result.describe()  # on main: 200 steps of 0.5 s, as orphans
    assert (
        "the launcher (" in result.output and "exited: saving a checkpoint after this step" in result.output
    )
    _assert_saved_and_resumable(out, _stopped_at(result))
