"""Accuracy at an equal token budget: the methods, one cell per (seed, phase, method, ratio), the aggregate.

``scripts/quality.py`` runs the experiment (`libra_train.bench.quality_run`); this module holds what it is made
of, so that each piece can be tested on its own:

* `METHODS`: the compared methods as data: a name, the `LibraConfig` fields it sets, and where it compresses.
  Adding a method (``pdrop`` once the plug-in knows it) is one entry; a method the installed `LibraConfig`
  rejects is skipped with a note (`unsupported`), so a later rerun adds just its column.
* Points, for an LLM of ``L`` layers: ``early`` is FastV's single point ``round(3 L / 32)`` (the paper's
  "K=3" of 32 layers; `libra_train.bench.compare.fastv_point`), ``quarters`` is Libra's end of each of the
  first three quarters of depth (`libra_train.flops.libra_points`). ``fastv-q`` (FastV's selection and
  pruning at Libra's points) and ``libra-1pt`` (Libra at FastV's point) make the equal-budget pairs:
  fastv-q vs libra and fastv vs libra-1pt remove exactly the same number of tokens at the same layers.
* Cells: one JSON file per measured cell (`CellStore`), written as soon as it is measured and taken as done on
  a rerun when its ``spec`` (which model, which data, which merge config) is the same.
* `flops_ratio`: the LLM's prefill FLOPs (`libra_train.flops`, the paper's formula) for the mean token counts a
  cell measured, over the same for full tokens.
* `aggregate`: per (phase, method, ratio) over seeds: mean, standard error and t-interval, the pooled binomial
  interval, per-question-type accuracy, and paired differences against full tokens and against Libra.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libra_train.bench.compare import fastv_point, schedule_from_run
from libra_train.bench.stats import binomial_interval, paired_interval, seed_interval
from libra_train.flops import LLMShape, libra_points, schedule_flops

FULL = "full"  # the uncompressed row of each phase
REFERENCE = "libra"  # the method the paired differences are taken against
# The Libra row that removes the same tokens at the same points as a method of each schedule (its equal-budget pair)
SAME_POINTS_REFERENCE = {"early": "libra-1pt", "quarters": REFERENCE}
PHASES = ("free", "aware")  # training-free (a full-token model compressed at test time); compression-aware


@dataclass(frozen=True)
class QualityMethod:
    """One compared method.

    Attributes:
        name: the row name.
        libra: `LibraConfig` fields besides ``layers`` / ``ratio`` (``method``, and ``select`` / ``merge`` for the
            ablations).
        points: ``early`` (FastV's single point) or ``quarters`` (Libra's points).
        aware: also trained compression-aware (a main method; the ablations are training-free only).
        about: one line for the report.
    """

    name: str
    libra: dict[str, Any]
    points: str
    aware: bool = False
    about: str = ""


METHODS: tuple[QualityMethod, ...] = (
    QualityMethod("fastv", {"method": "fastv"}, "early", True, "FastV: top-k by attention, pruned, one early point"),
    QualityMethod("fastv-q", {"method": "fastv"}, "quarters", True, "FastV's top-k + pruning at Libra's points"),
    QualityMethod("turbo", {"method": "turbo"}, "quarters", True, "Turbo: information degree + mean merge"),
    QualityMethod("pdrop", {"method": "pdrop"}, "quarters", True, "PyramidDrop: attention-ranked drop per stage"),
    QualityMethod("libra", {"method": "libra"}, "quarters", True, "Libra: interval targets (PTI) + IGM"),
    QualityMethod("libra-1pt", {"method": "libra"}, "early", False, "Libra at FastV's single point"),
    QualityMethod("prune", {"method": "libra", "merge": "prune"}, "quarters", False, "PTI targets, rest pruned"),
    QualityMethod("mean", {"method": "libra", "merge": "mean"}, "quarters", False, "PTI + plain mean merge"),
    QualityMethod("igm_pos", {"method": "libra", "merge": "igm_pos"}, "quarters", False,
                  "IGM, every non-target merged (no compensation token)"),
    QualityMethod("igm_neg", {"method": "libra", "merge": "igm_neg"}, "quarters", False,
                  "targets kept as they are, every non-target into the compensation token"),
)  # fmt: skip
METHODS_BY_NAME = {m.name: m for m in METHODS}


def select_methods(names: Iterable[str]) -> list[QualityMethod]:
    """The entries of `METHODS` named, in `METHODS` order.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    names = list(names)
    unknown = [n for n in names if n not in METHODS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS_BY_NAME)}")
    return [m for m in METHODS if m.name in names]


def unsupported(method: QualityMethod) -> str | None:
    """Why the installed `LibraConfig` rejects ``method`` (e.g. a preset it does not know yet), else None."""
    from libra_train.plugin import LibraConfig

    try:
        LibraConfig(**method.libra, layers=[0], ratio=0.5)
    except ValueError as err:
        return str(err)
    return None


