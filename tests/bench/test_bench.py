"""The benchmark's tiny mode end to end (files, every documented field, FLOPs = libra_train.flops), its pure
helpers, and its error paths. No timing assertions: timing lives in the benchmark, not in tests."""

from __future__ import annotations

import json

import pytest
import torch

from libra_train.bench import llm_step
from libra_train.bench.cli import main
from libra_train.bench.compare import fastv_point, method_specs, schedule_from_run
from libra_train.bench.memory import PeakMemory, SavedForBackward
from libra_train.bench.report import FIELDS
from libra_train.bench.shapes import SHAPES
from libra_train.compress.schedule import token_schedule
from libra_train.flops import libra_points, schedule_flops

TINY = SHAPES["tiny"]
RATIOS = (0.5, 0.8)
EXPECTED_LABELS = ["full"] + [f"{m} R={r:g}" for m in ("fastv", "fastv-q", "libra") for r in RATIOS]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run with every method (in-process; one thread so that a busy CPU does not stall it)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = main(
            ["--model", "tiny", "--methods", "full,fastv,fastv-q,libra", "--ratios", ",".join(map(str, RATIOS)),
             "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_tiny_mode_writes_markdown_json_and_png(tiny_run):
    out, data = tiny_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "### Training step" in md and "### Inference" in md
    assert "vision tower" in md  # the header says what is not run
    for label in EXPECTED_LABELS:
        assert f"| {label} |" in md
    assert [r["label"] for r in data["results"]] == EXPECTED_LABELS


def test_json_has_every_documented_field_for_every_method(tiny_run):
    _, data = tiny_run
    assert data["fields"] == FIELDS
    for row in data["results"]:
        missing = sorted(set(FIELDS) - set(row))
        assert not missing, f"{row['label']}: {missing}"
        assert not sorted(set(row) - set(FIELDS)), "an undocumented field"
        nulls = [k for k, v in row.items() if v is None and k not in ("select", "merge")]
        assert not nulls, f"{row['label']}: {nulls} are null although the run has a full row"
    meta = data["meta"]
    for key in ("model", "shape", "device", "dtype", "warmup", "repeats", "memory", "scope", "fastv_point"):
        assert key in meta
    assert meta["shape"]["num_layers"] == TINY.num_layers


@pytest.mark.parametrize("prefix, n_text, length", [("", TINY.n_text_train, TINY.train_length),
                                                    ("prefill_", TINY.n_text_prompt, TINY.prompt_length)])  # fmt: skip
def test_flops_column_is_libra_train_flops_of_the_schedule(tiny_run, prefix, n_text, length):
    _, data = tiny_run
    shape = TINY.llm
    full = schedule_flops([length] * shape.num_layers, shape)
    for row in data["results"]:
        schedule = row[f"{prefix}schedule"]
        assert schedule == schedule_from_run(
            shape.num_layers, row["points"], row[f"{prefix}tokens_per_stage"]
        )
        assert row[f"{prefix}flops"] == schedule_flops(schedule, shape)
        assert row[f"{prefix}flops_full"] == full
        assert row[f"{prefix}flops_ratio"] == pytest.approx(schedule_flops(schedule, shape) / full, rel=1e-12)
        planned = token_schedule(shape.num_layers, TINY.n_visual, row["points"], row["ratio"], n_text=n_text)
        if row["method"] in ("full", "fastv", "fastv-q"):  # pruning: exactly the planned schedule
            assert schedule == planned
        else:  # Libra: at most one compensation token per point on top of the merged targets
            upper = token_schedule(
                shape.num_layers, TINY.n_visual, row["points"], row["ratio"], n_text=n_text, compensation=True
            )
            assert all(lo <= n <= hi for lo, n, hi in zip(planned, schedule, upper))


def test_equal_budget_rows_share_libras_points_and_targets(tiny_run):
    _, data = tiny_run
    rows = {r["label"]: r for r in data["results"]}
    for r in RATIOS:
        libra, pruned = rows[f"libra R={r:g}"], rows[f"fastv-q R={r:g}"]
        assert libra["points"] == pruned["points"] == libra_points(TINY.num_layers)
        assert (libra["select"], libra["merge"], pruned["select"], pruned["merge"]) == (
            "interval", "igm", "topk", "prune"
        )  # fmt: skip
        assert rows[f"fastv R={r:g}"]["points"] == [fastv_point(TINY.num_layers)]


def test_relative_fields_are_the_documented_ratios(tiny_run):
    _, data = tiny_run
    base = data["results"][0]
    assert base["method"] == "full" and base["train_speedup"] == 1.0 and base["flops_ratio"] == 1.0
    for row in data["results"]:
        assert row["train_speedup"] == pytest.approx(base["train_step_ms"] / row["train_step_ms"])
        assert row["train_efficiency"] == pytest.approx(row["train_speedup"] * row["flops_ratio"])
        assert row["prefill_efficiency"] == pytest.approx(row["prefill_speedup"] * row["prefill_flops_ratio"])
        assert row["train_samples_per_s"] == pytest.approx(TINY.batch / (row["train_step_ms"] / 1e3))
        assert row["train_ckpt_tokens_per_s"] == pytest.approx(
            TINY.batch * TINY.train_length / (row["train_ckpt_step_ms"] / 1e3)
        )
        assert row["train_step_ms_min"] <= row["train_step_ms"] <= row["train_step_ms_max"]


def test_fastv_point_scales_the_papers_point_three_of_32():
    assert [fastv_point(n) for n in (2, 4, 8, 16, 32, 40)] == [0, 0, 1, 2, 3, 4]


def test_method_specs_one_full_row_and_one_row_per_ratio():
    specs = method_specs(["full", "fastv", "libra"], [0.5, 0.8], 32)
    assert [(s.method, s.ratio, s.points) for s in specs] == [
        ("full", 0.0, ()), ("fastv", 0.5, (3,)), ("fastv", 0.8, (3,)),
        ("libra", 0.5, (7, 15, 23)), ("libra", 0.8, (7, 15, 23)),
    ]  # fmt: skip
    assert specs[0].config() is None
    assert specs[-1].config().layers == [7, 15, 23] and specs[1].config().merge_method == "prune"
    with pytest.raises(ValueError, match="at least 4 layers"):
        method_specs(["libra"], [0.5], 3)


def test_schedule_from_run_by_hand():
    # points 1 and 3 of 6 layers: layers 0-1 stage 0, 2-3 stage 1, 4-5 stage 2
    assert schedule_from_run(6, [1, 3], [10, 6, 4]) == [10, 10, 6, 6, 4, 4]
    assert schedule_from_run(3, [], [7]) == [7, 7, 7]


def test_saved_for_backward_counts_activations_once_and_not_parameters():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    model = torch.nn.Module()
    model.weight = weight
    x = torch.randn(32, 64, requires_grad=True)
    with SavedForBackward(model) as saved:
        h = x @ weight  # saves x and the weight (a parameter: not counted)
        y = (h * h).sum()  # saves h (twice: one storage)
    assert saved.bytes == x.numel() * 4 + h.numel() * 4 and saved.tensors == 2
    y.backward()  # the hooks leave autograd working


def test_compression_saves_fewer_activations_for_backward(tiny_run):
    _, data = tiny_run
    rows = {r["label"]: r for r in data["results"]}
    full = rows["full"]["train_saved_for_backward_mib"]
    for r in RATIOS:
        libra = rows[f"libra R={r:g}"]
        assert libra["train_saved_for_backward_mib"] < full
        assert libra["train_ckpt_saved_for_backward_mib"] < libra["train_saved_for_backward_mib"]
    assert (
        rows["libra R=0.8"]["train_saved_for_backward_mib"]
        < rows["libra R=0.5"]["train_saved_for_backward_mib"]
    )


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if mem.kind != "peak_rss":
        pytest.skip(f"per-block peak RSS is not available here ({mem.kind})")
    assert mem.peak_mib - mem.start_mib >= 60


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "llava15-7b", "--device", "cpu"], "GPU shape"),
        (["--model", "tiny", "--repeats", "0"], "--repeats"),
        (["--model", "tiny", "--layers", "3"], "at least 4 layers"),
    ],
)
def test_cli_refuses_bad_runs_before_building_anything(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["--methods", "full,tome"])


def test_llm_step_probe_still_runs(capsys):
    argv = ["--layers", "4", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--visual", "16",
            "--prefix", "3", "--text", "6", "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip
    assert llm_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "| libra | [0, 1, 2] |" in out and "| fastv | [0] |" in out
