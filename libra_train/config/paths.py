"""Where recipes and DeepSpeed configs live, and how a recipe name becomes a file."""

from __future__ import annotations

from pathlib import Path

from libra_train.config.errors import RecipeError

# The repository's recipes/ (this file is libra_train/config/paths.py).
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEEPSPEED_DIR = RECIPES_DIR / "deepspeed"
BUNDLED_DEEPSPEED = ("zero2", "zero3", "zero3_offload")


def display_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it is under it (``recipes/demo.yaml``), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``recipes/*.yaml`` without the suffix), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(recipe: str | Path) -> Path:
    """Turn ``demo`` into ``recipes/demo.yaml``; a path to a ``.yaml``/``.yml`` file is taken as is.

    Raises:
        RecipeError: no such recipe (the message lists the bundled ones).
    """
    text = str(recipe)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    path = Path(text) if looks_like_path else RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"recipe {text!r} not found (looked for {display_path(path)}); "
            f"bundled recipes: {', '.join(list_recipes())}; or pass a path to a .yaml file"
        )
    return path


def resolve_deepspeed(name: str) -> Path:
    """Turn ``zero3`` into ``recipes/deepspeed/zero3.json``; a path to an existing ``.json`` is taken as is.

    Raises:
        RecipeError: neither a bundled name nor an existing JSON file.
    """
    if name in BUNDLED_DEEPSPEED:
        return DEEPSPEED_DIR / f"{name}.json"
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return path
    raise RecipeError(
        f"train.deepspeed must be one of {', '.join(BUNDLED_DEEPSPEED)} or an existing .json file, got {name!r}"
    )
