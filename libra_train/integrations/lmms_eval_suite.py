"""The paper's Table 1 on lmms-eval: methods x benchmarks of one model, as Markdown and JSON.

``scripts/eval_suite.sh EXPORT [METHODS]`` runs ``python -m lmms_eval --model libra`` once per method into
``OUT/<method>/`` (lmms-eval's ``*_results.json`` plus the ``libra_stats.json`` the model writes) and then
``python -m libra_train.integrations.lmms_eval_suite table OUT``, which writes ``OUT/table.md`` and
``OUT/table.json``:

- one column per benchmark: the paper's six (``gqa``, ``scienceqa_img``, ``textvqa_val``, ``mme``,
  ``mmbench_en_dev``, ``pope``: accuracy in %, MME perception score out of 2000, POPE F1 in %), then any other
  task that was run (its first metric);
- *Avg*: the mean of the paper's six that were run, MME divided by 20 (a percentage of its 2000 points);
- *visual tokens*: the mean visual tokens each LLM stage saw, measured over every image request of the run
  (the compensation token counted where one was made);
- *FLOPs*: ``libra_train.flops`` for that measured schedule (the paper's convention: LLM layers, visual tokens
  only) over the same model with all visual tokens.

Methods (``method_args``): ``full`` (no compression), ``export`` (the model's own merge config),
``fastv`` (FastV at the paper's point {3}, R=0.5), ``turbo`` (Turbo at Libra's points, R=0.5) and
``libra-R`` (Libra at ``libra_train.flops.libra_points``: {7,15,23} for 32 layers; ``libra-0.67`` is R=2/3,
the paper's 67%, whose schedule is 576/192/64/21).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Row",
    "collect",
    "layer_schedule",
    "main",
    "markdown",
    "method_args",
]

STATS_FILE = "libra_stats.json"
METHODS = ("full", "fastv", "turbo", "libra-0.5", "libra-0.67", "libra-0.8")
RATIOS = {"0.5": 0.5, "0.67": 2 / 3, "0.8": 0.8}  # the paper's R (67% is 2/3: 576 -> 192 -> 64 -> 21)


@dataclass(frozen=True)
class Benchmark:
    """A paper benchmark: its lmms-eval task, column name, metric and the factor to the paper's scale."""

    task: str
    name: str
    metric: str
    scale: float
    average_divisor: float = 1.0  # MME: /20 so that it enters the average as a percentage


BENCHMARKS = (
    Benchmark("gqa", "GQA", "exact_match", 100),
    Benchmark("scienceqa_img", "SQA-IMG", "exact_match", 100),
    Benchmark("textvqa_val", "TextVQA", "exact_match", 100),
    Benchmark("mme", "MME", "mme_perception_score", 1, average_divisor=20),
    Benchmark("mmbench_en_dev", "MMB", "gpt_eval_score", 1),
    Benchmark("pope", "POPE", "pope_f1_score", 100),
)


def method_args(method: str, num_layers: int) -> str:
    """``--model_args`` (after ``pretrained=``) of one suite method for an LLM of ``num_layers`` layers.

    Every compressing method gives a complete merge config (``select=null,merge=null`` clear any override
    the export carries), so the rows differ only by the method.
    """
    from libra_train.flops import libra_points

    points = "[" + ",".join(map(str, libra_points(num_layers))) + "]"
    clear = "select=null,merge=null,enabled=true"
    if method == "full":
        return "libra=off"
    if method == "export":
        return ""
    if method == "fastv":  # the paper's K=3; the deepest valid point on toy models
        return f"method=fastv,layers=[{min(3, num_layers - 2)}],ratio=0.5,{clear}"
    if method == "turbo":
        return f"method=turbo,layers={points},ratio=0.5,{clear}"
    if method.startswith("libra-") and method[len("libra-") :] in RATIOS:
        return f"method=libra,layers={points},ratio={RATIOS[method[len('libra-') :]]!r},{clear}"
    raise ValueError(
        f"unknown suite method {method!r}; choose from full, export, fastv, turbo, "
        + ", ".join(f"libra-{r}" for r in RATIOS)
    )


def layer_schedule(points: Sequence[int], stage_tokens: Sequence[float], num_layers: int) -> list[float]:
    """Tokens each layer sees: stage 0 up to and including the first point, stage k after point k-1.

    Args:
        points: the compression points (empty: no compression).
        stage_tokens: tokens per stage, ``len(points) + 1`` values (one without compression).
        num_layers: LLM depth.
    """
    if len(stage_tokens) != len(points) + 1:
        raise ValueError(f"{len(stage_tokens)} stage counts for {len(points)} compression points")
    return [stage_tokens[sum(layer > p for p in points)] for layer in range(num_layers)]


