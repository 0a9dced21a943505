"""scripts/quality.py --smoke end to end (1 seed, 3-step models, fastv + libra + pdrop-if-known training-free, libra
and full tokens compression-aware), then a rerun that must measure nothing again. Values are not judged (a 3-step model is not expected to answer); the JSON's rows,
fields, token counts and FLOPs are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libra_train.bench.quality import METHODS_BY_NAME, unsupported

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/quality.py", "--smoke", "--methods", "fastv,libra,pdrop", "--out", str(out),
               "--work", str(out / "work")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_quality_smoke_run_and_resume(tmp_path):
    first = _run(tmp_path)
    report = json.loads((tmp_path / "quality.json").read_text())
    pdrop_known = unsupported(METHODS_BY_NAME["pdrop"]) is None
    methods = ["fastv", "pdrop", "libra"] if pdrop_known else ["fastv", "libra"]
    expected = [("free", "full", None)] + [("free", m, r) for m in methods for r in (0.5, 0.8)]
    expected += [("aware", "full", None), ("aware", "libra", 0.8)]  # --smoke adapts libra only
    assert [(r["phase"], r["method"], r["ratio"]) for r in report["rows"]] == expected
    if not pdrop_known:
        assert "skipping pdrop" in first.stdout and set(report["meta"]["skipped_methods"]) == {"pdrop"}

    rows = {(r["phase"], r["method"], r["ratio"]): r for r in report["rows"]}
    assert set(report["fields"]) >= set(report["rows"][0])
    for row in report["rows"]:
        assert row["seeds"] == [0] and row["binomial"]["n"] == 16
        assert row["accuracy"]["half_width"] is None  # one seed: no t-interval, said so rather than invented
        assert set(row["by_type"]) <= {"colour", "shape", "count"} and row["by_type"]
        assert sum(t["total"] for t in row["by_type"].values()) == 16  # every demo question is typed
        assert row["visual_tokens"][0] == 36.0 and row["text_tokens"] > 0
    assert rows[("free", "full", None)]["flops_ratio"] == 1.0 and rows[("free", "full", None)]["points"] == []
    # FastV at its single point (layer 0 of the 4-layer demo LLM) keeps round(36 * 0.2) = 7 tokens; Libra at
    # {0, 1, 2} keeps 7, then 1, then 1, plus at most one compensation token per point.
    assert rows[("free", "fastv", 0.8)]["visual_tokens"] == [36.0, 7.0]
    libra = rows[("free", "libra", 0.8)]
    assert (
        libra["points"] == [0, 1, 2]
        and 7 <= libra["visual_tokens"][1] <= 8
        and libra["visual_tokens"][3] <= 4
    )
    assert 0 < libra["flops_ratio"] < rows[("free", "fastv", 0.8)]["flops_ratio"] < rows[("free", "fastv", 0.5)][
        "flops_ratio"] < 1  # fmt: skip
    assert rows[("aware", "libra", 0.8)]["delta_vs_full"]["seeds"] == [0]
    cells = sorted(p.name for p in (tmp_path / "cells" / "seed0").iterdir())
    assert len(cells) == len(expected) and "aware-libra-R0.8.json" in cells and "free-full.json" in cells
    assert "| fastv R=0.8 | {0} | 36.0/7.0 |" in (tmp_path / "quality.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 10_000

    # The rerun reuses the trained model and measures no cell again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")}
    second = _run(tmp_path)
    assert "train.py" not in second.stdout and "training-free cells done" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")} == stamps
    assert json.loads((tmp_path / "quality.json").read_text())["rows"] == report["rows"]
