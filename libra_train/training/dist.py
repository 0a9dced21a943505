"""The process group: launcher variables, CPU threads, collectives used by the loop.

``deepspeed train.py`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; ``python train.py`` sets
nothing, and ``deepspeed.initialize`` then looks for mpi4py. `init_distributed` fills single-process defaults
so both launches take the same path, and opens the process group (gloo on CPU, NCCL on GPU) through
``deepspeed.init_distributed``.

Control messages (the stop vote at every step boundary, decisions rank 0 takes for all) go through a gloo group:
on GPU a CPU all-reduce of a few integers costs no device synchronisation.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")
_control_group: Any = (
    None  # a gloo group for control messages when the main group is NCCL (None: the main group)
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands.

    Attributes:
        rank, local_rank, world_size: data-parallel coordinates.
        device: ``cuda:<local_rank>`` on GPU, else ``cpu``.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT / the launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_launch_defaults(local_rank: int | None = None) -> None:
    """Single-process defaults for the launcher's variables, and the accelerator / thread settings.

    Call before importing deepspeed. On a CPU-only machine ``DS_ACCELERATOR=cpu`` (DeepSpeed would detect it
    too, with a warning). With several processes on one CPU machine, each gets ``cores / local processes``
    intra-op threads (``OMP_NUM_THREADS`` wins when set): two processes with two threads each on two cores
    make the first step take seconds.
    """
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_size = int(
            os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ["WORLD_SIZE"]))
        )
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(
            1, (os.cpu_count() or 1) // max(local_size, 1)
        )
        if local_size > 1:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


def init_distributed(local_rank: int | None = None) -> DistEnv:
    """Set the defaults (`set_launch_defaults`) and open the process group.

    Args:
        local_rank: the launcher's ``--local_rank`` (the environment variable is used when None).
    """
    set_launch_defaults(local_rank)
    import deepspeed  # after DS_ACCELERATOR is set

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30)
    )
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    global _control_group
    if cuda and torch_dist.get_world_size() > 1:
        _control_group = torch_dist.new_group(backend="gloo")
    if not cuda and torch_dist.get_world_size() > 1:
        release_shm_buffer(torch_dist.get_rank())
    return DistEnv(torch_dist.get_rank(), local, torch_dist.get_world_size(), device)


SHM_DIR = "/dev/shm"


def shm_buffer_path(rank: int) -> str:
    """The shared-memory all-reduce buffer DeepSpeed's CPU backend creates for ``rank`` of this process group
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    return os.path.join(SHM_DIR, name)


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped every buffer.

    DeepSpeed 0.19's CPU backend creates one 66 MB shared-memory file per rank at ``init_distributed`` and never
    unlinks it, so every multi-process CPU run (killed or not) leaves them in ``/dev/shm``, where they hold RAM
    until the machine reboots: 100 runs on one machine had piled up 6.6 GB. ``shm_initialize`` returns only
    after it has mapped every other rank's buffer, so after a barrier no rank opens a buffer by name again;
    unlinking the names then frees nothing in use (the mappings stay valid until the processes exit, and the
    memory goes back when they do, however they end).
    """
    torch_dist.barrier()  # on every rank, whatever it finds below: a rank-dependent barrier would hang
    with contextlib.suppress(FileNotFoundError):  # another DeepSpeed version or transport: nothing to release
        os.unlink(shm_buffer_path(rank))


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (a new float64 tensor on the values' device; itself in one process)."""
    out = values.detach().to(torch.float64).clone()
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        if out.device.type == "cpu" and torch_dist.get_backend() == "nccl":
            out = out.cuda()
        torch_dist.all_reduce(out)
    return out.to(values.device)


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_ints(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (a CPU all-reduce over the control group; ``[value]`` alone)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [value]
    box = torch.zeros(torch_dist.get_world_size(), dtype=torch.int64)
    box[torch_dist.get_rank()] = value
    torch_dist.all_reduce(box, group=_control_group)
    return box.tolist()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

    For decisions that touch shared files (the folder lock, clean-up, which checkpoint to resume): one rank
    takes them, and all ranks take the same branch afterwards, so none waits in a collective that the others
    skipped. The result and the exception must pickle.
    """
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if torch_dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            outcome = (False, exc)
    box = [outcome]
    torch_dist.broadcast_object_list(box, src=0, group=_control_group)
    ok, value = box[0]
    if not ok:
        value.libra_raised_on_every_rank = True  # see supervise.raised_on_every_rank
        raise value
    return value


def cleanup() -> None:
    """Barrier, then close the process group (avoids a rare abort at exit with several processes)."""
    if torch_dist.is_initialized():
        barrier()
        torch_dist.destroy_process_group()
