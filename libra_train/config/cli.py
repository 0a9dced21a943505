"""The command line of ``train.py``: ``recipe=NAME`` plus ``key=value`` / ``~key`` overrides.

The DeepSpeed launcher runs ``train.py --local_rank=N recipe=... ...``; ``parse_cli`` accepts that flag (and
``--local_rank N``, ``--local-rank=N``) and strips it. Every other ``-``/``--`` flag is an error: recipes
are configured only through overrides, so there is exactly one way to set a value.
"""

from __future__ import annotations

from collections.abc import Sequence

from libra_train.config.errors import RecipeError
from libra_train.config.paths import list_recipes

USAGE = (
    "usage: python train.py recipe=NAME [key=value ...] [~key ...]\n"
    "       deepspeed [--num_gpus N] train.py recipe=NAME [key=value ...]\n"
    "  recipe=NAME   a bundled recipe (recipes/NAME.yaml) or a path to a .yaml file\n"
    "  key=value     override a recipe value, YAML-typed: train.lr=2e-5 libra.layers=[1,3] model.tiny=null\n"
    "  ~key          reset a value to the schema default (delete it from a mapping such as libra)"
)
_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def _usage_error(message: str) -> RecipeError:
    return RecipeError(f"{message}\n{USAGE}\n  recipes: {', '.join(list_recipes())}")


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str], int | None]:
    """Split the command line into the recipe, the overrides and the launcher's local rank.

    Args:
        argv: the arguments after the program name (``sys.argv[1:]``).

    Returns:
        ``(recipe, overrides, local_rank)``: the recipe name or path as given (``load_recipe`` resolves
        it), the ``key=value`` / ``~key`` items in order, and the ``--local_rank`` value (None without it).

    Raises:
        RecipeError: no ``recipe=``, two of them, an unknown flag, or an item that is not ``key=value``.
    """
    recipe: str | None = None
    overrides: list[str] = []
    local_rank: int | None = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in _LOCAL_RANK_FLAGS:
            if not eq:  # "--local_rank N"
                i += 1
                value = args[i] if i < len(args) else ""
            try:
                local_rank = int(value)
            except ValueError:
                raise _usage_error(f"{flag} needs an integer, got {value!r}") from None
        elif arg.startswith("-"):
            raise _usage_error(f"unknown flag {flag!r}: recipes take key=value overrides, not flags")
        elif flag == "recipe":
            if recipe is not None:
                raise _usage_error(f"recipe given twice ({recipe!r} and {value!r})")
            if not value:
                raise _usage_error("recipe= needs a name or a path")
            recipe = value
        elif arg.startswith("+"):
            raise _usage_error(f"{arg!r}: '+' is not needed (every key exists in the schema); drop it")
        elif arg.startswith("~") or eq:
            overrides.append(arg)
        else:
            raise _usage_error(f"expected key=value, ~key or recipe=NAME, got {arg!r}")
        i += 1
    if recipe is None:
        raise _usage_error("missing recipe=NAME")
    return recipe, overrides, local_rank
