"""Semantic checks of a typed recipe: allowed values, cross-field rules, batch divisibility.

Types and key names are already enforced by the schema when the recipe is loaded; this module checks
what a type cannot say. All problems are reported together, one per line.
"""

from __future__ import annotations

import re
from pathlib import Path

from libra_train.config.errors import RecipeError
from libra_train.config.paths import BUNDLED_DEEPSPEED, display_path, resolve_deepspeed
from libra_train.config.schema import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    FAMILIES,
    PRECISIONS,
    SCHEDULERS,
    TEMPLATES,
    WANDB_MODES,
    RecipeConfig,
    TrainConfig,
    demo_data_paths,
)


def recipe_label(cfg: RecipeConfig) -> str:
    """How messages name a recipe: its file (``recipes/demo.yaml``) or, when built in Python, its name."""
    return display_path(cfg.recipe_path) if cfg.recipe_path else f"recipe {cfg.recipe_name!r}"


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """``global_batch_size / (micro_batch_size * world_size)``, which must be a positive integer.

    Raises:
        RecipeError: the global batch is not divisible (the message suggests valid values).
    """
    per_step = train.micro_batch_size * world_size
    if world_size < 1 or per_step < 1 or train.global_batch_size % per_step:
        raise RecipeError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}; "
            f"e.g. train.global_batch_size={max(per_step, train.global_batch_size // max(per_step, 1) * per_step)}"
        )
    return train.global_batch_size // per_step


def _choice(errors: list[str], key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(errors: list[str], key: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        errors.append(f"{key} must be > 0{' or null' if allow_none else ''}, got {value!r}")


def _check_model_data(cfg: RecipeConfig, errors: list[str]) -> None:
    m, d = cfg.model, cfg.data
    if (m.path is None) == (m.tiny is None):
        errors.append(
            "set exactly one of model.path (a local HF checkpoint) and model.tiny (a tiny test model)"
        )
    _choice(errors, "model.family", m.family, FAMILIES)
    _choice(errors, "model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    _choice(errors, "model.dtype", m.dtype, DTYPES)
    if not (m.train_projector or m.train_llm or cfg.lora.enabled or not m.freeze_vision_tower):
        errors.append(
            "nothing to train: set model.train_projector, model.train_llm, lora.enabled or "
            "model.freeze_vision_tower=false"
        )
    if d.train is None and d.demo is None:
        errors.append("set data.train (a LLaVA-format JSON file) or data.demo (generate the demo data)")
    if d.demo is not None:
        generated = demo_data_paths(cfg.train.output_dir)
        for key, value in generated.items():
            given = getattr(d, key)
            if given is not None and given != value:
                errors.append(
                    f"data.{key}={given} is set, but data.demo generates the data and would replace it with "
                    f"{value}; to use your own data drop the demo with ~data.demo (or drop data.{key})"
                )
    if m.tiny is not None and m.family != "llava":
        errors.append(
            f"model.family={m.family} is set, but model.tiny builds a tiny LLaVA-1.5 (family llava) whatever it "
            "says; set model.path to a checkpoint of that family, or drop model.family"
        )
    if d.num_proc is not None and d.num_proc < 1:
        errors.append(f"data.num_proc must be >= 1 or null (auto), got {d.num_proc}")
    _choice(errors, "data.template", d.template, TEMPLATES)
    _positive(errors, "data.max_length", d.max_length)
    _positive(errors, "data.eval_max_samples", d.eval_max_samples, allow_none=True)
    if d.num_workers < 0:
        errors.append(f"data.num_workers must be >= 0, got {d.num_workers}")


def _check_lora(cfg: RecipeConfig, errors: list[str]) -> None:
    lora = cfg.lora
    _positive(errors, "lora.r", lora.r)
    _positive(errors, "lora.alpha", lora.alpha)
    _positive(errors, "lora.projector_lr", lora.projector_lr, allow_none=True)
    if not 0 <= lora.dropout < 1:
        errors.append(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    try:
        re.compile(lora.target_regex)
    except re.error as exc:
        errors.append(f"lora.target_regex is not a valid regular expression: {exc}")
    if lora.enabled and cfg.model.train_llm:
        errors.append("lora.enabled trains adapters on a frozen LLM: set model.train_llm=false")


def _check_train(cfg: RecipeConfig, errors: list[str], world_size: int) -> None:
    t = cfg.train
    if t.max_steps is None:
        _positive(errors, "train.epochs", t.epochs)
    _positive(errors, "train.max_steps", t.max_steps, allow_none=True)
    _positive(errors, "train.micro_batch_size", t.micro_batch_size)
    _positive(errors, "train.global_batch_size", t.global_batch_size)
    if t.micro_batch_size > 0 and t.global_batch_size > 0:
        try:
            gradient_accumulation_steps(t, world_size)
        except RecipeError as exc:
            errors.append(str(exc))
    _positive(errors, "train.lr", t.lr)
    if t.weight_decay < 0:
        errors.append(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if not 0 <= t.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.max_grad_norm < 0:
        errors.append(f"train.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    _choice(errors, "train.scheduler", t.scheduler, SCHEDULERS)
    _choice(errors, "train.precision", t.precision, PRECISIONS)
    for key in ("save_steps", "save_total_limit", "eval_steps"):
        _positive(errors, f"train.{key}", getattr(t, key), allow_none=True)
    if not t.output_dir:
        errors.append("train.output_dir must not be empty")
    if t.resume not in (None, "latest") and not Path(t.resume).is_dir():
        errors.append(
            f"train.resume must be null, 'latest' or an existing checkpoint directory, got {t.resume!r}"
        )
    if t.overwrite_output_dir and t.resume is not None:
        errors.append(
            f"train.overwrite_output_dir=true deletes the checkpoints that train.resume={t.resume} would continue; "
            "drop one of them"
        )
    if t.deepspeed not in BUNDLED_DEEPSPEED:
        try:
            resolve_deepspeed(t.deepspeed)
        except RecipeError as exc:
            errors.append(str(exc))


def validate(cfg: RecipeConfig, world_size: int = 1) -> None:
    """Check what the schema's types cannot; ``load_recipe`` calls it with ``world_size=1``.

    Call it again at run time with the real data-parallel world size (``deepspeed_config`` does).
    The ``libra`` section is only checked to be a mapping: ``LibraConfig`` validates its contents (pass it
    as a ``load_recipe`` validator).

    Raises:
        RecipeError: every problem found, one per line, prefixed with the recipe file.
    """
    errors: list[str] = []
    if not isinstance(cfg.libra, dict):
        errors.append(f"libra must be a mapping of LibraConfig fields, got {cfg.libra!r}")
    _check_model_data(cfg, errors)
    _check_lora(cfg, errors)
    _check_train(cfg, errors, world_size)
    log = cfg.logging
    _positive(errors, "logging.log_every", log.log_every)
    _choice(errors, "logging.wandb_mode", log.wandb_mode, WANDB_MODES)
    if errors:
        label = recipe_label(cfg)
        if len(errors) == 1:
            raise RecipeError(f"{label}: {errors[0]}")
        raise RecipeError(f"{label}: {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))
