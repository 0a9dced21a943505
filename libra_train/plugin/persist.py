"""The merge config rides on the model's own config, so every save path that writes ``config.json`` carries it.

``apply_libra`` records the :class:`LibraConfig` as a plain dict under the ``libra_merging`` key of
``model.config`` (the key exports already write); ``remove_libra`` deletes it. transformers serialises unknown
config attributes, so ``PreTrainedModel.save_pretrained``, ``Trainer.save_model``, the Trainer's
``checkpoint-N/`` folders and a merged peft model (``merge_and_unload()`` returns the patched base model) all
write it into ``config.json`` with no extra call, and ``from_pretrained`` reads it back onto the config.

A peft adapter is the exception: ``PeftModel.save_pretrained`` writes ``adapter_config.json`` and the adapter
weights, never the base model's ``config.json``, and peft offers no hook to add a file (``LoraConfig`` drops
unknown keys). :func:`save_merge_config` writes ``libra_config.json`` beside the adapter; the trainers in
``libra_train.integrations`` call it on every save, and ``libra_train.load(adapter_dir)`` reads it.

What plain ``from_pretrained`` of such a directory gives: the standard, *uncompressed* model (transformers
cannot apply a plug-in by itself) with ``model.config.libra_merging`` set; ``apply_libra(model)`` without a
config then applies exactly the recorded one, and ``libra_train.load(dir)`` does both steps.

The record is a snapshot taken by ``apply_libra``: after changing a runtime's config in place, call
:func:`record_merge_config` again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from libra_train.plugin.config import LibraConfig

CONFIG_KEY = "libra_merging"  # the merge config inside config.json (and on model.config)


def _model_config(model: nn.Module) -> Any:
    """The config object ``save_pretrained`` writes: the model's own (a peft wrapper forwards to its base)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `.config`: Libra records its merge config there")
    return config


def record_merge_config(model: nn.Module, config: LibraConfig) -> None:
    """Write ``config`` onto ``model.config`` under ``libra_merging`` (a plain dict, JSON as it is).

    ``apply_libra`` records its runtime's config, the family's default ``unit`` resolved, so that a reload
    applies exactly the same compression even if the default changes.
    """
    setattr(_model_config(model), CONFIG_KEY, config.to_dict())


def clear_merge_config(model: nn.Module) -> None:
    """Remove the record of :func:`record_merge_config` (no-op when there is none)."""
    config = getattr(model, "config", None)
    if config is not None and CONFIG_KEY in vars(config):
        delattr(config, CONFIG_KEY)


def recorded_merge_config(model_or_config: Any) -> LibraConfig | None:
    """The merge config recorded on a model (or on its config), or None.

    Raises:
        ValueError: the recorded value is not a valid merge config.
    """
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return None
    try:
        return LibraConfig.from_saved(dict(data))  # a record older than `unit` reads as unit="sample"
    except (TypeError, ValueError) as err:
        raise ValueError(f"model config key {CONFIG_KEY!r}: {err}") from err


def save_merge_config(model: nn.Module, save_directory: str | os.PathLike) -> Path | None:
    """Write the model's recorded merge config as ``libra_config.json`` into ``save_directory``.

    Call it after ``PeftModel.save_pretrained(save_directory)``, whose adapter files do not include the base
    model's ``config.json`` (a full-model save needs no extra call). A model without Libra writes nothing.

    Returns:
        The written file, or None when the model records no merge config.
    """
    config = recorded_merge_config(model)
    return None if config is None else config.save_pretrained(save_directory)