def points_for(method: QualityMethod, num_layers: int) -> list[int]:
    """The compression points of ``method`` on an LLM of ``num_layers`` decoder layers."""
    if method.points == "early":
        return [fastv_point(num_layers)]
    if method.points == "quarters":
        if num_layers < 4:
            raise ValueError(
                f"{method.name} compresses once per quarter of depth: needs >= 4 layers, not {num_layers}"
            )
        return libra_points(num_layers)
    raise ValueError(f"{method.name}: points must be 'early' or 'quarters', got {method.points!r}")


def libra_kwargs(method: QualityMethod, ratio: float, num_layers: int) -> dict[str, Any]:
    """`LibraConfig` keyword arguments of ``method`` at ``ratio`` (removed at every point).

    PyramidDrop keeps a fraction of the ORIGINAL count at each point (``keep_fractions``; its preset ignores
    ``ratio``), so its budget is set as ``lambda = 1 - R``: ``keep_fractions = [(1 - R) ** k]``, the same
    tokens per stage as the chained ratio rule of the other methods (up to its floor against their round).
    """
    points = points_for(method, num_layers)
    kwargs = {**method.libra, "layers": points, "ratio": ratio, "enabled": True}
    if method.libra.get("method") == "pdrop":
        kwargs["keep_fractions"] = [round((1.0 - ratio) ** k, 12) for k in range(1, len(points) + 1)]
    return kwargs


def recipe_overrides(kwargs: dict[str, Any] | None) -> list[str]:
    """``train.py`` overrides that set the recipe's ``libra`` section to ``kwargs`` (None: compression off).

    ``select`` / ``merge`` are always given (``null`` = the method's preset), so that no value of the recipe's
    own section leaks into another method's run.
    """
    if kwargs is None:
        return ["libra.enabled=false"]
    out = []
    for key in ("enabled", "method", "layers", "ratio", "select", "merge", "keep_fractions"):
        value = kwargs.get(key)
        out.append(f"libra.{key}={json.dumps(value)}")  # JSON is YAML: true, null, [0, 1], "fastv"
    return [o.replace(" ", "") for o in out]


def flops_ratio(
    shape: LLMShape, points: Sequence[int], visual_tokens: Sequence[float], text_tokens: float
) -> float:
    """Prefill FLOPs of the LLM for the measured mean tokens per stage over those of full tokens.

    Args:
        shape: the LLM's layers, hidden and intermediate sizes.
        points: compression points (empty or ignored when ``visual_tokens`` has one stage).
        visual_tokens: mean visual tokens entering each stage (stage 0 = all of them; compensation tokens
            included, as measured).
        text_tokens: mean non-visual prompt tokens, seen by every layer.

    The FLOPs of the mean counts stand for the mean FLOPs (the ``n^2`` attention term makes them differ by the
    tiny variance of the counts).
    """
    full = schedule_flops([visual_tokens[0] + text_tokens] * shape.num_layers, shape)
    if len(visual_tokens) == 1:
        return 1.0
    stages = [v + text_tokens for v in visual_tokens]
    return schedule_flops(schedule_from_run(shape.num_layers, list(points), stages), shape) / full


