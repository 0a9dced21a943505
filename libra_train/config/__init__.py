"""Recipes: one flat YAML per run plus ``key=value`` overrides, validated against a typed schema.

    recipe, overrides, local_rank = parse_cli(sys.argv[1:])
    cfg = load_recipe(recipe, overrides, validators=[lambda c: LibraConfig(**c.libra)], world_size=ws)
    ds = deepspeed_config(cfg, world_size=ws, hidden_size=model_config.hidden_size)
    save_recipe(cfg, Path(cfg.train.output_dir) / "recipe.yaml")

Imports nothing of ours outside this package (no transformers, no plug-in).
"""

from libra_train.config.cli import USAGE, parse_cli
from libra_train.config.ds_config import deepspeed_config, offloads_optimizer
from libra_train.config.errors import RecipeError
from libra_train.config.loader import MISSING_HINTS, compose, load_recipe, recipe_to_dict, save_recipe
from libra_train.config.paths import (
    BUNDLED_DEEPSPEED,
    DEEPSPEED_DIR,
    RECIPES_DIR,
    list_recipes,
    resolve_recipe,
)
from libra_train.config.schema import (
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
)
from libra_train.config.validate import gradient_accumulation_steps, validate

__all__ = [
    "BUNDLED_DEEPSPEED",
    "DEEPSPEED_DIR",
    "MISSING_HINTS",
    "RECIPES_DIR",
    "USAGE",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "RecipeConfig",
    "RecipeError",
    "TrainConfig",
    "compose",
    "deepspeed_config",
    "gradient_accumulation_steps",
    "list_recipes",
    "load_recipe",
    "offloads_optimizer",
    "parse_cli",
    "recipe_to_dict",
    "resolve_recipe",
    "save_recipe",
    "validate",
]
