"""Launch ``train.py`` as a user would, watch its output with timestamps, signal or kill it, and clean up.

Every launch starts a new session (process group) so a test can send Ctrl-C the way a terminal does
(``killpg``) and can always remove what it started, ranks included, when a run hangs (a hang is a test failure,
reported with the output so far, never a stuck CI job).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from libra_train.training.dist import free_port

REPO = Path(__file__).resolve().parents[2]
# 6 optimizer steps of a global batch of 4 on the shared demo data (see conftest.demo_data), a checkpoint every
# 2 steps, no evaluation until the end.
BASE = [
    "train.global_batch_size=4",
    "train.max_steps=6",
    "train.save_steps=2",
    "train.eval_steps=null",
    "logging.log_every=1",
    "logging.progress=false",
]
ONE_PROCESS = ["train.micro_batch_size=4"]
TWO_PROCESSES = ["train.micro_batch_size=2"]
HUNG_AFTER_S = (
    240  # far beyond a run's few seconds: a run still alive then is hung (main hung for 30 minutes)
)


@dataclass
class Result:
    """A finished (or killed-as-hung) run.

    Attributes:
        rc: exit status (negative: killed by that signal); None when it hung and was killed by the test.
        lines: ``(seconds since start, line)`` of stdout and stderr together.
        seconds: from start to exit.
    """

    rc: int | None
    lines: list[tuple[float, str]]
    seconds: float

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def at(self, text: str) -> float | None:
        """When the first line containing ``text`` appeared (seconds since start), or None."""
        return next((t for t, line in self.lines if text in line), None)

    def count(self, text: str) -> int:
        return self.output.count(text)

    def describe(self) -> str:
        return f"rc={self.rc} after {self.seconds:.1f} s; output:\n{self.output[-6000:]}"


@dataclass
class Launch:
    """A running ``train.py``: the launcher's process, or (``ranks=N``) the N rank processes started directly."""

    procs: list[subprocess.Popen]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def proc(self) -> subprocess.Popen:
        """The first process: the launcher, or rank 0 (each process leads a process group of its own)."""
        return self.procs[0]

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic() - self.started, line))

    def wait_for(self, predicate, timeout: float = HUNG_AFTER_S) -> None:
        """Poll ``predicate()`` until it is true; fails (after stopping the run) when the run ends first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                result = self.finish(timeout=10)
                raise AssertionError(
                    f"the run ended or stalled before the expected moment: {result.describe()}"
                )
            time.sleep(0.05)

    def finish(self, timeout: float = HUNG_AFTER_S) -> Result:
        """Wait for the run (and every process writing to its output) to end; kill all of them if it hangs."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.reader.join(timeout=max(0.1, deadline - time.monotonic()))  # ranks outliving a launcher
            hung = self.reader.is_alive()
        except subprocess.TimeoutExpired:
            hung = True
        seconds = time.monotonic() - self.started
        if hung:
            self.kill_all()
            self.reader.join(timeout=10)
        rcs = [proc.returncode for proc in self.procs]
        rc = next((c for c in rcs if c != 0), 0)  # the launcher's, or the first failing rank's
        return Result(None if hung else rc, list(self.lines), seconds)

    def kill_all(self) -> None:
        """SIGKILL the process groups this launch started (each process started one)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)

    def ranks(self) -> dict[int, int]:
        """``rank -> pid`` of the ``train.py`` processes."""
        import psutil

        if len(self.procs) > 1 or "train.py" in self.proc.args[1:2]:
            return {rank: proc.pid for rank, proc in enumerate(self.procs)}
        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "train.py" in argv:
                flag = next((a for a in argv if a.startswith("--local_rank=")), "--local_rank=0")
                found[int(flag.split("=")[1])] = child.pid
        return found


def start(
    output_dir: Path,
    overrides: list[str],
    nproc: int | None = None,
    fault: str | None = None,
    ranks: int | None = None,
) -> Launch:
    """Start ``train.py recipe=demo`` into ``output_dir``.

    Args:
        nproc: None = ``python train.py``; N = the DeepSpeed launcher with N processes.
        fault: a ``LIBRA_TRAIN_FAULT`` value (libra_train.training.faults).
        ranks: start this many ``python train.py`` processes directly, with the variables a launcher sets
            (as ``srun`` or a Kubernetes job does): no launcher that would kill the others when one exits.
    """
    args = ["train.py", "recipe=demo", f"train.output_dir={output_dir}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    env["OMP_NUM_THREADS"] = "1"  # see tests/training/train_helpers.py
    env.pop("LIBRA_TRAIN_FAULT", None)
    if fault is not None:
        env["LIBRA_TRAIN_FAULT"] = fault
    read, write = os.pipe()
    common = {"cwd": REPO, "stdout": write, "stderr": subprocess.STDOUT, "start_new_session": True}
    if ranks is None:
        command = [sys.executable, *args]
        if nproc is not None:
            launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
            command = [*launcher, "--master_port", str(free_port()), *args]
        procs = [subprocess.Popen(command, env=env, **common)]
    else:
        world = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1"}
        world["MASTER_PORT"] = str(free_port())
        procs = []
        for rank in range(ranks):
            rank_env = {**env, **world, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, **common))
    os.close(write)
    launch = Launch(procs, time.monotonic())
    launch.reader = threading.Thread(target=launch._read, args=(os.fdopen(read),), daemon=True)
    launch.reader.start()
    return launch


def run(
    output_dir: Path,
    overrides: list[str],
    nproc: int | None = None,
    fault: str | None = None,
    timeout: float = HUNG_AFTER_S,
    ranks: int | None = None,
) -> Result:
    """`start` and `Launch.finish`."""
    return start(output_dir, overrides, nproc, fault, ranks).finish(timeout)


def train_records(output_dir: Path) -> list[dict]:
    """The training records (with a loss) of ``<output_dir>/log.jsonl``."""
    path = output_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def eval_records(output_dir: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (output_dir / "log.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """Step -> loss of the last record of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in train_records(output_dir)}


def copy_run(source: Path, target: Path, keep: tuple[str, ...] | None = None) -> Path:
    """A copy of a run folder (checkpoints restricted to ``keep`` names when given; ``latest`` then names the
    last of them), without its lock and its log."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = {"train.lock", "log.jsonl"}
        if keep is not None and Path(folder) == source:
            skip |= {n for n in names if n.startswith("checkpoint-") and n not in keep}
        return [n for n in names if n in skip]

    shutil.copytree(source, target, ignore=ignore)
    if keep is not None:
        (target / "latest").write_text(keep[-1] + "\n")
    return target


def consolidated(checkpoint: Path) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint, merged (what an export would hold)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
