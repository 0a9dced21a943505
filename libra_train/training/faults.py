"""Test-only fault injection: kill, raise, stall or fill the disk at marked points of a run.

The reliability tests (``tests/reliability/``) need a process to die at an exact phase of a checkpoint save,
one rank to fail inside its forward, or steps slow enough to send a signal mid-run. The points are marked in
the code with `point`; the environment variable ``LIBRA_TRAIN_FAULT`` arms some of them::

    LIBRA_TRAIN_FAULT="save:swapped kill step=4"       # SIGKILL this process once the new checkpoint-4 is in place
    LIBRA_TRAIN_FAULT="forward raise rank=1 hit=2"     # RuntimeError in rank 1's second training forward
    LIBRA_TRAIN_FAULT="step_end sleep=2"               # every step ends with a 2 s pause
    LIBRA_TRAIN_FAULT="save:begin fill=1000000 step=4" # fill the output disk up to 1 MB before saving step 4

A spec is ``<point> <action> [rank=R] [step=N] [hit=K]``; several are separated by ``;``. ``rank`` defaults to
every rank, ``step`` to every step, ``hit`` (the K-th time this process reaches the point, 1-based) to every
time. Without the variable `point` returns at once, so production runs pay one environment lookup per call.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ENV = "LIBRA_TRAIN_FAULT"
_hits: Counter = Counter()


@dataclass(frozen=True)
class Fault:
    point: str
    action: str  # kill | raise | sleep=SECONDS | fill=BYTES_LEFT
    rank: int | None = None
    step: int | None = None
    hit: int | None = None


def parse(text: str) -> list[Fault]:
    """The faults of a ``LIBRA_TRAIN_FAULT`` value (see the module doc)."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        point, action, *options = spec.split()
        keys = dict(option.split("=", 1) for option in options)
        unknown = set(keys) - {"rank", "step", "hit"}
        if unknown or not (action in ("kill", "raise") or action.split("=")[0] in ("sleep", "fill")):
            raise ValueError(f"{ENV}: cannot read {spec!r} (see libra_train.training.faults)")
        faults.append(Fault(point, action, **{k: int(v) for k, v in keys.items()}))
    return faults


def armed(name: str) -> bool:
    """Whether ``LIBRA_TRAIN_FAULT`` names the point ``name`` at all (for hooks that cost something to install)."""
    return any(f.point == name for f in parse(os.environ.get(ENV, "")))


def point(name: str, *, step: int | None = None, path: Path | None = None) -> None:
    """A marked point: do what ``LIBRA_TRAIN_FAULT`` says for it, if anything.

    Args:
        name: the point's name (``save:begin``, ``prune:partial``, ...).
        step: the optimizer step the run is at, for ``step=`` filters.
        path: a folder on the disk that ``fill`` fills.
    """
    text = os.environ.get(ENV)
    if not text:
        return
    _hits[name] += 1
    rank = int(os.environ.get("RANK", "0"))
    for fault in parse(text):
        if fault.point != name or fault.rank not in (None, rank) or fault.step not in (None, step):
            continue
        if fault.hit not in (None, _hits[name]):
            continue
        _act(fault, name, path)


def _act(fault: Fault, name: str, path: Path | None) -> None:
    action, _, value = fault.action.partition("=")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` or the OOM killer does: no clean-up runs
    elif action == "raise":
        raise RuntimeError(f"fault injected at {name} ({ENV})")
    elif action == "sleep":
        time.sleep(float(value))
    elif action == "fill" and path is not None:
        _fill(path, int(value))


def _fill(folder: Path, leave: int) -> None:
    """Write ``<folder>/../fault-ballast`` until about ``leave`` bytes are free on that disk (another job's
    files filling a shared disk between the space check and the write)."""
    import shutil

    ballast = folder.parent / "fault-ballast"
    with open(ballast, "ab") as f:
        chunk = b"\0" * (1 << 20)
        while (free := shutil.disk_usage(folder.parent).free) > leave:
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break


def arm_forward(model) -> None:
    """Mark every forward of ``model`` as the point ``forward`` (only when a fault names it)."""
    if armed("forward"):
        model.register_forward_pre_hook(lambda module, args: point("forward"))
