"""Experiments made of the project's own entry points: ``train.py`` in a subprocess, export, evaluate an export.

Shared by ``scripts/adapt_demo.py`` and ``scripts/quality.py``: nothing here touches a model's internals, so an
experiment measures exactly what a user running the documented commands gets.

* `train_run` launches ``train.py`` with a recipe and overrides (one process, its output teed to a log), parses
  what it prints (steps, seconds, tokens/s, held-out accuracy) and writes them next to the run. With ``reuse``
  a finished run is taken as it is when it was launched with the same command, so an interrupted experiment
  resumes where it stopped.
* `export_run` exports a run's latest checkpoint (LoRA merged) with ``libra_train.export.export_checkpoint``.
* `evaluate_export` is ``libra_train.infer.load`` + ``libra_train.infer.evaluate`` on a QA file.
* `machine_lock` serialises the CPU-heavy parts of experiments that share a machine (``flock`` on a file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TRAINED = re.compile(r"trained (\d+) steps in ([\d.]+) s \(([\d.]+|nan) tokens/s\)")
HELD_OUT = re.compile(r"held-out accuracy: ([\d.]+)%")
SUMMARY = "run_summary.json"  # written last into a run's output_dir: its presence means the run finished


@contextlib.contextmanager
def machine_lock(path: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (the same lock as ``flock PATH command``); None: no lock."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_run(
    overrides: list[str],
    out_dir: Path,
    log: Path,
    *,
    reuse: bool = False,
    lock: str | os.PathLike | None = None,
    tag: str = "run",
) -> dict[str, Any]:
    """Run ``train.py <overrides> train.output_dir=<out_dir>`` and return what it reported.

    Args:
        overrides: ``recipe=NAME`` and ``key=value`` arguments of ``train.py``.
        out_dir: the run's output directory (wiped first unless the run is reused).
        log: where its stdout + stderr go.
        reuse: take a finished run in ``out_dir`` launched with the same arguments instead of training again.
        lock: hold this machine-wide lock (`machine_lock`) while training.
        tag: prefix of the progress lines printed.

    Returns:
        ``steps``, ``train_seconds``, ``tokens_per_s``, ``train_py_held_out_accuracy`` (None when not printed),
        ``wall_seconds`` and ``overrides``.

    Raises:
        SystemExit: ``train.py`` failed; the message gives the log and its last lines.
    """
    summary = out_dir / SUMMARY
    if reuse and summary.is_file() and (out_dir / "latest").is_file():
        result = json.loads(summary.read_text())
        if result.get("overrides") == overrides:
            print(f"[{tag}] reusing {out_dir}", flush=True)
            return result
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"train.output_dir={out_dir}"]
    with machine_lock(lock):
        shutil.rmtree(out_dir, ignore_errors=True)
        print(f"[{tag}] " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"train.py failed (exit {proc.returncode}); log: {log}\n{tail}")
    found = TRAINED.search(proc.stdout)
    held_out = HELD_OUT.search(proc.stdout)
    result = {
        "steps": int(found.group(1)) if found else None,
        "train_seconds": float(found.group(2)) if found else None,
        "tokens_per_s": float(found.group(3)) if found else None,
        "train_py_held_out_accuracy": float(held_out.group(1)) / 100 if held_out else None,
        "wall_seconds": wall,
        "overrides": overrides,
    }
    summary.write_text(json.dumps(result, indent=2) + "\n")
    return result


def export_run(run_dir: Path, out: Path, reuse: bool = False) -> Path:
    """Export ``run_dir``'s latest checkpoint to ``out`` (LoRA merged); with ``reuse`` keep an export that is
    newer than the run's summary."""
    from libra_train.export import export_checkpoint

    done = out / "config.json"
    if reuse and done.is_file() and done.stat().st_mtime >= (run_dir / SUMMARY).stat().st_mtime:
        return out
    return export_checkpoint(run_dir, out, merge_lora=True, overwrite=True)


def default_image_folder(data: Path) -> Path:
    """The demo layout's ``images/`` beside the QA file when there is one, else the file's folder (as
    ``scripts/evaluate.py``)."""
    return data.parent / "images" if (data.parent / "images").is_dir() else data.parent


def evaluate_export(
    export_dir: Path,
    data: Path,
    libra: Any,
    *,
    limit: int | None = None,
    label: str = "model",
    image_folder: Path | None = None,
    batch_size: int = 32,
) -> Any:
    """Generation accuracy of ``export_dir`` on the QA file ``data`` with the merge config ``libra``
    (``libra_train.infer.load``'s argument: None = the export's, ``"off"``, a dict of overrides, ...).

    Returns:
        The `libra_train.inference.evaluation.EvalResult`.
    """
    from libra_train.infer import evaluate, load, load_qa, prompt_template

    model, processor = load(export_dir, libra=libra)
    return evaluate(
        model, processor, load_qa(data, limit=limit), template=prompt_template(export_dir),
        image_folder=image_folder or default_image_folder(data), batch_size=batch_size, label=label,
        progress=False,
    )  # fmt: skip
