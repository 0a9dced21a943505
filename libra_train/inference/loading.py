"""Load a saved model back with the compression it was trained with: ``from_pretrained`` plus its merge config.

``load(dir)`` takes any of the directories a Libra model is saved to:

- an export (``libra_train.export``): a transformers model directory (a LoRA adapter beside the base weights
  when it was not merged, which ``from_pretrained`` picks up by itself) with the merge config twice,
  ``libra_config.json`` and the ``libra_merging`` key of ``config.json``; both must agree, either is enough;
- a ``save_pretrained`` / ``Trainer.save_model`` / HF Trainer ``checkpoint-N`` directory of a model with Libra
  applied (``config.json`` carries ``libra_merging``: ``libra_train.plugin.persist``);
- a peft adapter directory (``adapter_config.json``, no ``config.json``): the base model is the directory its
  ``base_model_name_or_path`` names (or ``base=``), the merge config is the adapter's ``libra_config.json``
  (``save_merge_config``; the trainers in ``libra_train.integrations`` write it), else the base's.

``training_recipe.yaml``, when present, names the chat template the model was trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from libra_train.plugin.config import CONFIG_NAME, LibraConfig
from libra_train.plugin.persist import CONFIG_KEY, clear_merge_config

__all__ = [
    "ADAPTER_CONFIG",
    "CONFIG_KEY",
    "PROCESSOR_FILES",
    "RECIPE_FILE",
    "adapter_base",
    "load",
    "model_config_json",
    "parse_dtype",
    "prompt_template",
    "read_merge_config",
    "read_recipe",
    "resolve_libra",
]

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes (no config.json beside it)
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
)
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


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A peft adapter saved on its own: ``adapter_config.json`` without a ``config.json`` beside it."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model directory of the adapter in ``path``: ``base``, else its ``base_model_name_or_path``."""
    path = Path(path)
    if base is None:
        base = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path): pass base=DIR "
                "(the model directory the adapter was trained on)"
            )
    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"the base model of the adapter in {path}, {base}, is not a local model directory (no config.json); "
            "pass base=DIR with the model the adapter was trained on (no hub download at run time)"
        )
    return base


def read_merge_config(path: str | os.PathLike) -> LibraConfig | None:
    """The merge config a saved model carries, or None when it has none.

    Reads ``libra_config.json`` and the ``libra_merging`` key of ``config.json``; for a peft adapter directory
    (no ``config.json``), its ``libra_config.json``, else its base model's merge config.

    Raises:
        ValueError: an invalid config, or ``libra_config.json`` and ``config.json["libra_merging"]`` disagree.
    """
    path = Path(path)
    file = path / CONFIG_NAME
    saved = LibraConfig.from_pretrained(file) if file.is_file() else None
    if is_adapter_dir(path):
        return saved if saved is not None else read_merge_config(adapter_base(path))
    from_config = model_config_json(path).get(CONFIG_KEY)
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
                "libra_config.json. A peft adapter saved by PeftModel.save_pretrained or a plain Trainer carries "
                "none: write it with libra_train.save_merge_config(model, dir), or train with "
                "libra_train.integrations LibraTrainer / LibraSFTTrainer, which do"
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
    base: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Load a saved model with plain ``from_pretrained`` (local files only) and apply its compression.

    Args:
        path: an export (``scripts/export.py``), a ``save_pretrained`` / Trainer checkpoint directory, a peft
            adapter directory, or any local transformers VLM directory (see the module doc).
        libra: None = the saved merge config (an error when there is none); ``"off"`` = no compression (for
            comparison); a ``LibraConfig``; a path to a ``libra_config.json``; or a dict of overrides on the
            saved config, e.g. ``{"ratio": 0.8}``.
        dtype: weight dtype (None = the saved one).
        attn_implementation: ``auto`` (flash_attention_2 on CUDA with flash-attn, else sdpa), ``sdpa``,
            ``eager``.
        device: move the model there (e.g. ``"cuda"``); None leaves it on the CPU.
        base: for a peft adapter directory, the base model directory (default: the adapter's
            ``base_model_name_or_path``).

    Returns:
        ``(model, processor)``, the model in eval mode with Libra applied unless it is off (a ``PeftModel`` for
        an adapter directory). ``model.config.libra_merging`` is the applied merge config (absent when off).

    Raises:
        FileNotFoundError: no such directory, no config.json (nor an adapter), no processor files.
        ValueError: no merge config (and no ``libra`` given), an invalid one, or one that does not fit the
            model (a compression point beyond its depth).
    """
    from libra_train.models import MODEL_FAMILIES, load_model_and_processor
    from libra_train.plugin import apply_libra

    path = Path(path)
    adapter = path if is_adapter_dir(path) else None
    model_dir = adapter_base(path, base) if adapter is not None else path
    config = model_config_json(model_dir)
    family = config.get("model_type")
    if family not in MODEL_FAMILIES:
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type {family!r} is not one of {sorted(MODEL_FAMILIES)}"
        )
    processor_dir = next((d for d in (path, model_dir) if _has_processor(d)), None)
    if processor_dir is None:
        raise FileNotFoundError(
            f"{path} has no processor/tokenizer files (one of {PROCESSOR_FILES}): give the Trainer "
            "processing_class=processor so that its saves include them, or processor.save_pretrained(dir)"
        )
    cfg = resolve_libra(read_merge_config(path), libra, path)
    num_layers = _num_layers(config)
    if cfg is not None and num_layers is not None:
        try:
            cfg.check_num_layers(num_layers)  # before reading gigabytes of weights
        except ValueError as err:
            raise ValueError(f"the merge config does not fit the model in {path}: {err}") from err
    model, processor = load_model_and_processor(
        model_dir, family=family, torch_dtype=parse_dtype(dtype), attn_implementation=attn_implementation
    )
    if processor_dir != model_dir:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
    if device is not None:
        model.to(device)
    if cfg is not None:
        apply_libra(model, cfg)
    else:
        clear_merge_config(model)  # the config says what the model does: nothing here
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)  # after apply_libra, as in training
    return model.eval(), processor


def _has_processor(path: Path) -> bool:
    return any((path / name).is_file() for name in PROCESSOR_FILES)
