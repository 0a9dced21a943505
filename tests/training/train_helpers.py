"""Launch ``train.py`` in subprocesses (one process, or the DeepSpeed launcher) and read back what it wrote.

A plain module (``tests.training.train_helpers``) rather than fixtures in ``conftest.py``: the runs are module-scoped
fixtures of the test module that compares them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from libra_train.training.dist import free_port

REPO = Path(__file__).resolve().parents[2]
# A small demo run: 40 image samples (+1 text-only), 4 optimizer steps of a global batch of 4.
SMALL = [
    "data.demo.n_train=40",
    "data.demo.n_val=8",
    "train.global_batch_size=4",
    "train.max_steps=4",
    "train.save_steps=2",
    "train.eval_steps=null",
    "logging.log_every=1",
    "logging.progress=false",
]


def run_train(
    output_dir: Path, overrides: list[str], nproc: int | None = None, timeout: int = 600, recipe: str = "demo"
) -> str:
    """Run ``train.py recipe=<recipe>`` into ``output_dir`` and return its stdout.

    Args:
        nproc: None = ``python train.py`` (no launcher); N = ``deepspeed --num_gpus N`` (adds ``--local_rank``).
    """
    args = ["train.py", f"recipe={recipe}", f"train.output_dir={output_dir}", *overrides]
    if nproc is None:
        command = [sys.executable, *args]
    else:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
        command = [*launcher, "--master_port", str(free_port()), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    # One thread per process: two processes on two cores; and a single process too, because on a loaded machine
    # (tests running side by side) two OpenMP threads per process made steps 10-30x slower.
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def read_log(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``<output_dir>/log.jsonl``."""
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def losses(output_dir: Path) -> list[float]:
    """The per-step training losses (the runs log every step)."""
    return [r["loss"] for r in read_log(output_dir)[0]]
