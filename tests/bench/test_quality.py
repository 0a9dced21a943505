"""The pieces of scripts/quality.py: intervals, the method table, resumable cells, FLOPs per cell, aggregation and
the report (the end-to-end run is tests/bench/test_quality_smoke.py)."""

from __future__ import annotations

import json
import math

import pytest

from libra_train.bench.quality import (
    METHODS,
    METHODS_BY_NAME,
    CellStore,
    QualityMethod,
    aggregate,
    flops_ratio,
    libra_kwargs,
    recipe_overrides,
    select_methods,
    unsupported,
)
from libra_train.bench.quality_report import write_report
from libra_train.bench.stats import binomial_interval, paired_interval, seed_interval
from libra_train.flops import LLMShape, layer_flops
from libra_train.plugin import LibraConfig
from libra_train.plugin.config import METHOD_PRESETS

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (statistical tables: 4.303)


def test_seed_interval_is_the_student_t_interval():
    got = seed_interval([0.5, 0.6, 0.7])
    se = 0.1 / math.sqrt(3)  # sample sd 0.1
    assert got.mean == pytest.approx(0.6) and got.se == pytest.approx(se) and got.n == 3
    assert (got.low, got.high) == (pytest.approx(0.6 - T_975_DF2 * se), pytest.approx(0.6 + T_975_DF2 * se))
    one = seed_interval([0.4])  # one seed: no spread, no interval
    assert one.mean == 0.4 and math.isnan(one.se) and not one.excludes(0.0)
    assert one.to_dict()["low"] is None and one.to_dict()["half_width"] is None
    with pytest.raises(ValueError):
        seed_interval([])


