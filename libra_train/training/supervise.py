"""Keep the processes of a run together: an error on any rank ends every rank, signals stop at a step boundary.

Errors. A rank that fails prints its error once (``error (rank 1 of 2): ...``) and leaves at once
(``os._exit``): waiting in a barrier for ranks that sit in a collective is what hung runs for 30 minutes. The
other ranks are told through the process group's key-value store (the TCPStore at MASTER_ADDR:MASTER_PORT, one
extra client connection per rank): a watchdog thread in every rank polls a counter that the first failing rank
raises, and ends its rank within a fraction of a second, even while its main thread is blocked inside a gloo or
NCCL collective (where no Python code runs). The first rank to raise the counter prints; ranks that fail after
it (their collective broke because a peer left) stay quiet. Rank 0 hosts the store, so it waits (at most a few
seconds) until the others have left before it does.

Stops. SIGTERM (what Slurm and Kubernetes send before killing) and SIGINT (Ctrl-C) only *request* a stop: at the
next step boundary all ranks vote (`Supervisor.stop_vote`, one small all-reduce), so they stop after the same
step, save one checkpoint together and exit with 128 + the signal number and "resume with
train.resume=latest". A second signal stops at once without saving. Signals less than a second after the first
are the same request: the terminal sends Ctrl-C to every process of the job, and DeepSpeed's launcher forwards
it to the ranks as a SIGTERM. The watchdog reads signals from ``signal.set_wakeup_fd``, so a second Ctrl-C
works even when the main thread is stuck in a collective.

Launcher. The watchdog also watches the launcher processes the rank runs under (``deepspeed``'s runner and
``launch.py``, ``torchrun``): when one dies (``kill -9`` of the launcher leaves its ranks running as orphans)
the rank stops as for SIGTERM, and at once if that takes longer than `LAUNCHER_GRACE_S`. This is a polling
thread rather than ``prctl(PR_SET_PDEATHSIG)`` because that only sees the direct parent, not the runner above
``launch.py``, and is Linux-only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libra_train.training.dist import DistEnv, gather_ints

POLL_S = 0.2
GRACE_S = 1.0  # signals this soon after the first belong to the same request
LAUNCHER_GRACE_S = 120.0  # launcher gone: stop at the next step boundary, but not later than this
EXIT_WAIT_S = 5.0  # rank 0 (the store's host) waits this long at most for the others to leave first
FAILED_KEY = "libra_train/failed"
EXITED_KEY = "libra_train/exited"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LAUNCHER_MODULES = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun", "launch.py")
# Stop reasons as voted: 0 = none.
REASONS = {1: "SIGINT", 2: "SIGTERM", 3: "the launcher exited"}
EXIT_CODES = {1: 128 + signal.SIGINT, 2: 128 + signal.SIGTERM, 3: 128 + signal.SIGTERM}


@dataclass(frozen=True)
class StopRequest:
    """What the ranks agreed at a step boundary.

    Attributes:
        reason: ``SIGINT``, ``SIGTERM`` or ``the launcher exited`` (of the lowest rank that had one).
        ranks: the ranks that had a request.
        exit_code: 128 + the signal number.
    """

    reason: str
    ranks: list[int]
    exit_code: int

    def describe(self, world_size: int) -> str:
        where = "" if world_size == 1 else f" (rank {', '.join(map(str, self.ranks))})"
        return f"{self.reason}{where}"


def _launcher_ancestors() -> list[tuple[int, float, str]]:
    """(pid, start time, name) of the launcher processes above this one, nearest first."""
    try:
        import psutil
    except ImportError:  # a DeepSpeed dependency; without it there is nothing to watch
        return []
    found = []
    for proc in psutil.Process().parents():
        try:
            argv = proc.cmdline()
            start = proc.create_time()
        except psutil.Error:
            break
        names = [os.path.basename(a) for a in argv[:3]]
        if not (any(m in argv for m in LAUNCHER_MODULES) or any(s in names for s in LAUNCHER_SCRIPTS)):
            break
        found.append((proc.pid, start, " ".join(argv[:3])))
    return found


def _alive(pid: int, start: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _store_client() -> Any:
    """A client of the process group's TCPStore (a connection of its own, so the watchdog never waits behind
    the main thread)."""
    from torch.distributed import TCPStore

    return TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=10),
    )


def raised_on_every_rank(exc: BaseException) -> bool:
    """Errors every rank raises alike: the recipe (each rank reads the same files) and rank 0's decisions that
    `dist.on_main` hands to every rank."""
    from libra_train.config import RecipeError

    return isinstance(exc, RecipeError) or getattr(exc, "libra_raised_on_every_rank", False)


def describe_error(exc: BaseException) -> str:
    """One paragraph for the errors users cause (bad recipe, data, folder, disk); a traceback for bugs."""
    from torch.distributed import DistError

    from libra_train.config import RecipeError
    from libra_train.data import BadSamplesError, DataError
    from libra_train.training.output_dir import CheckpointError, OutputDirError
    from libra_train.training.resume import ResumeError

    known = (RecipeError, BadSamplesError, DataError, OutputDirError, CheckpointError, ResumeError)
    if isinstance(exc, (*known, FileNotFoundError)):
        return str(exc)
    if isinstance(exc, DistError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"lost contact with another rank (it exited or was killed): {first}"
    return "".join(traceback.format_exception(exc)).rstrip()


class Supervisor:
    """Signals, the error path and the watchdog of one rank (see the module doc).

    Args:
        env: this process's place in the process group (opened before).
    """

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self._request = 0  # this rank's stop request (a REASONS key)
        self._request_at = 0.0
        self._launcher_deadline: float | None = None
        self._closed = threading.Event()
        self._exiting = threading.Lock()
        self._at_exit: list[Callable[[], None]] = []
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup = -1
        self._thread: threading.Thread | None = None
        self._store = self._watch_store = None
        self._ancestors: list[tuple[int, float, str]] = []
        self._wake_r = self._wake_w = None

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Install the signal handlers (call from the main thread) and start the watchdog."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            # The watchdog reacts to the byte the C-level handler writes to the wakeup fd; the Python-level
            # handler only has to exist (no KeyboardInterrupt, no default death).
            self._old_handlers[sig] = signal.signal(sig, lambda signum, frame: None)
        if self.env.world_size > 1:
            self._store, self._watch_store = _store_client(), _store_client()
        self._ancestors = _launcher_ancestors()
        self._thread = threading.Thread(target=self._watch, name="libra-train-watchdog", daemon=True)
        self._thread.start()

    def on_exit(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when this process leaves, by `close` or an abrupt exit (e.g. release the folder lock)."""
        self._at_exit.append(fn)

    def close(self) -> None:
        """Stop the watchdog and restore the signal handlers; call before the final barrier (see `dist.cleanup`)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL_S + 1)
        self._run_exit_hooks()
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_w = None

    # -- stop requests ------------------------------------------------------------------------------------------
    def stop_vote(self) -> StopRequest | None:
        """Whether any rank wants to stop; every rank calls it at the same step boundary (a collective)."""
        codes = gather_ints(self._request)
        ranks = [r for r, c in enumerate(codes) if c]
        if not ranks:
            return None
        code = codes[ranks[0]]
        return StopRequest(REASONS[code], ranks, EXIT_CODES[code])

    def _on_request(self, code: int, note: str) -> None:
        now = time.monotonic()
        if not self._request:
            self._request, self._request_at = code, now
            if self.env.is_main:
                print(note, file=sys.stderr, flush=True)
        elif code != 3 and now - self._request_at >= GRACE_S:
            name = REASONS[code]
            self._abort(
                f"{name} received again: stopped at once without saving; the last complete checkpoint is kept "
                "(resume with train.resume=latest)",
                EXIT_CODES[code],
            )

    def _on_signal(self, signum: int) -> None:
        if signum not in STOP_SIGNALS:
            return
        name = signal.Signals(signum).name
        code = 1 if signum == signal.SIGINT else 2
        self._on_request(
            code,
            f"{name} received: finishing this step, saving a checkpoint and stopping "
            f"(send {name} again to stop at once without saving)",
        )

    # -- errors -------------------------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> int:
        """Print ``exc`` once for the whole job and end it. Returns the exit code in a single process; with
        several processes it ends this one (`os._exit`) after telling the others."""
        message = describe_error(exc)
        if self.env.world_size == 1:
            print(f"error: {message}", file=sys.stderr, flush=True)
            return 1
        everywhere = raised_on_every_rank(exc)  # a bad recipe or folder: every rank has it, rank 0 says it
        if everywhere and self.env.rank != 0 and self._exiting.acquire(blocking=False):
            self._leave(1)
        self._abort(message, 1, show_rank=not everywhere)
        return 1  # not reached

    def _claim(self) -> bool:
        """Raise the job's failure counter; True for the first rank to do so (it prints)."""
        try:
            return self._store.add(FAILED_KEY, 1) == 1
        except Exception:  # the store is gone (rank 0 died): nobody else can have claimed it in a way we see
            return True

    def _abort(self, message: str, code: int, show_rank: bool = True) -> None:
        """Print ``message`` if this rank is the first to fail, tell the others, leave now."""
        if not self._exiting.acquire(blocking=False):  # another thread of this process is already leaving
            time.sleep(EXIT_WAIT_S + 5)
            os._exit(code)
        prefix = "error" if code == 1 else "stopped"
        if self.env.world_size == 1:
            print(f"{prefix}: {message}", file=sys.stderr, flush=True)
        elif self._claim():
            where = f" (rank {self.env.rank} of {self.env.world_size})" if show_rank else ""
            print(f"{prefix}{where}: {message}", file=sys.stderr, flush=True)
        self._leave(code)

    def _run_exit_hooks(self) -> None:
        hooks, self._at_exit = self._at_exit, []
        for fn in hooks:
            with contextlib.suppress(Exception):
                fn()

    def _leave(self, code: int) -> None:
        self._run_exit_hooks()
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.add(EXITED_KEY, 1)
                if self.env.rank == 0:  # the store lives in this process: let the others read it first
                    deadline = time.monotonic() + EXIT_WAIT_S
                    while (
                        self._store.add(EXITED_KEY, 0) < self.env.world_size and time.monotonic() < deadline
                    ):
                        time.sleep(0.05)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    # -- the watchdog thread ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        last_launcher_check = 0.0
        while not self._closed.is_set():
            with contextlib.suppress(OSError, ValueError):
                ready, _, _ = select.select([self._wake_r], [], [], POLL_S)
                if ready:
                    for signum in self._wake_r.recv(256):
                        self._on_signal(signum)
            if self._closed.is_set():
                return
            now = time.monotonic()
            if self._ancestors and now - last_launcher_check > 0.5:
                last_launcher_check = now
                self._check_launcher(now)
            if self._watch_store is not None:
                self._check_peers()

    def _check_launcher(self, now: float) -> None:
        if self._launcher_deadline is not None:
            if now > self._launcher_deadline:
                self._abort(
                    f"the launcher exited and the run did not stop within {LAUNCHER_GRACE_S:.0f} s", 143
                )
            return
        for pid, start, name in self._ancestors:
            if not _alive(pid, start):
                self._launcher_deadline = now + LAUNCHER_GRACE_S
                self._on_request(
                    3,
                    f"the launcher ({name}, pid {pid}) exited: saving a checkpoint after this step and stopping",
                )
                return

    def _check_peers(self) -> None:
        try:
            failed = self._watch_store.add(FAILED_KEY, 0)
        except Exception:
            if not self._closed.is_set():
                self._abort("lost contact with rank 0 (its process is gone); stopping", 1)
            return
        if failed and not self._closed.is_set() and self._exiting.acquire(blocking=False):
            self._leave(1)  # another rank failed and said so
