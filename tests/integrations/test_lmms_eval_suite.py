"""The Table-1 writer of ``scripts/eval_suite.sh`` on lmms-eval output of a real local run (fixtures/eval_suite,
see its SOURCE.md), and the suite's method arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from libra_train import LibraConfig
from libra_train.flops import LLMShape, layer_flops
from libra_train.integrations.lmms_eval_suite import (
    BENCHMARKS,
    collect,
    layer_schedule,
    main,
    markdown,
    method_args,
)

CANNED = Path(__file__).parent / "fixtures" / "eval_suite"
TINY = LLMShape(4, 128, 256)  # the canned runs' LLM


def _stats(method: str) -> dict:
    return json.loads((CANNED / method / "libra_stats.json").read_text())


def _ratio(per_layer: list[float]) -> float:
    return sum(layer_flops(n, TINY) for n in per_layer) / (TINY.num_layers * layer_flops(per_layer[0], TINY))


def test_rows_from_canned_runs():
    rows = {row.method: row for row in collect(CANNED, ["full", "export", "libra-0.67"])}
    for row in rows.values():  # 2 of 16 questions right in each run (lmms-eval's accuracy 0.125)
        assert row.scores == {"libra_qa_val": pytest.approx(12.5)} and row.average is None
    assert rows["full"].visual_tokens == [36] and rows["full"].flops_ratio == pytest.approx(1.0)
    tokens = _stats("export")["tasks"]["libra_qa_val"]["visual_tokens"]  # point {1}: layers 0-1, then 2-3
    assert rows["export"].visual_tokens == tokens and rows["export"].merge_config["layers"] == [1]
    assert rows["export"].flops_ratio == pytest.approx(_ratio([tokens[0], tokens[0], tokens[1], tokens[1]]))
    deep = _stats("libra-0.67")["tasks"]["libra_qa_val"]["visual_tokens"]  # points {0,1,2}: one stage a layer
    assert (
        len(deep) == 4
        and deep[1] < 36 / 3 + 1
        and rows["libra-0.67"].flops_ratio == pytest.approx(_ratio(deep))
    )
    table = markdown(list(rows.values())).splitlines()
    assert table[0] == "| method | libra_qa_val | Avg | visual tokens per stage | FLOPs |"
    assert table[2] == "| full | 12.5 | - | 36 | 1.000 |"
    assert (
        table[3] == f"| export | 12.5 | - | 36/{round(tokens[1], 1):g} | {rows['export'].flops_ratio:.3f} |"
    )


def test_paper_benchmarks_columns_and_average(tmp_path):
    """The canned runs relabelled as two paper benchmarks (GQA, MME): the paper's columns come first, in its
    order, and the average takes MME / 20."""
    for method in ("full", "export"):
        shutil.copytree(CANNED / method, tmp_path / method)
        (results,) = (tmp_path / method).rglob("*_results.json")
        data = json.loads(results.read_text())
        entry = data["results"].pop("libra_qa_val")
        data["results"]["mme"] = {"mme_perception_score,none": 1000 * entry["accuracy,none"]}
        data["results"]["gqa"] = {"exact_match,none": entry["accuracy,none"]}
        results.write_text(json.dumps(data))
    assert main(["table", str(tmp_path), "full", "export"]) == 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | GQA | MME | Avg |")
    assert table[2].startswith("| full | 12.5 | 125.0 | 9.4 |")  # (12.5 + 125 / 20) / 2
    written = json.loads((tmp_path / "table.json").read_text())
    assert [row["method"] for row in written] == ["full", "export"] and written[0]["scores"]["gqa"] == 12.5


def test_paper_metrics_are_the_tasks_own():
    """Each benchmark's metric is in the ``metric_list`` of lmms-eval's task YAML of that name."""
    pytest.importorskip(
        "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
    )
    import lmms_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor(
        "!", lambda loader, suffix, node: None
    )  # !function hooks are not needed here
    tasks = Path(lmms_eval.__file__).parent / "tasks"
    for bench in BENCHMARKS:
        (file,) = [f for f in tasks.rglob(f"{bench.task}.yaml") if "task: " in f.read_text()]
        config = yaml.load(file.read_text(), Loader=Loader)
        assert config["task"] == bench.task
        assert bench.metric in [m["metric"] for m in config["metric_list"]], file


def test_method_args_are_complete_merge_configs():
    """Parsed by lmms-eval's own ``--model_args`` parser and applied over an export's merge config (an
    ablation's, with a merge override), each method is the merge config it names."""
    pytest.importorskip(
        "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
    )
    from lmms_eval.utils import simple_parse_args_string

    from libra_train.inference.loading import resolve_libra
    from libra_train.integrations.lmms_eval import merge_choice

    saved = LibraConfig(layers=[1], ratio=0.3, merge="igm_pos", enabled=False)

    def config(method: str, layers: int = 32) -> LibraConfig:
        return resolve_libra(
            saved, merge_choice(None, simple_parse_args_string(method_args(method, layers))), "x"
        )

    assert method_args("full", 32) == "libra=off" and method_args("export", 32) == ""
    assert config("fastv") == LibraConfig(method="fastv", layers=[3], ratio=0.5)
    assert config("turbo") == LibraConfig(method="turbo", layers=[7, 15, 23], ratio=0.5)
    assert config("libra-0.67") == LibraConfig(layers=[7, 15, 23], ratio=2 / 3)
    assert config("libra-0.8", 40) == LibraConfig(layers=[9, 19, 29], ratio=0.8)
    assert config("fastv", 4).layers == [2]  # toy depth: the deepest valid point
    with pytest.raises(ValueError, match="unknown suite method 'libra-0.9'"):
        method_args("libra-0.9", 32)
    with pytest.raises(ValueError, match="3 stage counts for 1"):
        layer_schedule([1], [36, 18, 9], 4)
    with pytest.raises(FileNotFoundError, match="did the 'fastv' run finish"):
        collect(CANNED, ["full", "fastv"])
