"""Optimizer and learning-rate schedule, built by us and handed to ``deepspeed.initialize``.

The DeepSpeed JSON carries no optimizer or scheduler (``libra_train.config.ds_config``): torch ``AdamW``
(or ``DeepSpeedCPUAdam`` when the config offloads optimizer state, which DeepSpeed requires) and a
``LambdaLR`` with linear warm-up and cosine / linear / constant decay, the formulas of transformers'
``get_cosine_schedule_with_warmup`` and friends (HF Trainer's behaviour, which LLaVA's recipes assume).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Qwen3-VL: `visual.merger` projects the tower's output, `visual.deepstack_merger_list` its DeepStack features.
PROJECTOR_MARKERS = ("multi_modal_projector", "mm_projector", "visual.merger", "visual.deepstack_merger_list")


def is_projector(name: str) -> bool:
    """Whether a parameter belongs to the vision-language projector (LLaVA, LLaVA-NeXT, OneVision: the
    multimodal projector; Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the patch mergers, which sit inside ``model.visual``)."""
    return any(marker in name for marker in PROJECTOR_MARKERS)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, projector_lr: float | None = None
) -> list[dict]:
    """Trainable parameters in AdamW groups.

    Biases and norm weights (1-D tensors) get no weight decay (HF Trainer's rule). With ``projector_lr``
    the projector's parameters form their own groups at that learning rate (LLaVA's ``mm_projector_lr``).
    Empty groups are dropped.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and not name.endswith(".bias")
        projector = projector_lr is not None and is_projector(name)
        groups.setdefault((projector, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": projector_lr if projector else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": ("projector" if projector else "model") + ("" if decay else "_no_decay"),
        }
        for (projector, decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    projector_lr: float | None = None,
    cpu_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8) over `param_groups`; ``DeepSpeedCPUAdam`` with ``cpu_adam``."""
    groups = param_groups(model, lr, weight_decay, projector_lr)
    if not groups:
        raise ValueError("the model has no trainable parameter (check model.train_* and lora.enabled)")
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based, as LambdaLR counts)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1) if warmup_steps else 1.0
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine, half a period

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, scheduler: str, warmup_ratio: float, total_steps: int
) -> LambdaLR:
    """``LambdaLR`` with ``ceil(warmup_ratio * total_steps)`` warm-up steps (HF's rounding).

    Warm-up starts above zero (``1 / (warmup + 1)`` of the peak), so the very first update is not wasted,
    unlike HF's schedule that begins at exactly 0.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lr_lambda(scheduler, warmup, total_steps))
