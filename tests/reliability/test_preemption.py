"""Preemption: SIGTERM and Ctrl-C save a checkpoint at the next step boundary (all ranks agree on the step) and
exit with "resume with train.resume=latest"; a second signal exits at once; the ranks exit when the launcher dies.

On main Ctrl-C printed a KeyboardInterrupt traceback and saved nothing, SIGTERM killed the ranks mid-step, and
killing the launcher left both ranks training as orphans. The runs sleep at every step end (a test-only fault)
so that a signal lands mid-run.
"""

from __future__ import annotations

import json
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


def _stopped_at(result) -> int:
    line = next(line for _, line in result.lines if line.startswith("stopped at step "))
    return int(line.split()[3])


def _assert_saved_and_resumable(out: Path, step: int) -> None:
    latest = read_latest(out)
    assert latest == out / f"checkpoint-{step}" and checkpoint_problem(latest) is None
    assert not list(out.glob(".tmp-step-*"))


def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_one_checkpoint(tmp_path: Path, data):
    out = tmp_path / "run"
    launch = start(out, [*data, *BASE, *TWO_PROCESSES, "train.save_steps=null"], ranks=2, fault=SLOW_STEPS)
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
    files = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["files"]
    shards = f"global_step{step}/zero_pp_rank_{{}}_mp_rank_00_optim_states.pt"
    assert {"rng_state_0.pth", "rng_state_1.pth", shards.format(0), shards.format(1)} <= set(files)


def test_ctrl_c_saves_at_the_next_step_and_the_resume_equals_the_uninterrupted_run(
    tmp_path: Path, reference, data
):
    """Ctrl-C as under the ``deepspeed`` launcher: the terminal's SIGINT, and right after it the SIGTERM that
    the launcher forwards. One request, not a second signal: the run still saves."""
    out = tmp_path / "run"
    overrides = [*data, *BASE, *ONE_PROCESS, "train.save_steps=null"]
    launch = start(out, overrides, fault=SLOW_STEPS)
    launch.wait_for(lambda: len(train_records(out)) >= 2)
    os.killpg(launch.proc.pid, signal.SIGINT)  # the terminal signals the whole process group
    time.sleep(0.05)
    os.kill(launch.proc.pid, signal.SIGTERM)  # deepspeed/launcher/launch.py's sigkill_handler
    result = launch.finish()
    assert result.rc == 128 + signal.SIGINT, result.describe()
    assert result.count("SIGINT received: finishing this step, saving a checkpoint and stopping") == 1
    assert "received again" not in result.output
    assert "KeyboardInterrupt" not in result.output and "Traceback" not in result.output
    step = _stopped_at(result)
    assert "resume with train.resume=latest" in result.output
    _assert_saved_and_resumable(out, step)

    resumed = run(out, [*overrides, "train.resume=latest"])
    assert resumed.rc == 0, resumed.describe()
    assert losses_by_step(out) == pytest.approx(losses_by_step(reference), rel=1e-6)
    assert eval_records(out)[-1]["eval_loss"] == pytest.approx(
        eval_records(reference)[-1]["eval_loss"], rel=1e-6
    )


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
