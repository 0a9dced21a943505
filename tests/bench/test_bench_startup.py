"""`scripts/bench_startup.py` on a few hundred records: the generated file is LLaVA-shaped and valid, every
rank reports, the later start loads the cache. No timing assertions: the numbers belong in docs/benchmarks.md."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from libra_train.data.records import load_records

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_startup.py"


def test_small_run(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # importable by name: the spawned ranks unpickle from it
    bench = importlib.import_module("bench_startup")
    out = tmp_path / "result.json"
    assert bench.main(["--records", "400", "--images", "6", "--ranks", "1", "--num-proc", "2",
                       "--workdir", str(tmp_path), "--json", str(out)]) == 0  # fmt: skip
    rows = load_records(tmp_path / "mix665k_like_400.json")
    assert len(rows) == 400 and not any(rows["reason"])
    n_rounds = [len(r) // 2 for r in rows["roles"]]
    assert set(n_rounds) <= {1, 2, 3, 4} and 0 < sum(not i for i in rows["images"]) < 80  # ~10% text-only
    result = json.loads(out.read_text())
    first, later = result["phases"]["first start"], result["phases"]["later start"]
    assert [r["rank"] for r in first] == [0] and all(r["samples"] == 400 for r in first + later)
    assert first[0]["worker_cpu_seconds"] > 0 and all(r["worker_cpu_seconds"] == 0 for r in later)  # cached
    assert result["records_per_cpu_second"] > 0 and set(result["projected_first_start_s"]) == {"2", "8"}
    assert "| later start | 0 |" in capsys.readouterr().out
