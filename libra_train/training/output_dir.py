"""The output folder of a run: one run at a time, checkpoints that cannot be lost, disk space checked first.

Layout of ``train.output_dir``::

    train.lock              held (``flock``) by the running rank 0: a second run into the folder is refused
    checkpoint-<step>/      complete checkpoints; their trainer_state.json, written last, lists every file + size
    latest                  the name of the newest complete checkpoint (what ``train.resume=latest`` resumes)
    log.jsonl, demo_data/   metrics, generated data
    .tmp-step-<step>/       a checkpoint being written (or, just after a re-save, the old one it replaced)
    .deleting-<name>/       a checkpoint being deleted: it is renamed first, so no ``checkpoint-<step>`` is ever
                            half-deleted

What holds at every instant, whatever kills the process (the fault tests of ``tests/reliability`` kill it at
each phase): ``latest`` names a complete checkpoint (or does not exist yet); a ``checkpoint-<step>`` folder is
complete; everything else is a leftover that `recover` finishes (a complete new checkpoint is moved into place)
or deletes at the next start. Saving the same step again (a run resumed from an older checkpoint) exchanges the
new folder with the old one in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux); where the file system cannot
exchange, the old one is renamed away and the new one renamed in, and a crash between the two renames is
repaired by `recover` from the complete ``.tmp-step-<step>``. Writes are not ``fsync``-ed: this survives a
killed process, not a power cut of the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libra_train.training import faults

LOCK_FILE = "train.lock"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
LOG_FILE = "log.jsonl"
TMP_PREFIX = ".tmp-step-"
DELETING_PREFIX = ".deleting-"
CHECKPOINT_PREFIX = "checkpoint-"
ROOM_NOTE = (
    "A save needs room for one more checkpoint beyond train.save_total_limit while the new one is written "
    "(the oldest is deleted only once the new one is complete)"
)


class OutputDirError(ValueError):
    """The output folder cannot be used as asked (in use, holds another run); the message says what to pass."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written (no space, write failure) or is not complete; the message is one paragraph."""


