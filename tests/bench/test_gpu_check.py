"""The GPU check's own checks, run on CPU so that the script CI never runs on a GPU does not rot.

On CPU the same functions compare sdpa with eager in float32 (the GPU run adds bfloat16 and flash-attn 2)."""

from __future__ import annotations

import torch

from libra_train.bench import gpu_check


def test_equivalence_rows_on_cpu_sdpa_against_eager():
    rows = gpu_check.equivalence(torch.float32, "sdpa", torch.device("cpu"))
    assert [r["method"] for r in rows] == ["off", *gpu_check.CONFIGS]
    assert rows[0]["max_logit_diff"] < 1e-4
    for row in rows[1:]:
        assert row["position_maps_equal"] and row["generation_equal"], row
        assert row["max_logit_diff"] < 1e-4 and row["loss_diff"] < 1e-5 and row["rel_grad_diff"] < 1e-5
        assert row["visual_tokens"][0] == [36, 0, 36] and row["visual_tokens"][1][0] < 36  # it compressed


def test_importance_row_matches_the_eager_attention_on_cpu():
    row = gpu_check.importance_row(torch.float32, "sdpa", torch.device("cpu"))
    assert row["max_alpha_diff"] < 1e-6


def test_main_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--skip-bench"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_markdown_report_has_every_section():
    text = gpu_check.markdown({"torch": "x"}, [{"method": "libra", "max_logit_diff": 1e-7}], [], [])
    assert "Equivalence" in text and "Hybrid importance" in text and "synchronisations" in text
