"""scripts/adapt_demo.py end to end on a few steps: the demo LoRA recipes train from the exported demo_full model,
and the script reports the four accuracies and the throughput of both adaptations (values are not judged here:
a 3-step model is not expected to be good; the measured numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_adapt_demo_smoke_run(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "scripts/adapt_demo.py", "--max-steps", "3", "--eval-limit", "16", "--work", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((tmp_path / "adapt_results.json").read_text())

    labels = [r["label"] for r in results["accuracy"]]
    assert labels == [
        "full-token model, full tokens",
        "full-token model, Libra R=0.8 (training-free)",
        "LoRA-adapted with Libra R=0.8, Libra R=0.8",
        "LoRA-adapted with full tokens, full tokens",
    ]
    assert all(r["total"] == 16 and 0 <= r["correct"] <= 16 for r in results["accuracy"])
    # Libra at R=0.8 keeps 7 of the 36 visual tokens at layer 1 (+ a compensation token where one is made).
    full_tokens, training_free, adapted, twin = (r["visual_tokens"] for r in results["accuracy"])
    # Whether a compensation token is made depends on the weights, so the two Libra models may differ there.
    assert full_tokens == twin == [36.0]
    assert (
        training_free[0] == adapted[0] == 36.0 and 7.0 <= training_free[1] <= 8.0 and 7.0 <= adapted[1] <= 8.0
    )

    runs = results["training"]
    assert [runs[k]["steps"] for k in ("full", "lora_libra", "lora_full")] == [3, 3, 3]
    assert all(runs[k]["tokens_per_s"] > 0 for k in runs)
    # The adapted run trained LoRA adapters on the exported model with Libra on; its twin with full tokens.
    log = (tmp_path / "logs" / "lora_libra.log").read_text()
    assert "Libra layers [1] ratio 0.8" in log and "LoRA" in log
    assert "Libra off" in (tmp_path / "logs" / "lora_full.log").read_text()
    assert "LoRA throughput, Libra R=0.8 vs full tokens" in done.stdout