# -- checkpoints in a folder ------------------------------------------------------------------------------------
def step_of(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    name = path.name
    tail = name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else None


def checkpoints(out: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder of ``out``, complete or not, oldest step first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def read_state(path: Path) -> dict[str, Any] | None:
    """The ``trainer_state.json`` of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "step" in state else None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    A checkpoint is complete when its ``trainer_state.json`` (written last) reads back and every file it lists
    has the listed size. Checkpoints written before the list existed are checked for the files every one has.
    """
    if not path.is_dir():
        return "it does not exist"
    state = read_state(path)
    if state is None:
        return f"it has no readable {TRAINER_STATE}, which a save writes last: the save did not finish"
    files = state.get("files")
    if isinstance(files, dict):
        missing = [n for n, size in files.items() if not _has_file(path / n, size)]
    else:
        tag = f"global_step{state['step']}"
        required = ["recipe.yaml", *(f"rng_state_{r}.pth" for r in range(int(state.get("world_size", 1))))]
        missing = [n for n in required if not (path / n).is_file()]
        if not any((path / tag).glob("*model_states.pt")):
            missing.append(f"{tag}/*model_states.pt")
    if missing:
        return f"{len(missing)} of its files are missing or truncated (e.g. {missing[0]})"
    return None


def _has_file(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def manifest(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative POSIX path -> size in bytes), for ``trainer_state.json``."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }


def read_latest(out: Path) -> Path | None:
    """The checkpoint ``<out>/latest`` names, or None without the file."""
    pointer = out / LATEST
    if not pointer.is_file():
        return None
    return out / pointer.read_text().strip()


def write_latest(out: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically (write a temporary file, rename it over the old one)."""
    tmp = out / f"{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, out / LATEST)


def newest_complete(out: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = [p for p in checkpoints(out) if checkpoint_problem(p) is None]
    return complete[-1] if complete else None


# -- replacing and deleting -------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not supported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. NFS, some FUSE mounts
        return False
    raise OSError(err, os.strerror(err), str(b))


def move_into_place(tmp: Path, final: Path) -> Path | None:
    """Rename the complete checkpoint ``tmp`` to ``final``. When ``final`` exists (the same step saved again),
    returns where the old one now is, ``.deleting-<name>-replaced``, for `delete_checkpoint`.

    With ``renameat2(RENAME_EXCHANGE)`` the new and the old folder swap names in one step, so ``final`` is a
    complete checkpoint at every instant; without it (see the module doc) the old one is renamed aside first.
    """
    if not final.exists():
        os.replace(tmp, final)
        return None
    aside = final.with_name(f"{DELETING_PREFIX}{final.name}-replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if _exchange(tmp, final):
        os.replace(tmp, aside)  # the old checkpoint, now under the temporary name
        return aside
    os.replace(final, aside)
    faults.point("save:aside", step=step_of(final))
    os.replace(tmp, final)
    return aside


def delete_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: first renamed to ``.deleting-<name>`` (no longer a checkpoint, at once), then
    removed. A kill in between leaves a leftover that `recover` removes, never a half-deleted checkpoint."""
    aside = path if path.name.startswith(DELETING_PREFIX) else path.with_name(DELETING_PREFIX + path.name)
    if aside != path:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    step = re.search(r"checkpoint-(\d+)", aside.name)
    faults.point("delete:renamed", step=int(step.group(1)) if step else None)
    shutil.rmtree(aside, ignore_errors=True)


def prune(out: Path, limit: int | None, keep: Path) -> list[Path]:
    """Delete the oldest ``checkpoint-*`` beyond ``limit`` (never ``keep``); returns the deleted folders."""
    if not limit:
        return []
    found = checkpoints(out)
    excess = [p for p in found if p != keep][: max(0, len(found) - limit)]
    for path in excess:
        delete_checkpoint(path)
    return excess


def recover(out: Path) -> list[str]:
    """Finish or clean up what an interrupted save, prune or overwrite left in ``out``; returns what was done,
    one line each (the caller logs them). Run by the one process that holds the folder's lock."""
    notes: list[str] = []
    if not out.is_dir():
        return notes
    for tmp in sorted(out.glob(TMP_PREFIX + "*")):
        final = out / f"{CHECKPOINT_PREFIX}{tmp.name[len(TMP_PREFIX) :]}"
        if not final.exists() and checkpoint_problem(tmp) is None:
            os.replace(tmp, final)  # a complete save that was killed before (or while) it was renamed
            notes.append(f"completed the interrupted save of {final.name}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            notes.append(f"removed {tmp.name}, left by an interrupted save")
    for dead in sorted(out.glob(DELETING_PREFIX + "*")):
        shutil.rmtree(dead, ignore_errors=True)
        notes.append(f"removed {dead.name}, left by an interrupted deletion")
    (out / f"{LATEST}.tmp").unlink(missing_ok=True)
    for path in checkpoints(out):
        problem = checkpoint_problem(path)
        if problem is not None:
            notes.append(f"{path.name} is incomplete and is ignored ({problem}); delete it")
    return notes


# -- one run per folder -----------------------------------------------------------------------------------------
@dataclass
class RunLock:
    """``<output_dir>/train.lock``, held with ``flock`` by this process (released by the OS if it dies).

    Attributes:
        path: the lock file.
        took_over: the previous holder's description when it had died without removing its lock file.
    """

    path: Path
    fd: int | None
    took_over: str | None = None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


def acquire_lock(out: Path) -> RunLock:
    """Take ``<out>/train.lock`` or refuse: another live run holds it.

    ``flock`` ties the lock to the holder's open file, so the lock of a process that died (crash, ``kill -9``,
    node reboot) is free again even though its file is still there: it is taken over, and `RunLock.took_over`
    says whose it was.

    Raises:
        OutputDirError: a live process holds the lock.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path.read_text()) if path.is_file() else "unknown process"
            os.close(fd)
            raise OutputDirError(
                f"train.output_dir={out} is in use by another run ({holder}; lock file {path}). Two runs in one "
                "folder would interleave their checkpoints and logs: wait for it to finish, stop it, or give this "
                "run another train.output_dir"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is still the lock file (not unlinked by a holder that just finished)
        os.close(fd)
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunLock(path, fd, took_over=_holder(previous) if previous else None)


def clear_previous_run(out: Path) -> list[str]:
    """Delete an earlier run's checkpoints, ``latest`` and ``log.jsonl`` (``train.overwrite_output_dir=true``)."""
    old = checkpoints(out)
    for path in old:
        delete_checkpoint(path)
    (out / LATEST).unlink(missing_ok=True)
    had_log = (out / LOG_FILE).is_file()
    (out / LOG_FILE).unlink(missing_ok=True)
    what = f"{len(old)} checkpoint(s), latest" + (" and log.jsonl" if had_log else "")
    return (
        [f"train.overwrite_output_dir=true: deleted the earlier run's {what} in {out}"]
        if old or had_log
        else []
    )


def refuse_used_folder(out: Path) -> None:
    """A fresh run (``train.resume`` unset) must not prune or overwrite another run's checkpoints.

    Raises:
        OutputDirError: ``out`` holds checkpoints or a ``latest`` pointer.
    """
    found = checkpoints(out)
    latest = read_latest(out)
    if not found and latest is None:
        return
    names = ", ".join(p.name for p in found[-3:]) or "none"
    names = f"{len(found)}: {'..., ' if len(found) > 3 else ''}{names}"
    raise OutputDirError(
        f"train.output_dir={out} already holds checkpoints of an earlier run ({names}; latest: "
        f"{latest.name if latest else 'none'}), which a fresh run would prune or overwrite. Continue that run with "
        "train.resume=latest, start over in this folder with train.overwrite_output_dir=true (deletes them), or "
        "give this run another train.output_dir"
    )


# -- disk space -------------------------------------------------------------------------------------------------
def human(n: float) -> str:
    """Bytes for people: ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def mount_point(path: Path) -> Path:
    """The mount point of the disk ``path`` is on (for "no space left on <disk>")."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def checkpoint_bytes(path: Path) -> int:
    """A complete checkpoint's size on disk (its file list, else a walk)."""
    state = read_state(path) or {}
    files = state.get("files")
    if isinstance(files, dict):
        return sum(files.values()) + (path / TRAINER_STATE).stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def space_problem(out: Path, needed: int, what: str) -> str | None:
    """Why ``what`` (about ``needed`` bytes) does not fit on the disk of ``out``, or None when it does."""
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free >= needed:
        return None
    return (
        f"not enough disk space to write {what} into {out} (on {mount_point(out)}): it needs about "
        f"{human(needed)}, {human(free)} is free. {ROOM_NOTE}. Free some space, set train.output_dir to a "
        "larger disk, or lower train.save_total_limit"
    )


def write_failure(exc: BaseException, out: Path, name: str, needed: int, free: int) -> CheckpointError:
    """The one-paragraph error of a failed checkpoint write; ``free`` was measured when it failed.

    torch reports a full disk as ``basic_ios::clear: iostream error`` or ``unexpected pos`` without the errno,
    so a write that failed with less free space than a checkpoint needs is reported as a full disk too.
    """
    chain, e = [], exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = free < needed or any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
        for e in chain
    )
    latest = read_latest(out)
    kept = f"`latest` still names {latest.name}" if latest else "no earlier checkpoint exists"
    if full:
        return CheckpointError(
            f"no space left on {mount_point(out)} while writing {name} into {out} ({human(free)} free, a "
            f"checkpoint needs about {human(needed)}); its partial folder was removed and {kept}. {ROOM_NOTE}. "
            "Free some space, set train.output_dir to a larger disk, or lower train.save_total_limit; then "
            "resume with train.resume=latest"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(
        f"could not write {name} into {out}: {type(exc).__name__}: {first}; its partial folder was removed and "
        f"{kept}"
    )


def claim_folder(cfg: Any, env: Any) -> tuple[RunLock, list[str]]:
    """Make ``train.output_dir`` this run's: rank 0 takes the lock, refuses (or, with
    ``train.overwrite_output_dir``, clears) an earlier run's checkpoints for a fresh run, and cleans up what
    interrupted saves left; every rank gets the outcome (`dist.on_main`).

    Returns:
        The lock (rank 0 holds it; elsewhere a no-op) and what was done, to log.
    """
    from libra_train.training.dist import on_main

    out = Path(cfg.train.output_dir)
    lock = RunLock(out / LOCK_FILE, None)

    def claim() -> list[str]:
        nonlocal lock
        lock = acquire_lock(out)
        try:
            notes = [f"took over the lock {lock.path} of {lock.took_over}, which is no longer running"]
            notes = notes if lock.took_over else []
            notes += recover(out)
            if cfg.train.resume is None:
                if cfg.train.overwrite_output_dir:
                    notes += clear_previous_run(out)
                else:
                    refuse_used_folder(out)
        except BaseException:
            lock.release()
            raise
        return notes

    notes = on_main(claim)
    return lock, notes
