"""End to end: ``python -m lmms_eval --model libra`` on the demo's held-out questions scores what
``scripts/evaluate.py`` scores, with the export's compression and with ``libra=off``.

The two lmms-eval runs are separate processes of the real CLI (the model found through the entry point, the
local task through ``--include_path``, its data loaded by datasets from the local JSON lines) and run side by
side to halve the wall time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from libra_train.infer import evaluate, load, load_qa
from libra_train.integrations.lmms_eval_tasks.libra_qa import write_task
from tests.export.export_helpers import load_script

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
)
pytestmark = pytest.mark.slow

LIMIT, BATCH = 6, 3


def _start(export, extra_args: str, tasks, out) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "libra", "--model_args", f"pretrained={export}{extra_args}",
        "--tasks", "libra_qa_val", "--include_path", str(tasks), "--limit", str(LIMIT), "--batch_size", str(BATCH),
        "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(out / "hf_home")  # the datasets cache of this run only
    return subprocess.Popen(
        command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, out) -> tuple[float, list[dict]]:
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-4000:]
    (results,) = out.glob("*/*_results.json")
    (samples,) = out.glob("*/*_samples_libra_qa_val.jsonl")
    accuracy = json.loads(results.read_text())["results"]["libra_qa_val"]["accuracy,none"]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return accuracy, rows


def _script_accuracies(export, demo, capsys) -> dict[str, float]:
    """``scripts/evaluate.py --compare full``: accuracy per table row (compressed, full)."""
    argv = [str(export), "--data", str(demo / "val.json"), "--image-folder", str(demo / "images")]
    argv += ["--limit", str(LIMIT), "--batch-size", str(BATCH), "--compare", "full", "--no-progress"]
    assert load_script("evaluate").main(argv) == 0
    rows = re.findall(r"^\| (.+?) \| ([\d.]+)% \((\d+)/(\d+)\)", capsys.readouterr().out, re.M)
    return {label: int(correct) / int(total) for label, _, correct, total in rows}


def test_lmms_eval_cli_scores_what_evaluate_scores(exported, demo, tmp_path, capsys):
    tasks = write_task(demo / "val.json", tmp_path / "tasks", image_folder=demo / "images").parent
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    runs = {
        "on": _start(exported, "", tasks, tmp_path / "on"),
        "off": _start(exported, ",libra=off", tasks, tmp_path / "off"),
    }
    got = {name: _finish(process, tmp_path / name) for name, process in runs.items()}
    script = _script_accuracies(exported, demo, capsys)
    examples = load_qa(demo / "val.json", limit=LIMIT)
    for name, libra in [("on", None), ("off", "off")]:
        model, processor = load(exported, libra=libra)
        want = evaluate(
            model, processor, examples, template="vicuna_v1", image_folder=demo / "images", batch_size=BATCH,
            progress=False,
        )  # fmt: skip
        accuracy, rows = got[name]
        assert [r["doc_id"] for r in rows] == list(range(LIMIT))
        assert [r["filtered_resps"] for r in rows] == want.predictions  # answer by answer
        assert accuracy == pytest.approx(want.accuracy)
        print(
            f"\nlibra {name}: lmms-eval accuracy {accuracy:.4f}, evaluate {want.accuracy:.4f} ({want.correct}/"
            f"{want.total}); predictions {want.predictions}"
        )
    assert got["on"][0] == pytest.approx(script["libra points [1] ratio 0.5"])
    assert got["off"][0] == pytest.approx(script["full (same model, no compression)"])
    assert [r["filtered_resps"] for r in got["on"][1]] != [r["filtered_resps"] for r in got["off"][1]]
    print(f"scripts/evaluate.py --compare full: {script}")
