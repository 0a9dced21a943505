"""Token counts of compression schedules (pure Python, milliseconds)."""

import pytest
import torch

from libra_train.compress.schedule import kept_of_original, num_targets, token_schedule, visual_schedule
from libra_train.compress.stage import kept_of_original_device


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [
        (576, 0.5, 288),
        (33, 0.5, 16),  # 16.5 rounds half to even
        (35, 0.5, 18),  # 17.5 rounds half to even
        (576, 2 / 3, 192),
        (64, 2 / 3, 21),  # 21.33
        (576, 0.8, 115),  # 115.2
        (7, 0.0, 7),  # ratio 0 keeps everything
        (1, 0.5, 1),  # at least one target
        (3, 0.9, 1),  # 0.3 rounds to 0, clamped to 1
        (0, 0.5, 0),  # nothing to compress
    ],
)
def test_num_targets(n, ratio, expected):
    assert num_targets(n, ratio) == expected


def test_libra_schedule_32_layers():
    sched = token_schedule(32, 576, [7, 15, 23], 0.5)
    assert sched == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8


def test_compensation_tokens_are_carried():
    sched = token_schedule(32, 576, [7, 15, 23], 0.5, compensation=True)
    assert sched == [576] * 8 + [289] * 8 + [146] * 8 + [75] * 8


def test_n_text_added_to_every_layer():
    sched = token_schedule(32, 576, [7, 15, 23], 0.5, n_text=40, compensation=True)
    assert sched == [616] * 8 + [329] * 8 + [186] * 8 + [115] * 8


def test_fastv_point_3():
    assert token_schedule(32, 576, [3], 0.5) == [576] * 4 + [288] * 28


def test_per_point_ratios_and_uneven_stages():
    sched = token_schedule(10, 100, [0, 4, 8], [0.5, 0.2, 0.75])
    # 100 -> 50 -> 40 -> 10; layer 0 full, layers 1-4, 5-8, then layer 9
    assert sched == [100] + [50] * 4 + [40] * 4 + [10]


def test_no_points_is_vanilla():
    assert token_schedule(4, 576, [], 0.5, n_text=3) == [579] * 4
    assert token_schedule(4, 576, [], [], compensation=True) == [576] * 4


def test_compensation_only_when_tokens_removed():
    # ratio 0 removes nothing; n=1 cannot go below 1: neither adds a compensation token
    assert token_schedule(4, 10, [0, 1], [0.0, 0.5], compensation=True) == [10, 10, 6, 6]
    assert token_schedule(3, 1, [0], 0.5, compensation=True) == [1, 1, 1]
    assert token_schedule(3, 0, [0], 0.5, compensation=True, n_text=2) == [2, 2, 2]


def test_visual_schedule():
    assert visual_schedule(576, [0.5] * 3) == [576, 288, 144, 72]
    assert visual_schedule(576, [2 / 3] * 3, compensation=True) == [576, 193, 66, 24]
    assert visual_schedule(576, []) == [576]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"points": [15, 7]}, "sorted and unique"),
        ({"points": [7, 7]}, "sorted and unique"),
        ({"points": [31]}, r"out of range \[0, 30\]"),
        ({"points": [-1]}, "out of range"),
        ({"ratios": 1.0}, r"in \[0, 1\)"),
        ({"ratios": -0.1}, r"in \[0, 1\)"),
        ({"ratios": float("nan")}, r"in \[0, 1\)"),
        ({"ratios": [0.5, 0.5]}, "got 2 ratios for 3 compression points"),
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"n_visual": -1}, "n_visual must be >= 0"),
        ({"n_text": -1}, "n_text must be >= 0"),
    ],
)
def test_validation(kwargs, match):
    args = {"num_layers": 32, "n_visual": 576, "points": [7, 15, 23], "ratios": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        token_schedule(**args)


def test_kept_of_original_is_a_floor_with_one_token_at_least():
    assert [kept_of_original(125, f) for f in (0.6, 0.36, 0.216)] == [75, 45, 27]  # PyramidDrop's int(N0 * r)
    assert kept_of_original(125, 0.6**3) == 26  # a power is not the typed decimal
    assert (kept_of_original(0, 0.5), kept_of_original(1, 0.5), kept_of_original(7, 0.1)) == (0, 1, 1)
    with pytest.raises(ValueError, match="2 keep fractions for 3"):
        token_schedule(32, 576, [7, 15, 23], 0.5, keep_fractions=[0.5, 0.25])


def test_kept_of_original_on_the_device_equals_the_host():
    """The host sizes the tensors, the device selects: both must count the same for every N0 and fraction."""
    n0 = torch.arange(0, 2000)
    for fraction in (0.5, 0.25, 0.125, 0.6, 0.36, 0.216, 0.6**3, 1 / 3, 0.7, 0.9, 1.0):
        device = kept_of_original_device(n0, fraction)
        assert device.tolist() == [kept_of_original(n, fraction) for n in n0.tolist()], fraction
