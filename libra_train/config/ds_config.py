"""DeepSpeed configs: ``recipes/deepspeed/<name>.json`` with every ``"auto"`` filled from the recipe.

The JSON files describe ZeRO only; batch sizes, clipping and precision come from the recipe so that they
are set in one place. The bundled files carry no optimizer or scheduler: the training loop builds
``torch.optim.AdamW`` and its own ``LambdaLR`` and hands them to ``deepspeed.initialize`` (with
``offload_optimizer`` DeepSpeed insists on ``DeepSpeedCPUAdam`` instead: see ``offloads_optimizer``).
A user JSON may still have an optimizer section; its ``"auto"`` params are filled from ``train``.
"""

from __future__ import annotations

import json
from typing import Any

from libra_train.config.errors import RecipeError
from libra_train.config.paths import display_path, resolve_deepspeed
from libra_train.config.schema import RecipeConfig
from libra_train.config.validate import gradient_accumulation_steps, recipe_label

# ZeRO bucket sizes when the model's hidden size is not known: DeepSpeed's own defaults.
_REDUCE_BUCKET = 500_000_000
_PREFETCH_BUCKET = 50_000_000
_PERSISTENCE_THRESHOLD = 100_000
STEPS_PER_PRINT = 1_000_000_000  # our loop logs; keep DeepSpeed's own step log silent


def _auto_values(cfg: RecipeConfig, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    """The value of every ``"auto"`` this module knows, by dotted JSON path."""
    t = cfg.train
    try:
        accumulation = gradient_accumulation_steps(t, world_size)
    except RecipeError as exc:
        raise RecipeError(f"{recipe_label(cfg)}: {exc}") from None
    h = hidden_size
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": t.precision == "fp16",
        "steps_per_print": STEPS_PER_PRINT,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        # Hidden-size rules of transformers' DeepSpeed integration (HfTrainerDeepSpeedConfig).
        "zero_optimization.reduce_bucket_size": h * h if h else _REDUCE_BUCKET,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h) if h else _PREFETCH_BUCKET,
        "zero_optimization.stage3_param_persistence_threshold": 10 * h if h else _PERSISTENCE_THRESHOLD,
    }


def _fill(node: Any, values: dict[str, Any], prefix: str, unfilled: list[str]) -> Any:
    """A copy of ``node`` with ``"auto"`` replaced and ``_comment``-style keys dropped."""
    if isinstance(node, dict):
        return {
            k: _fill(v, values, f"{prefix}{k}.", unfilled)
            for k, v in node.items()
            if not str(k).startswith("_")
        }
    if isinstance(node, list):
        return [_fill(v, values, prefix, unfilled) for v in node]
    if node == "auto":
        key = prefix[:-1]
        if key not in values:
            unfilled.append(key)
        return values.get(key, node)
    return node


def deepspeed_config(cfg: RecipeConfig, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this recipe and world size, ready for ``deepspeed.initialize``.

    Args:
        cfg: the loaded recipe (``train.deepspeed`` names the JSON).
        world_size: number of data-parallel processes.
        hidden_size: the LLM's hidden size, if known, for the ZeRO bucket sizes (else DeepSpeed's defaults).

    Returns:
        A new dict without ``"auto"`` values or ``_comment`` keys.

    Raises:
        RecipeError: unknown JSON, invalid JSON, indivisible batch size, or an ``"auto"`` nobody fills.
    """
    path = resolve_deepspeed(cfg.train.deepspeed)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{display_path(path)}: invalid JSON: {exc}") from None
    unfilled: list[str] = []
    out = _fill(raw, _auto_values(cfg, world_size, hidden_size), "", unfilled)
    if unfilled:
        raise RecipeError(
            f'{display_path(path)}: cannot fill "auto" for {", ".join(unfilled)} from the recipe; give numbers '
            "(a scheduler section is not needed: the training loop builds its own LambdaLR)"
        )
    return out


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether the config offloads optimizer state to CPU; DeepSpeed then requires ``DeepSpeedCPUAdam``
    as the client optimizer (``zero_force_ds_cpu_optimizer``), not ``torch.optim.AdamW``."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)
