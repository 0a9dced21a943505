"""The analytic FLOPs model against the Libra-Merging paper's Table 1 (N=576, no text)."""

import pytest

from libra_train.compress.schedule import token_schedule
from libra_train.flops import (
    PRESETS,
    LLMShape,
    Method,
    layer_flops,
    libra_points,
    main,
    pdrop_method,
    schedule_flops,
)

SEVEN_B = PRESETS["llava15-7b"]
THIRTEEN_B = PRESETS["llava15-13b"]


def test_one_layer_by_hand():
    # n=576, d=4096, m=11008:
    #   4*n*d^2   = 4 * 576 * 16_777_216     = 38_654_705_664
    #   2*n^2*d   = 2 * 331_776 * 4096        =  2_717_908_992
    #   3*n*d*m   = 3 * 576 * 4096 * 11008    = 77_913_391_104
    #   total                                  = 119_286_005_760
    assert layer_flops(576, SEVEN_B) == 119_286_005_760
    # 32 layers: 3.817 TFLOPs, the paper's 3.82
    assert schedule_flops([576] * 32, SEVEN_B) == 32 * 119_286_005_760


def test_presets():
    assert PRESETS["llava15-7b"] == LLMShape(32, 4096, 11008)
    assert PRESETS["llava15-13b"] == LLMShape(40, 5120, 13824)
    assert PRESETS["llava-next-8b"] == LLMShape(32, 4096, 14336)
    assert libra_points(32) == [7, 15, 23]
    assert libra_points(40) == [9, 19, 29]


def test_fastv_schedule():
    sched = Method("FastV", (3,), 0.5).schedule(SEVEN_B, 576)
    assert sched == [576] * 4 + [288] * 28
    assert schedule_flops(sched, SEVEN_B) == 4 * layer_flops(576, SEVEN_B) + 28 * layer_flops(288, SEVEN_B)


def _tflops(shape: LLMShape, points, ratio, compensation=False) -> float:
    sched = token_schedule(shape.num_layers, 576, points, ratio, compensation=compensation)
    return round(schedule_flops(sched, shape) / 1e12, 2)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [(SEVEN_B, (3.82, 2.13, 1.78, 1.41)), (THIRTEEN_B, (7.44, 4.06, 3.47, 2.74))],
    ids=["7b", "13b"],
)
def test_paper_table_1(shape, expected):
    points = libra_points(shape.num_layers)
    got = (
        _tflops(shape, [], 0.0),
        _tflops(shape, [3], 0.5),
        _tflops(shape, points, 0.5),
        _tflops(shape, points, 2 / 3),
    )
    assert got == expected


def test_table_1_does_not_count_compensation_tokens():
    # Counting one compensation token per point breaks the match: the paper's convention leaves them out.
    assert _tflops(SEVEN_B, [7, 15, 23], 0.5, compensation=True) == 1.79
    assert _tflops(SEVEN_B, [7, 15, 23], 2 / 3, compensation=True) == 1.42
    assert _tflops(THIRTEEN_B, [9, 19, 29], 0.5, compensation=True) == 3.49
    assert _tflops(THIRTEEN_B, [9, 19, 29], 2 / 3, compensation=True) == 2.76


def test_schedule_length_checked():
    with pytest.raises(ValueError, match="31 entries for 32 layers"):
        schedule_flops([576] * 31, SEVEN_B)


def test_cli_prints_table(capsys):
    assert main(["--preset", "llava15-7b"]) == 0
    out = capsys.readouterr().out
    assert "| vanilla | - | - | - | 576 | 3.82 | 1.000 |" in out
    assert "| FastV | {3} | 50% | - | 576/288 | 2.13 | 0.558 |" in out
    assert "| Libra | {7,15,23} | 50% | not counted | 576/288/144/72 | 1.78 | 0.466 |" in out
    assert "| Libra | {7,15,23} | 67% | not counted | 576/192/64/21 | 1.41 | 0.368 |" in out
    assert "| Libra | {7,15,23} | 67% | counted | 576/193/66/24 | 1.42 | 0.371 |" in out
    assert "| PDrop | {7,15,23} | λ=0.5 | - | 576/288/144/72 | 1.78 | 0.466 |" in out


def test_pdrop_schedule_takes_floors_of_the_original_count():
    pdrop = pdrop_method(32)
    assert (pdrop.points, pdrop.keep_fractions) == ((7, 15, 23), (0.5, 0.25, 0.125))
    assert pdrop.schedule(SEVEN_B, 625) == [625] * 8 + [312] * 8 + [156] * 8 + [78] * 8
    # of the original count, floored: 10 * 0.55 -> 5; the chained rule rounds 10 * (1 - 0.45) = 5.5 up to 6
    assert Method("PDrop", (1, 3), 0.45, keep_fractions=(0.55, 0.3025)).visual_stages(10) == [10, 5, 3]
    assert Method("Libra", (1, 3), 0.45).visual_stages(10) == [10, 6, 3]


def test_cli_all_presets(capsys):
    assert main(["--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("| vanilla |") == len(PRESETS)
    assert "| Libra | {9,19,29} | 67% | not counted | 576/192/64/21 | 2.74 | 0.369 |" in out
    assert "| FastV | {3} | 50% | - | 576/288 | 4.06 | 0.546 |" in out
