"""Shared helpers for the recipe tests: every bundled recipe, with dummy values for its ``???`` keys.

A plain module rather than ``conftest.py`` so that test modules can import it by a unique name
(several test folders have a ``conftest.py``).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from libra_train.config import RECIPES_DIR, compose

RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))
# (libra recipe, full-token twin): each pair may differ only in libra.enabled.
TWINS = [
    ("demo", "demo_full"),
    ("demo_libra_lora", "demo_full_lora"),
    ("demo144", "demo144_full"),
    ("demo144_libra_lora", "demo144_full_lora"),
    ("llava15_libra", "llava15_full"),
    ("llava15_libra_lora", "llava15_full_lora"),
    ("llava_next_libra", "llava_next_full"),
    ("qwen2vl_libra", "qwen2vl_full"),
    ("qwen25vl_libra", "qwen25vl_full"),
    ("qwen3vl_libra", "qwen3vl_full"),
    ("llava_ov_libra", "llava_ov_full"),
]


def dummy_overrides(recipe: str) -> list[str]:
    """``key=/dummy/key`` for every ``???`` of the recipe, so that it can be loaded without downloads."""
    return [f"{key}=/dummy/{key}" for key in sorted(OmegaConf.missing_keys(compose(recipe)))]
