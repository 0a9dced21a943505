"""Disk space: a save that does not fit is refused before anything is written (path, needed, free); a write that
fails on a full disk says "no space left on ...", removes its partial folder and leaves ``latest`` on the last
complete checkpoint.

On main a full disk ended in ``basic_ios::clear: iostream error ... unexpected pos`` with no word of space or
path, and left a ``.tmp-step-N`` behind. The end-to-end test runs ``train.py`` on a real, small tmpfs (a mount
namespace of its own, ``unshare -rm``; skipped where the kernel does not allow one) and fills it between the
space check and the write, as another job writing to a shared disk would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from libra_train.training import output_dir
from libra_train.training.output_dir import CheckpointError, space_problem, write_failure
from tests.reliability.runs import BASE, ONE_PROCESS, REPO
from tests.reliability.standins import save

Usage = namedtuple("Usage", "total used free")
TORCH_FULL_DISK = RuntimeError(
    "[enforce fail at inline_container.cc:664] . unexpected pos 3028672 vs 3028560"
)  # what torch.save raises on ENOSPC: no errno, no word of space


def test_a_save_that_does_not_fit_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    save(tmp_path, 2, "a")
    size = sum(p.stat().st_size for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file())
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, size - 1))
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 4, "a")
    message = str(info.value)
    assert f"not enough disk space to write checkpoint-4 into {tmp_path}" in message
    assert f"it needs about {output_dir.human(size)}, {output_dir.human(size - 1)} is free" in message
    assert "room for one more checkpoint beyond train.save_total_limit" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]


def test_a_write_failure_on_a_full_disk_is_named(tmp_path: Path):
    error = write_failure(TORCH_FULL_DISK, tmp_path, "checkpoint-4", needed=12_000_000, free=4096)
    assert str(error).startswith(
        f"no space left on {output_dir.mount_point(tmp_path)} while writing checkpoint-4"
    )
    assert "no earlier checkpoint exists" in str(error)
    other = write_failure(PermissionError(13, "Permission denied"), tmp_path, "checkpoint-4", 10, 10**9)
    assert str(other).startswith("could not write checkpoint-4") and "Permission denied" in str(other)
    assert space_problem(tmp_path, 1, "x") is None


def _small_disk_runs(tmp_path: Path, data: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """Two runs on a 40 MB tmpfs (a checkpoint of the tiny model is about 12 MB): the first saves
    checkpoint-2, then the disk is filled before its checkpoint-4; the second resumes on the full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    overrides = [*data, *BASE, *ONE_PROCESS, "train.save_total_limit=1"]
    train = [sys.executable, "train.py", "recipe=demo", f"train.output_dir={out}", *overrides]
    inspect = (
        "import json, sys; from pathlib import Path; from libra_train.training.output_dir import "
        "checkpoint_problem, read_latest; out = Path(sys.argv[1]); latest = read_latest(out); "
        "print('STATE ' + json.dumps({'names': sorted(p.name for p in out.iterdir()), 'latest': latest and "
        "latest.name, 'complete': latest is not None and checkpoint_problem(latest) is None}))"
    )
    script = (
        'mount -t tmpfs -o size=40m tmpfs "$1" || exit 99\n'
        'LIBRA_TRAIN_FAULT="save:begin fill=300000 step=4" "${@:2}" 2>&1; echo "RC1 $?"\n'
        '"${@:2}" train.resume=latest 2>&1; echo "RC2 $?"\n'
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("LIBRA_TRAIN_FAULT", None)
    command = [
        "unshare",
        "-rm",
        "bash",
        "-c",
        script + f'{sys.executable} -c "{inspect}" "$1/run"',
        "sh",
        disk,
    ]
    done = subprocess.run([*command, *train], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 99 or "RC1" not in done.stdout:
        pytest.skip(f"no tmpfs in an unprivileged mount namespace here: {done.stderr[-300:]}")
    state = json.loads(next(line[6:] for line in done.stdout.splitlines() if line.startswith("STATE ")))
    return done, state


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("unshare") is None or sys.platform != "linux", reason="needs unshare (Linux)"
)
def test_train_py_on_a_disk_that_fills_up(tmp_path: Path, data):
    done, state = _small_disk_runs(tmp_path, data)
    output = done.stdout
    first, second = output.split("RC1 ")[0], output.split("RC1 ")[1]
    assert "RC1 1" in output and "RC2 1" in output, output[-6000:]
    assert "error: no space left on " in first and "while writing checkpoint-4" in first, first[-4000:]
    assert "its partial folder was removed and `latest` still names checkpoint-2" in first
    assert "error: not enough disk space to write a checkpoint into" in second, second[-4000:]
    assert "room for one more checkpoint beyond train.save_total_limit" in second
    assert "Traceback" not in output and "basic_ios" not in output
    assert state == {
        # no .tmp-step-4; data_cache is the data pre-check's cache (data.cache_dir's default)
        "names": ["checkpoint-2", "data_cache", "fault-ballast", "latest", "log.jsonl"],
        "latest": "checkpoint-2",
        "complete": True,
    }