@dataclass
class Row:
    """One method of the table."""

    method: str
    scores: dict[str, float]  # task -> score on the paper's scale
    average: float | None
    visual_tokens: list[float]
    flops_ratio: float | None
    merge_config: dict[str, Any] | None


def _results(folder: Path) -> dict[str, dict[str, Any]]:
    """task -> lmms-eval's result entry, over every ``*_results.json`` below ``folder`` (the newest run of a
    task wins: lmms-eval names the files ``<date>_<time>_results.json``)."""
    merged: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.rglob("*_results.json"), key=lambda f: f.name):
        merged.update(json.loads(file.read_text()).get("results", {}))
    return merged


def _score(task: str, entry: dict[str, Any]) -> float | None:
    """The task's value on the paper's scale: the benchmark's metric, or the first metric of another task."""
    bench = next((b for b in BENCHMARKS if b.task == task), None)
    if bench is not None:
        value = entry.get(f"{bench.metric},none")
        return None if not isinstance(value, (int, float)) else value * bench.scale
    for key, value in entry.items():
        if key.endswith(",none") and "_stderr" not in key and isinstance(value, (int, float)):
            return value * 100
    return None


def _tokens_and_flops(stats: dict[str, Any] | None) -> tuple[list[float], float | None]:
    from libra_train.flops import LLMShape, schedule_flops

    if not stats:
        return [], None
    tasks = [t for t in stats.get("tasks", {}).values() if t.get("visual_tokens")]
    depth = max((len(t["visual_tokens"]) for t in tasks), default=0)
    tasks = [t for t in tasks if len(t["visual_tokens"]) == depth]
    total = sum(t["requests"] for t in tasks)
    if not total:
        return [], None
    means = [sum(t["visual_tokens"][s] * t["requests"] for t in tasks) / total for s in range(depth)]
    cfg = stats.get("merge_config")
    points = cfg["layers"] if cfg and cfg.get("enabled", True) and depth > 1 else []
    llm = stats["llm"]
    shape = LLMShape(llm["num_layers"], llm["hidden"], llm["intermediate"])
    schedule = layer_schedule(points, means, shape.num_layers)
    return means, schedule_flops(schedule, shape) / schedule_flops([means[0]] * shape.num_layers, shape)


def collect(out_dir: str | os.PathLike, methods: Sequence[str] | None = None) -> list[Row]:
    """One row per method folder of ``out_dir`` (in ``methods`` order; default: every folder with results)."""
    out = Path(out_dir)
    names = list(methods) if methods else sorted(p.name for p in out.iterdir() if p.is_dir())
    rows = []
    for name in names:
        folder = out / name
        results = _results(folder) if folder.is_dir() else {}
        if not results:
            raise FileNotFoundError(f"{folder}: no lmms-eval *_results.json (did the {name!r} run finish?)")
        scores = {task: s for task, entry in results.items() if (s := _score(task, entry)) is not None}
        stats_file = folder / STATS_FILE
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
        tokens, flops = _tokens_and_flops(stats)
        paper = [(b, scores[b.task]) for b in BENCHMARKS if b.task in scores]
        average = sum(v / b.average_divisor for b, v in paper) / len(paper) if paper else None
        merge = stats.get("merge_config") if stats else None
        rows.append(Row(name, scores, average, tokens, flops, merge))
    return rows


def _columns(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(task, header) of every column: the paper's benchmarks first, in its order, then the other tasks."""
    present = {task for row in rows for task in row.scores}
    paper = [(b.task, b.name) for b in BENCHMARKS if b.task in present]
    others = sorted(present - {b.task for b in BENCHMARKS})
    return paper + [(task, task) for task in others]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as the paper's Table 1: scores, Avg, visual tokens per stage, FLOPs ratio."""
    columns = _columns(rows)
    head = ["method", *(name for _, name in columns), "Avg", "visual tokens per stage", "FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.method]
        cells += [f"{row.scores[t]:.1f}" if t in row.scores else "-" for t, _ in columns]
        cells.append(f"{row.average:.1f}" if row.average is not None else "-")
        cells.append("/".join(f"{round(v, 1):g}" for v in row.visual_tokens) or "-")
        cells.append(f"{row.flops_ratio:.3f}" if row.flops_ratio is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num_layers(export: str) -> int:
    from libra_train.inference.loading import model_config_json

    config = model_config_json(export)
    return (config.get("text_config") or config)["num_hidden_layers"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    args_cmd = sub.add_parser("args", help="print the --model_args of a method (after pretrained=)")
    args_cmd.add_argument("export")
    args_cmd.add_argument("method")
    table_cmd = sub.add_parser("table", help="write OUT/table.md and OUT/table.json")
    table_cmd.add_argument("out")
    table_cmd.add_argument("methods", nargs="*", help="row order (default: every method folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "args":
            print(method_args(args.method, _num_layers(args.export)))
            return 0
        rows = collect(args.out, args.methods)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out)
    table = markdown(rows)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
