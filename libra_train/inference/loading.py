"""Load an export (``libra_train.export``) back: plain ``from_pretrained`` plus the merge config it carries.

An export directory is a standard transformers model directory (config, safetensors weights, processor; a
LoRA adapter beside the base weights when it was not merged, which ``from_pretrained`` picks up by itself)
plus the merge config twice: ``libra_config.json`` and the ``libra_merging`` key of ``config.json``. Both must
agree; either alone is enough. ``training_recipe.yaml``, when present, names the chat template the model was
trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from libra_train.plugin.config import CONFIG_NAME, LibraConfig

__all__ = [
    "CONFIG_KEY",
    "RECIPE_FILE",
    "load",
    "model_config_json",
    "parse_dtype",
    "prompt_template",
    "read_merge_config",
    "read_recipe",
    "resolve_libra",
]

CONFIG_KEY = "libra_merging"  # the merge config inside config.json
RECIPE_FILE = "training_recipe.yaml"  # the resolved training recipe, copied from the checkpoint


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def model_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model directory, with errors that name the missing file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a transformers model directory (or export)")
    return _read_json(file)


def read_merge_config(path: str | os.PathLike) -> LibraConfig | None:
    """The merge config an export carries, or None when it has none.

    Raises:
        ValueError: an invalid config, or ``libra_config.json`` and ``config.json["libra_merging"]`` disagree.
    """
    path = Path(path)
    from_config = model_config_json(path).get(CONFIG_KEY)
    file = path / CONFIG_NAME
    saved = LibraConfig.from_pretrained(file) if file.is_file() else None
    if from_config is not None:
        try:
            embedded = LibraConfig.from_saved(from_config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path / 'config.json'}, key {CONFIG_KEY!r}: {err}") from err
        if saved is not None and saved.to_dict() != embedded.to_dict():
            raise ValueError(
                f"{file} and the {CONFIG_KEY!r} key of {path / 'config.json'} disagree "
                f"({saved.to_dict()} vs {embedded.to_dict()}); fix or delete one of them"
            )
        saved = saved or embedded
    return saved


def resolve_libra(saved: LibraConfig | None, libra: Any, where: str | os.PathLike) -> LibraConfig | None:
    """The merge config to apply (None: no compression) from the export's and the caller's choice.

    Args:
        saved: the export's config (``read_merge_config``), or None.
        libra: None (the export's), ``"off"`` (none), a ``LibraConfig``, a path to a ``libra_config.json`` (or
            its directory), or a dict of field overrides on the export's config (a full config without one).
        where: the export, for messages.
    """
    if libra is None:
        if saved is None:
            raise ValueError(
                f"{where} has no merge config ({CONFIG_NAME} or {CONFIG_KEY!r} in config.json): pass "
                "libra='off' (CLI: --libra off) to run it without compression, or an explicit LibraConfig / "
                "libra_config.json"
            )
        return saved
    if isinstance(libra, LibraConfig):
        return libra
    if isinstance(libra, dict):
        data = {**(saved.to_dict() if saved is not None else {}), **libra}
        try:
            return LibraConfig.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"merge config overrides {libra} on {where}: {err}") from err
    if isinstance(libra, (str, os.PathLike)):
        if str(libra) == "off":
            return None
        return LibraConfig.from_pretrained(libra)
    raise TypeError(f"libra must be None, 'off', a LibraConfig, a dict or a path, got {type(libra).__name__}")


def parse_dtype(dtype: Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` or None passes through."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    import torch

    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16")
    return value


def _num_layers(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or config
    return text.get("num_hidden_layers")


def read_recipe(path: str | os.PathLike) -> dict[str, Any] | None:
    """The training recipe copied into an export (``training_recipe.yaml``), or None."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{file} is not valid YAML: {err}") from err
    return data if isinstance(data, dict) else None


def prompt_template(path: str | os.PathLike) -> str:
    """The chat template to prompt an export with: the training recipe's ``data.template`` when the export has
    one, else ``vicuna_v1`` for LLaVA-1.5-style models and the processor's own ``chat_template`` otherwise."""
    recipe = read_recipe(path) or {}
    template = (recipe.get("data") or {}).get("template")
    if template:
        return template
    return "vicuna_v1" if model_config_json(path).get("model_type") == "llava" else "chat_template"


def load(
    path: str | os.PathLike,
    *,
    libra: Any = None,
    dtype: Any = None,
    attn_implementation: str = "auto",
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load an export with plain ``from_pretrained`` (local files only) and apply its compression.

    Args:
        path: the export directory (``scripts/export.py``), or any local transformers VLM directory.
        libra: None = the export's merge config (an error when it has none); ``"off"`` = no compression (for
            comparison); a ``LibraConfig``; a path to a ``libra_config.json``; or a dict of overrides on the
            export's config, e.g. ``{"ratio": 0.8}``.
        dtype: weight dtype (None = the saved one).
        attn_implementation: ``auto`` (flash_attention_2 on CUDA with flash-attn, else sdpa), ``sdpa``,
            ``eager``.
        device: move the model there (e.g. ``"cuda"``); None leaves it on the CPU.

    Returns:
        ``(model, processor)``, the model in eval mode with Libra applied unless it is off.

    Raises:
        FileNotFoundError: no such directory or no config.json.
        ValueError: no merge config (and no ``libra`` given), an invalid one, or one that does not fit the
            model (a compression point beyond its depth).
    """
    from libra_train.models import MODEL_FAMILIES, load_model_and_processor
    from libra_train.plugin import apply_libra

    path = Path(path)
    config = model_config_json(path)
    family = config.get("model_type")
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"{path / 'config.json'}: model_type {family!r} is not one of {sorted(MODEL_FAMILIES)}"
        )
    cfg = resolve_libra(read_merge_config(path), libra, path)
    num_layers = _num_layers(config)
    if cfg is not None and num_layers is not None:
        try:
            cfg.check_num_layers(num_layers)  # before reading gigabytes of weights
        except ValueError as err:
            raise ValueError(f"the merge config does not fit the model in {path}: {err}") from err
    model, processor = load_model_and_processor(
        path, family=family, torch_dtype=parse_dtype(dtype), attn_implementation=attn_implementation
    )
    model.eval()
    if device is not None:
        model.to(device)
    if cfg is not None:
        apply_libra(model, cfg)
    return model, processor