def llm_shape(model_dir: str | os.PathLike) -> LLMShape:
    """The LLM dimensions of a transformers model directory (``text_config`` of a VLM, else the config)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or config
    return LLMShape(text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"])


def cell_name(phase: str, method: str, ratio: float | None) -> str:
    """``free-libra-R0.8``; the full-token row has no ratio: ``free-full``."""
    return f"{phase}-{method}" if ratio is None else f"{phase}-{method}-R{ratio:g}"


@dataclass
class CellStore:
    """One JSON file per cell under ``root/seed<S>/``; a cell counts as done when its ``spec`` matches."""

    root: Path
    written: list[Path] = field(default_factory=list)

    def path(self, seed: int, phase: str, method: str, ratio: float | None) -> Path:
        return self.root / f"seed{seed}" / f"{cell_name(phase, method, ratio)}.json"

    def done(self, seed: int, phase: str, method: str, ratio: float | None, spec: dict[str, Any]) -> bool:
        """Whether the cell exists with the same ``spec`` (a changed model, data or config is measured again)."""
        path = self.path(seed, phase, method, ratio)
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("spec") == spec
        except json.JSONDecodeError:
            return False

    def save(self, cell: dict[str, Any]) -> Path:
        """Write ``cell`` atomically (a crash leaves the old file or none, never half of one)."""
        path = self.path(cell["seed"], cell["phase"], cell["method"], cell["ratio"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cell, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        self.written.append(path)
        return path

    def load_all(self) -> list[dict[str, Any]]:
        """Every cell under ``root``, in file-name order."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("seed*/*.json"))]


def make_cell(
    result: Any,
    *,
    seed: int,
    phase: str,
    method: str,
    ratio: float | None,
    points: Sequence[int],
    shape: LLMShape,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """A cell from an `libra_train.inference.evaluation.EvalResult`."""
    return {
        "seed": seed,
        "phase": phase,
        "method": method,
        "ratio": ratio,
        "points": list(points),
        "correct": result.correct,
        "total": result.total,
        "accuracy": result.accuracy,
        "by_type": {t: list(c) for t, c in result.by_type.items()},
        "visual_tokens": result.visual_tokens,
        "text_tokens": result.text_tokens,
        "flops_ratio": flops_ratio(shape, points, result.visual_tokens, result.text_tokens)
        if result.visual_tokens
        else 1.0,
        "seconds": result.seconds,
        "spec": spec,
    }


def _order(row_key: tuple[str, str, float | None]) -> tuple:
    phase, method, ratio = row_key
    index = [m.name for m in METHODS].index(method) if method in METHODS_BY_NAME else -1
    return (PHASES.index(phase), index, ratio if ratio is not None else -1.0)


def _by_seed(cells: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {c["seed"]: c for c in cells}


def aggregate(cells: list[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """One row per (phase, method, ratio) over its seeds, ordered by phase, `METHODS` order (full first), ratio.

    Each row: ``phase, method, ratio, points, seeds, accuracy`` (`seed_interval` of the per-seed accuracies),
    ``binomial`` (Wilson interval of all its questions pooled), ``by_type`` (per type: the seed interval and
    the pooled ``correct`` / ``total``), ``visual_tokens`` (per stage, mean over seeds), ``text_tokens``,
    ``flops_ratio`` (mean), ``delta_vs_full`` and ``delta_vs_libra`` (paired intervals over the seeds both
    rows have; None for the row itself or when no seed is shared) and ``delta_equal_budget``: against the Libra
    row at the same points (`SAME_POINTS_REFERENCE`: ``libra-1pt`` for FastV's single point), None for Libra's
    own rows and where the phase has no such row.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[(c["phase"], c["method"], c["ratio"])].append(c)
    rows = []
    for key in sorted(groups, key=_order):
        phase, method, ratio = key
        members = sorted(groups[key], key=lambda c: c["seed"])
        seeds = [c["seed"] for c in members]
        types = sorted({t for c in members for t in c["by_type"]})
        by_type = {}
        for t in types:
            typed = [c for c in members if t in c["by_type"]]
            right, seen = sum(c["by_type"][t][0] for c in typed), sum(c["by_type"][t][1] for c in typed)
            per_seed = [c["by_type"][t][0] / c["by_type"][t][1] for c in typed]
            by_type[t] = {
                "accuracy": seed_interval(per_seed, level).to_dict(),
                "correct": right,
                "total": seen,
            }
        depth = min(len(c["visual_tokens"]) for c in members)
        row = {
            "phase": phase,
            "method": method,
            "ratio": ratio,
            "points": members[0]["points"],
            "seeds": seeds,
            "accuracy": seed_interval([c["accuracy"] for c in members], level).to_dict(),
            "binomial": binomial_interval(
                sum(c["correct"] for c in members), sum(c["total"] for c in members), level
            ).to_dict(),
            "by_type": by_type,
            "visual_tokens": [
                sum(c["visual_tokens"][s] for c in members) / len(members) for s in range(depth)
            ],
            "text_tokens": sum(c["text_tokens"] for c in members) / len(members),
            "flops_ratio": sum(c["flops_ratio"] for c in members) / len(members),
        }
        schedule = next((m.points for m in METHODS if m.name == method), None)
        pair = SAME_POINTS_REFERENCE.get(schedule)
        for name, other in (
            ("delta_vs_full", (phase, FULL, None)),
            ("delta_vs_libra", (phase, REFERENCE, ratio)),
            ("delta_equal_budget", (phase, pair, ratio)),
        ):
            ours = other == key or (name == "delta_equal_budget" and method in SAME_POINTS_REFERENCE.values())
            row[name] = None if ours else _paired(members, groups.get(other, []), level)
        rows.append(row)
    return rows


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """Paired interval of accuracy(a) - accuracy(b) over the seeds both have, or None."""
    left, right = _by_seed(a), _by_seed(b)
    shared = sorted(set(left) & set(right))
    if not shared:
        return None
    interval = paired_interval(
        [left[s]["accuracy"] for s in shared], [right[s]["accuracy"] for s in shared], level
    )
    return {**interval.to_dict(), "excludes_zero": interval.excludes(0.0), "seeds": shared}


def finite(value: float | None) -> float | None:
    """None for NaN / None, else the value (JSON and tables)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