def test_binomial_interval_is_wilsons():
    got = binomial_interval(7, 10)
    z, n, p = 1.959963984540054, 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert got.mean == 0.7 and got.se == pytest.approx(math.sqrt(0.21 / 10)) and got.n == 10
    assert (got.low, got.high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    assert binomial_interval(0, 5).low == 0.0 and binomial_interval(0, 5).high > 0  # sensible at the edge
    with pytest.raises(ValueError):
        binomial_interval(3, 2)


def test_paired_interval_cancels_what_the_seeds_share():
    a = [0.5, 0.7, 0.9]  # very different seeds ...
    b = [0.41, 0.6, 0.79]  # ... and a method that is 9-11 points worse on each
    unpaired = seed_interval(a)
    paired = paired_interval(a, b)
    assert paired.mean == pytest.approx(0.1) and paired.excludes(0.0)
    assert paired.half_width < unpaired.half_width / 10
    with pytest.raises(ValueError):
        paired_interval([0.1], [0.1, 0.2])


def test_methods_give_equal_budget_pairs_on_a_four_layer_llm():
    by = {m.name: libra_kwargs(m, 0.8, 4) for m in METHODS if m.name != "pdrop"}
    assert by["fastv"]["layers"] == [0] and by["libra-1pt"]["layers"] == [
        0
    ]  # FastV's point, round(4 * 3 / 32)
    assert by["fastv-q"]["layers"] == by["libra"]["layers"] == by["turbo"]["layers"] == [0, 1, 2]
    assert by["fastv-q"]["method"] == by["fastv"]["method"] == "fastv"
    for name in ("prune", "mean", "igm_pos", "igm_neg"):
        cfg = LibraConfig(**by[name])
        assert (cfg.select_method, cfg.merge_method, cfg.layers) == ("interval", name, [0, 1, 2])
    assert libra_kwargs(METHODS_BY_NAME["libra"], 0.5, 32)["layers"] == [7, 15, 23]  # the paper's
    assert [m.name for m in METHODS if m.aware] == ["fastv", "fastv-q", "turbo", "pdrop", "libra"]
    assert [m.name for m in select_methods(["libra", "fastv"])] == ["fastv", "libra"]  # METHODS order
    with pytest.raises(ValueError, match="unknown method"):
        select_methods(["fastv", "tome"])


def test_recipe_overrides_set_every_switch():
    kwargs = libra_kwargs(METHODS_BY_NAME["prune"], 0.8, 4)
    assert recipe_overrides(kwargs) == [
        "libra.enabled=true",
        'libra.method="libra"',
        "libra.layers=[0,1,2]",
        "libra.ratio=0.8",
        "libra.select=null",
        'libra.merge="prune"',
        "libra.keep_fractions=null",
    ]
    assert recipe_overrides(None) == ["libra.enabled=false"]


def test_pdrop_follows_the_ratio_as_lambda():
    """PyramidDrop's preset keeps 0.5 ** k whatever the ratio; at R its budget must be lambda = 1 - R (the
    same tokens per stage as the chained ratio rule, up to its floor), or every R measures the same model."""
    kwargs = {r: libra_kwargs(METHODS_BY_NAME["pdrop"], r, 4) for r in (0.5, 0.8)}
    assert kwargs[0.5]["keep_fractions"] == pytest.approx([0.5, 0.25, 0.125])
    assert kwargs[0.8]["keep_fractions"] == pytest.approx([0.2, 0.04, 0.008])
    assert LibraConfig(**kwargs[0.8]).kept_fractions == pytest.approx([0.2, 0.04, 0.008])
    assert "libra.keep_fractions=[0.2,0.04,0.008]" in recipe_overrides(kwargs[0.8])  # rounded: readable


def test_a_method_the_plugin_does_not_know_is_reported_not_run():
    assert unsupported(QualityMethod("bogus", {"method": "bogus"}, "quarters")) is not None
    assert "bogus" in unsupported(QualityMethod("bogus", {"method": "bogus"}, "quarters"))
    for m in METHODS:
        known = m.libra["method"] in METHOD_PRESETS
        assert (unsupported(m) is None) == known, m.name


def test_cell_store_resumes_only_cells_with_the_same_spec(tmp_path):
    store = CellStore(tmp_path)
    spec = {"model": ["recipe=demo_full", "train.seed=1"], "data": "val.json", "limit": None, "libra": None}
    assert not store.done(1, "free", "full", None, spec)
    path = store.save({"seed": 1, "phase": "free", "method": "full", "ratio": None, "spec": spec})
    assert path == tmp_path / "seed1" / "free-full.json" and not list(tmp_path.rglob("*.tmp"))
    assert store.done(1, "free", "full", None, spec)
    assert not store.done(1, "free", "full", None, {**spec, "limit": 16})  # another measurement: redo it
    assert not store.done(2, "free", "full", None, spec)
    assert store.path(0, "aware", "libra", 0.8).name == "aware-libra-R0.8.json"
    path.write_text("{not json")
    assert not store.done(1, "free", "full", None, spec)


def test_flops_ratio_is_the_papers_formula_on_the_measured_tokens():
    shape = LLMShape(4, 128, 256)
    assert flops_ratio(shape, [], [36.0], 40.0) == 1.0
    # points {0,1,2}: layer 0 sees 36 visual, layer 1 sees 7.6, layer 2 1.6, layer 3 1.6 (+ 40 text each)
    expected = sum(layer_flops(n + 40, shape) for n in (36, 7.6, 1.6, 1.6)) / (4 * layer_flops(76, shape))
    assert flops_ratio(shape, [0, 1, 2], [36.0, 7.6, 1.6, 1.6], 40.0) == pytest.approx(expected)
    # one point at layer 1: layers 0-1 full, 2-3 compressed
    expected = (2 * layer_flops(76, shape) + 2 * layer_flops(47, shape)) / (4 * layer_flops(76, shape))
    assert flops_ratio(shape, [1], [36.0, 7.0], 40.0) == pytest.approx(expected)


def _cell(seed, phase, method, ratio, correct, by_type, visual=(36.0,)):
    total = sum(n for _, n in by_type.values())
    return {
        "seed": seed, "phase": phase, "method": method, "ratio": ratio, "points": [] if ratio is None else [0],
        "correct": correct, "total": total, "accuracy": correct / total,
        "by_type": {t: list(c) for t, c in by_type.items()}, "visual_tokens": list(visual), "text_tokens": 40.0,
        "flops_ratio": 1.0 if ratio is None else 0.7, "seconds": 1.0, "spec": {},
    }  # fmt: skip


def _cells():
    cells = []
    for seed, (full, libra, fastv) in enumerate([(80, 70, 60), (90, 81, 72), (70, 59, 50)]):
        cells.append(
            _cell(seed, "free", "full", None, full, {"colour": (full // 2, 50), "count": (full // 2, 50)})
        )
        cells.append(
            _cell(seed, "free", "libra", 0.8, libra, {"colour": (libra - 30, 50), "count": (30, 50)})
        )
        cells.append(
            _cell(seed, "free", "fastv", 0.8, fastv, {"colour": (fastv - 30, 50), "count": (30, 50)})
        )
    cells.append(_cell(0, "aware", "libra", 0.8, 75, {"colour": (40, 50), "count": (35, 50)}))
    return cells


def test_aggregate_pairs_seeds_and_pools_questions():
    rows = aggregate(_cells())
    assert [(r["phase"], r["method"], r["ratio"]) for r in rows] == [
        ("free", "full", None), ("free", "fastv", 0.8), ("free", "libra", 0.8), ("aware", "libra", 0.8),
    ]  # fmt: skip
    full, fastv, libra, aware = rows
    assert full["seeds"] == [0, 1, 2] and full["accuracy"]["mean"] == pytest.approx(0.8)
    assert full["binomial"]["mean"] == pytest.approx(240 / 300) and full["binomial"]["n"] == 300
    assert full["delta_vs_full"] is None and full["delta_vs_libra"] is None
    # libra is 10, 9, 11 points below full on the three seeds: paired, the difference is sharp
    assert libra["delta_vs_full"]["mean"] == pytest.approx(-0.10) and libra["delta_vs_full"]["excludes_zero"]
    assert fastv["delta_vs_libra"]["mean"] == pytest.approx(-0.0933, abs=1e-4)
    assert fastv["delta_vs_libra"]["seeds"] == [0, 1, 2] and libra["delta_vs_libra"] is None
    assert (
        fastv["delta_equal_budget"] is None and libra["delta_equal_budget"] is None
    )  # no libra-1pt measured
    assert libra["by_type"]["count"] == {
        "accuracy": seed_interval([0.6] * 3).to_dict(),
        "correct": 90,
        "total": 150,
    }
    assert libra["by_type"]["colour"]["correct"] == 40 + 51 + 29
    # the aware phase has no full-token row and no second seed: no differences, no interval
    assert aware["delta_vs_full"] is None and aware["accuracy"]["half_width"] is None


def test_report_files(tmp_path):
    cells = _cells()
    meta = {
        "command": "quality.py", "recipe": "demo144_full", "lora_recipe": "demo144_libra_lora", "seeds": [0, 1, 2],
        "eval_data": "val.json", "eval_limit": None, "aware_ratio": 0.8, "ratios": [0.8], "machine": "test",
        "load_before": "0", "load_after": "0", "skipped_methods": {"pdrop": "unknown"},
    }  # fmt: skip
    write_report({"meta": meta, "rows": aggregate(cells), "cells": cells}, tmp_path)
    data = json.loads((tmp_path / "quality.json").read_text())
    assert set(data) == {"meta", "rows", "cells", "fields"} and len(data["rows"]) == 4
    assert set(data["fields"]) >= set(data["rows"][0])  # every row field is explained
    md = (tmp_path / "quality.md").read_text()
    assert "| method | points | visual tokens per stage | FLOPs | accuracy | SE | binomial |" in md
    assert "| Δ vs full | Δ vs libra | Δ same points | colour |" in md
    assert md.index("| colour") < md.index("| count")  # the demo's order: colour, shape, count
    assert "| fastv R=0.8 | {0} | 36.0 | 0.700 | 60.7 ± " in md and "-9.3 ± " in md
    assert "Not measured (unknown to the installed LibraConfig): pdrop" in md
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_weights_fingerprint_follows_the_weight_files(tmp_path):
    from libra_train.bench.quality_run import weights_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 1000)
    (tmp_path / "config.json").write_text("{}")
    first = weights_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"other": 1}')  # not weights: same fingerprint
    assert weights_fingerprint(tmp_path) == first and len(first) == 16
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")  # a retrained model
    assert weights_fingerprint(tmp_path) != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_fingerprint(tmp_path / "empty")


def test_equal_budget_pairs_fastv_with_libra_at_its_single_point():
    """FastV's single point is paired with ``libra-1pt`` (the same tokens removed at the same point), the
    three-point methods with ``libra``; the Libra rows have no such difference of their own."""
    cells = _cells()
    for seed, correct in enumerate([66, 80, 58]):  # 6, 8, 8 above fastv
        cells.append(
            _cell(seed, "free", "libra-1pt", 0.8, correct, {"colour": (correct - 30, 50), "count": (30, 50)})
        )
        cells.append(_cell(seed, "free", "turbo", 0.8, 65, {"colour": (35, 50), "count": (30, 50)}))
    rows = {r["method"]: r for r in aggregate(cells) if r["phase"] == "free"}
    assert rows["fastv"]["delta_equal_budget"]["mean"] == pytest.approx(-22 / 300)
    assert rows["fastv"]["delta_equal_budget"]["excludes_zero"]
    assert rows["turbo"]["delta_equal_budget"] == rows["turbo"]["delta_vs_libra"]
    assert rows["libra-1pt"]["delta_equal_budget"] is None and rows["libra"]["delta_equal_budget"] is None
