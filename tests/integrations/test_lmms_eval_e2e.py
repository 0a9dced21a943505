"""End to end: lmms-eval's CLI with ``--model libra`` on the demo's held-out questions scores what
``scripts/evaluate.py`` scores, with the export's compression and with ``libra=off``.

Two processes side by side (halving the wall time): ``scripts/eval_suite.sh EXPORT export`` (the suite's
``python -m lmms_eval --model libra --model_args pretrained=EXPORT,stats_path=... --tasks libra_qa_val
--include_path ...``, then its table) and a plain ``python -m lmms_eval ... --model_args
pretrained=EXPORT,libra=off``. The model is found through the entry point, the task through
``--include_path``, its questions loaded by datasets from the local JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from libra_train.infer import evaluate, is_correct, load, load_qa
from libra_train.integrations.lmms_eval_tasks.libra_qa import write_task
from tests.export.export_helpers import REPO, load_script

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
)
pytestmark = pytest.mark.slow

TASK, LIMIT, BATCH = "libra_qa_val", 6, 3


def _env(out) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(out / "hf_home")  # the datasets cache of this run only
    return env


def _spawn(command: list[str], cwd, env) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, out) -> tuple[float, list[dict]]:
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-4000:]
    (results,) = out.glob("*/*_results.json")
    (samples,) = out.glob(f"*/*_samples_{TASK}.jsonl")
    accuracy = json.loads(results.read_text())["results"][TASK]["accuracy,none"]
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
    suite, off = tmp_path / "suite", tmp_path / "off"
    suite.mkdir(), off.mkdir()
    suite_env = {
        **_env(suite),
        "OUT": str(suite),
        "TASKS": TASK,
        "INCLUDE_PATH": str(tasks),
        "LIMIT": str(LIMIT),
    }
    suite_env.update(
        BATCH_SIZE=str(BATCH), LMMS_EVAL_ARGS="--log_samples --verbosity WARNING", PYTHON=sys.executable
    )
    runs = {
        "on": _spawn(
            ["bash", str(REPO / "scripts" / "eval_suite.sh"), str(exported), "export"], suite, suite_env
        ),
        "off": _spawn(
            [
                sys.executable,
                "-m",
                "lmms_eval",
                "--model",
                "libra",
                "--model_args",
                f"pretrained={exported},libra=off",
                "--tasks",
                TASK,
                "--include_path",
                str(tasks),
                "--limit",
                str(LIMIT),
                "--batch_size",
                str(BATCH),
                "--output_path",
                str(off),
                "--log_samples",
                "--verbosity",
                "WARNING",
            ],  # fmt: skip
            off,
            _env(off),
        ),
    }
    got = {"on": _finish(runs["on"], suite / "export"), "off": _finish(runs["off"], off)}
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
        assert [r["accuracy"] for r in rows] == [
            float(is_correct(p, e.answers)) for p, e in zip(want.predictions, examples)
        ]
        assert accuracy == pytest.approx(want.accuracy)
        print(
            f"\nlibra {name}: lmms-eval accuracy {accuracy:.4f}, evaluate {want.accuracy:.4f} ({want.correct}/"
            f"{want.total}), visual tokens {want.visual_tokens}; predictions {want.predictions}"
        )
    assert got["on"][0] == pytest.approx(script["libra points [1] ratio 0.5"])
    assert got["off"][0] == pytest.approx(script["full (same model, no compression)"])
    assert [r["filtered_resps"] for r in got["on"][1]] != [r["filtered_resps"] for r in got["off"][1]]
    table = (suite / "table.md").read_text()
    stats = json.loads((suite / "export" / "libra_stats.json").read_text())
    tokens = stats["tasks"][TASK]["visual_tokens"]
    assert f"| export | {100 * got['on'][0]:.1f} | - | 36/{round(tokens[1], 1):g} |" in table
    print(f"scripts/evaluate.py --compare full: {script}\n{table}")
