"""A multi-process CPU run leaves no DeepSpeed all-reduce buffer in /dev/shm (DeepSpeed 0.19 never unlinks
them: 66 MB of RAM per rank per run, until reboot), and the all-reduce still works after the names are gone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from libra_train.training.dist import SHM_DIR, free_port


def _rank(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(
            world
        ),  # what the deepspeed launcher sets: DeepSpeed uses its shm all-reduce only then
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed import comm

    from libra_train.training.dist import init_distributed, shm_buffer_path

    env = init_distributed()
    values = torch.full((1000,), float(rank + 1))
    comm.all_reduce(values)  # DeepSpeed's shared-memory all-reduce, after the names were unlinked
    comm.barrier()
    own = os.path.exists(shm_buffer_path(env.rank))
    (out / f"rank{rank}.json").write_text(json.dumps({"sum": values[0].item(), "own_buffer_left": own}))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")
def test_two_cpu_ranks_leave_no_shm_buffer(tmp_path):
    port = free_port()
    mp.spawn(_rank, args=(2, port, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert not any(r["own_buffer_left"] for r in results)
    left = [name for name in os.listdir(SHM_DIR) if f"_{port}_" in name]
    assert left == [], left
