"""parse_cli: recipe=, overrides, and the DeepSpeed launcher's --local_rank."""

from __future__ import annotations

import pytest

from libra_train.config import RECIPES_DIR, RecipeError, parse_cli, resolve_recipe


def test_plain_command_line():
    assert parse_cli(["recipe=demo", "train.lr=1e-4", "~libra.theta"]) == (
        "demo",
        ["train.lr=1e-4", "~libra.theta"],
        None,
    )


def test_local_rank_equals_form_is_stripped():
    # deepspeed's launcher: train.py --local_rank=0 recipe=... key=value
    assert parse_cli(["--local_rank=0", "recipe=demo", "train.seed=1"]) == ("demo", ["train.seed=1"], 0)


def test_local_rank_separate_value_is_stripped():
    assert parse_cli(["recipe=demo", "--local_rank", "1", "train.seed=1"]) == ("demo", ["train.seed=1"], 1)
    assert parse_cli(["--local-rank=3", "recipe=demo"]) == ("demo", [], 3)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["recipe=demo", "--lr=1e-4"], "unknown flag '--lr'"),
        (["recipe=demo", "-v"], "unknown flag '-v'"),
        (["train.lr=1"], "missing recipe=NAME"),
        (["recipe=demo", "recipe=demo_full"], "recipe given twice"),
        (["recipe=demo", "train.lr"], "expected key=value, ~key or recipe=NAME, got 'train.lr'"),
        (["recipe=demo", "+train.lr=1"], "'+' is not needed"),
        (["recipe=demo", "--local_rank=x"], "--local_rank needs an integer"),
        (["recipe=demo", "--local_rank"], "--local_rank needs an integer"),
    ],
)
def test_errors(argv, expected):
    with pytest.raises(RecipeError) as info:
        parse_cli(argv)
    assert expected in str(info.value)
    assert "usage: python train.py recipe=NAME" in str(info.value)


def test_missing_recipe_lists_the_bundled_ones():
    with pytest.raises(RecipeError, match="demo_full"):
        parse_cli([])


def test_recipe_by_name_or_path():
    assert resolve_recipe("demo") == RECIPES_DIR / "demo.yaml"
    assert resolve_recipe("recipes/demo.yaml").resolve() == RECIPES_DIR / "demo.yaml"
    with pytest.raises(RecipeError, match="bundled recipes: .*llava15_libra"):
        resolve_recipe("llava16")
