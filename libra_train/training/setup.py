"""Model set-up: build or load, choose what trains, Libra, LoRA, gradient checkpointing.

Order matters and is the one LLaVA and peft expect: build the model (under ``HfDeepSpeedConfig`` for ZeRO-3,
created by the caller), set ``requires_grad`` (vision tower, projector, LLM), apply Libra (it adds no
parameter and must see the unwrapped model), then wrap with peft (LoRA adapters on the LLM only; the projector
stays a plain trainable, saved next to the adapter as LLaVA's ``non_lora_trainables``), then enable gradient
checkpointing (non-reentrant, so frozen inputs need no ``requires_grad`` trick).
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from libra_train.config import RecipeConfig, RecipeError
from libra_train.models import build_tiny_llava, load_model_and_processor
from libra_train.plugin import LibraConfig, apply_libra
from libra_train.training.optim import is_projector

VISION_MARKERS = ("vision_tower", "vision_model", "model.visual.")
LLM_MARKERS = ("language_model", "lm_head")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def libra_config(cfg: RecipeConfig) -> LibraConfig:
    """The recipe's ``libra`` section as a validated `LibraConfig` (a ``load_recipe`` validator).

    Raises:
        ValueError: a key that is not a `LibraConfig` field (with the closest one, ``libra.ratoi`` -> ``ratio``),
            or a value `LibraConfig` rejects.
    """
    known = [f.name for f in dataclasses.fields(LibraConfig)]
    for key in cfg.libra:
        if key not in known:
            guess = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean 'libra.{guess[0]}'?" if guess else f"known: {', '.join(known)}"
            raise ValueError(f"unknown key 'libra.{key}' ({hint})")
    return LibraConfig(**cfg.libra)


def check_libra_fits(model: nn.Module, libra: LibraConfig) -> None:
    """Refuse compression points the model does not have, naming the recipe key (before `apply_libra` would
    raise deep inside the plug-in).

    Raises:
        RecipeError: a point of ``libra.layers`` at or beyond the model's last layer.
    """
    if not libra.enabled:
        return
    layers = model.config.get_text_config().num_hidden_layers
    try:
        libra.check_num_layers(layers)
    except ValueError:
        raise RecipeError(
            f"libra.layers={libra.layers} does not fit this model: its language model has {layers} layers "
            f"(0..{layers - 1}) and a point l compresses the output of layer l for the layers after it, so every "
            f"point must be at most {layers - 2}; e.g. libra.layers=[{max(0, layers // 2 - 1)}]"
        ) from None


def weight_dtype(cfg: RecipeConfig) -> torch.dtype:
    """``model.dtype``, where ``auto`` follows ``train.precision``."""
    if cfg.model.dtype == "auto":
        return PRECISION_DTYPES[cfg.train.precision]
    return getattr(torch, cfg.model.dtype)


def hidden_size(cfg: RecipeConfig) -> int | None:
    """The LLM's hidden size when the model is a local checkpoint (for DeepSpeed's bucket sizes), else None."""
    if cfg.model.path is None or not (Path(cfg.model.path) / "config.json").is_file():
        return None  # loading the model reports a missing folder or config.json with what to do
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
    except OSError:  # no checkpoint there: loading the model reports it with a fix
        return None
    return getattr(getattr(config, "text_config", config), "hidden_size", None)


def build_base_model(cfg: RecipeConfig) -> tuple[nn.Module, Any]:
    """The model and processor named by the recipe, before any training set-up.

    A tiny model is built from ``model.tiny`` (its ``seed`` defaults to ``train.seed``); a checkpoint is read
    from ``model.path`` in ``model.dtype`` with the attention backend of ``model.attn_implementation``.
    """
    m = cfg.model
    if m.tiny is not None:
        model, processor = build_tiny_llava(**{"seed": cfg.train.seed, **m.tiny})
        from libra_train.models import pick_attn_implementation

        model.set_attn_implementation(pick_attn_implementation(m.attn_implementation))
        return model.to(weight_dtype(cfg)), processor
    return load_model_and_processor(
        m.path, family=m.family, torch_dtype=weight_dtype(cfg), attn_implementation=m.attn_implementation
    )


def set_trainable(model: nn.Module, cfg: RecipeConfig) -> None:
    """``requires_grad`` per part: vision tower (``model.freeze_vision_tower``), projector
    (``model.train_projector``), LLM (``model.train_llm``).

    The projector is matched first: the Qwen-VL patch mergers live inside the tower's module
    (``model.visual.merger``), so a vision-tower match alone would freeze them with the tower.
    """
    m = cfg.model
    for name, param in model.named_parameters():
        if is_projector(name):
            param.requires_grad_(m.train_projector)
        elif any(k in name for k in VISION_MARKERS):
            param.requires_grad_(not m.freeze_vision_tower)
        else:
            param.requires_grad_(m.train_llm)


def add_lora(model: nn.Module, cfg: RecipeConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the modules matching ``lora.target_regex`` (the LLM).

    peft freezes every base weight; the non-LoRA trainables chosen by `set_trainable` (projector, a vision
    tower that is not frozen) are switched back on afterwards.
    """
    from peft import LoraConfig, get_peft_model

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_regex,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_config)
    for name, param in peft_model.base_model.model.named_parameters():
        if name in trainable:
            param.requires_grad_(True)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5.23 renamed the method; both spellings work)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_model(model: nn.Module, cfg: RecipeConfig, libra: LibraConfig | None) -> nn.Module:
    """Trainable parts, Libra (``libra`` None or disabled: not applied at all), LoRA, checkpointing, no cache.

    Returns the model to train (the peft wrapper with LoRA, else ``model`` itself).
    """
    set_trainable(model, cfg)
    if libra is not None and libra.enabled:
        apply_libra(model, libra)
    model.config.use_cache = False  # a DynamicCache would be built in every training forward
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters count their full size."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
