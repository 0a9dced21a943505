"""Checkpoint -> a standalone model directory that carries the compression it was trained with.

``export_checkpoint(ckpt, out)`` (CLI: ``scripts/export.py``) writes a standard transformers directory:
safetensors weights, ``config.json``, the processor / tokenizer, and for LoRA either the merged weights
(``merge_lora=True``) or the base weights with the adapter beside them (``adapter_config.json`` +
``adapter_model.safetensors``; transformers' ``from_pretrained`` loads both). On top: the merge config as
``libra_config.json`` and under the ``libra_merging`` key of ``config.json``, the training recipe as
``training_recipe.yaml``, and a ``README.md`` card (merge config, recipe, visual tokens per layer, FLOPs).

Checkpoints: a training checkpoint with DeepSpeed state (ZeRO-2/3, full or LoRA) is consolidated by
``libra_train.training.checkpoint.load_trained_model``; a plain transformers directory (config + weights,
optionally a peft adapter in it or in ``adapter/``, and a ``libra_config.json``) is read directly.

The merge config comes from, in order: the ``libra_config`` argument, the checkpoint's ``libra_config.json``,
or, for a full-token run (its recipe says ``libra.enabled: false``), that recipe's ``libra`` section (recorded
disabled). Anything else is an error: an export without a merge config would silently run uncompressed.

Nothing is written half-way: the export is built in a hidden directory next to ``out``
(``.<name>.partial-<pid>-<id>``) and renamed; an export into a non-empty ``out`` first moves the old one aside
(``.<name>.old-<pid>-<id>``). Such folders left by a killed export are cleaned up by the next export to the same
``out`` (`clean_stale`). The export gets ordinary permissions (``0666 & ~umask`` for files, ``0777 & ~umask`` for
folders), not the private 0700 / 0600 of temporary files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from libra_train.inference.card import model_card
from libra_train.inference.loading import (
    CONFIG_KEY,
    PROCESSOR_FILES,
    RECIPE_FILE,
    parse_dtype,
    read_merge_config,
)
from libra_train.plugin.config import CONFIG_NAME, LibraConfig

__all__ = [
    "export_checkpoint",
    "find_recipe",
    "is_deepspeed_checkpoint",
    "load_checkpoint",
    "model_card",
    "resolve_checkpoint",
]

RECIPE_NAMES = ("recipe.yaml", RECIPE_FILE, "recipe.yml")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# A leftover without its writer's pid in the name (written by older versions) counts as stale after this long.
STALE_AFTER_S = 3600
logger = logging.getLogger(__name__)


def is_deepspeed_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds DeepSpeed engine state (a ``latest`` tag file or ``global_step*`` folders)."""
    return (path / "latest").is_file() or any(p.is_dir() for p in path.glob("global_step*"))


def find_recipe(checkpoint: Path) -> Path | None:
    """The resolved recipe YAML saved in a checkpoint (``recipe.yaml`` or any YAML with a ``recipe_name``)."""
    candidates = [checkpoint / name for name in RECIPE_NAMES] + sorted(checkpoint.glob("*.y*ml"))
    for file in candidates:
        if file.is_file():
            try:
                data = yaml.safe_load(file.read_text())
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and "recipe_name" in data:
                return file
    return None


def _base_view(checkpoint: Path, scratch: Path) -> Path:
    """A directory of links to ``checkpoint``'s files minus the adapter's, so ``from_pretrained`` loads the
    base alone (it loads an adapter found beside the weights by itself)."""
    for file in checkpoint.iterdir():
        if file.is_file() and file.name not in ADAPTER_FILES:
            (scratch / file.name).symlink_to(file.resolve())
    return scratch


def _load_hf_directory(checkpoint: Path, dtype: Any = None) -> tuple[Any, Any, LibraConfig | None]:
    from libra_train.inference.loading import model_config_json
    from libra_train.models import load_model_and_processor

    family = model_config_json(checkpoint).get("model_type")
    if not any((checkpoint / name).is_file() for name in PROCESSOR_FILES):
        raise FileNotFoundError(f"{checkpoint} has no processor/tokenizer files (one of {PROCESSOR_FILES})")
    adapter = next(
        (d for d in (checkpoint, checkpoint / "adapter") if (d / "adapter_config.json").is_file()), None
    )
    with tempfile.TemporaryDirectory(prefix="libra-base-") as scratch:
        base = _base_view(checkpoint, Path(scratch)) if adapter == checkpoint else checkpoint
        model, processor = load_model_and_processor(
            base, family=family, torch_dtype=dtype, attn_implementation="sdpa"
        )
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, processor, read_merge_config(checkpoint)  # libra_config.json or config.json's libra_merging


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run's ``output_dir`` the checkpoint its ``latest`` pointer names (the newest
    complete one when ``latest`` is missing or names an incomplete checkpoint: those are never exported)."""
    from libra_train.training.output_dir import (
        checkpoint_problem,
        checkpoints,
        newest_complete,
        read_latest,
        step_of,
    )

    path = Path(path)
    pointer = read_latest(path)
    if (
        pointer is not None and step_of(pointer) is None
    ):  # DeepSpeed's own `latest` (global_stepN): a checkpoint
        return path
    if pointer is not None and checkpoint_problem(pointer) is None:
        return pointer
    if pointer is not None or checkpoints(path):  # a run's folder
        newest = newest_complete(path)
        if newest is None:
            found = ", ".join(f"{p.name}: {checkpoint_problem(p)}" for p in checkpoints(path)) or "none"
            raise FileNotFoundError(f"{path} holds no complete checkpoint to export ({found})")
        return newest
    return path


def load_checkpoint(
    checkpoint: str | os.PathLike, *, dtype: Any = None
) -> tuple[Any, Any, LibraConfig | None]:
    """``(model, processor, merge config or None)`` of a training checkpoint or a transformers directory.

    The model comes without Libra and, for LoRA, as a peft model with its adapter unmerged.

    Raises:
        FileNotFoundError: no such directory, or neither DeepSpeed state nor ``config.json`` in it.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    if is_deepspeed_checkpoint(checkpoint):
        from libra_train.training.checkpoint import load_trained_model

        if not (checkpoint / "recipe.yaml").is_file():
            raise FileNotFoundError(
                f"{checkpoint / 'recipe.yaml'} not found: an incomplete training checkpoint?"
            )
        return load_trained_model(checkpoint, apply_libra=False, merge_lora=False, dtype=dtype)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a checkpoint: no DeepSpeed state ('latest', global_step*/) "
            "and no config.json"
        )
    return _load_hf_directory(checkpoint, dtype)


def _merge_config(
    checkpoint: Path, explicit: Any, found: LibraConfig | None, recipe: dict | None
) -> LibraConfig:
    if explicit is not None:
        return explicit if isinstance(explicit, LibraConfig) else LibraConfig.from_pretrained(explicit)
    if found is not None:
        return found
    section = (recipe or {}).get("libra") or {}
    if section and not section.get("enabled", True):
        return LibraConfig.from_dict(section)  # a full-token run: its (disabled) config is the record
    raise ValueError(
        f"checkpoint {checkpoint} has no merge config ({CONFIG_NAME}) and its recipe does not say "
        "compression was off; pass the config it was trained with: libra_config=... "
        "(CLI: --libra-config FILE)"
    )


def _strip_libra(model: Any) -> None:
    from libra_train.plugin import remove_libra
    from libra_train.plugin.apply import RUNTIME_ATTR

    for module in list(model.modules()):
        if RUNTIME_ATTR in vars(module):
            remove_libra(module)


def _check_out(checkpoint: Path, out: Path, overwrite: bool) -> None:
    ckpt, target = checkpoint.resolve(), out.resolve()
    if target == ckpt or target in ckpt.parents:
        raise ValueError(
            f"--out {out} would replace the checkpoint {checkpoint} itself; choose another directory"
        )
    if out.is_file():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
        )


def _side_name(out: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-<id>`` next to ``out``: the pid tells a leftover from a folder still in use."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_alive(folder: Path) -> bool:
    """Whether the export process named in a side folder's name may still be writing it."""
    parts = folder.name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - folder.stat().st_mtime < STALE_AFTER_S


def clean_stale(out: Path) -> list[str]:
    """Remove what killed exports to ``out`` left next to it; put back an old export that was moved aside
    when the new one never arrived. Returns what was done (also logged)."""
    notes = []
    for kind in ("old", "partial"):  # "old" first: it may have to become ``out`` again
        for folder in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            if not folder.is_dir() or _writer_alive(folder):
                continue
            if kind == "old" and not out.exists():
                os.replace(folder, out)
                notes.append(f"restored {out} from {folder.name}, left by an interrupted export")
            else:
                shutil.rmtree(folder, ignore_errors=True)
                notes.append(f"removed {folder.name}, left by an interrupted export")
    for note in notes:
        logger.warning(note)
    return notes


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it; ``os.umask`` can only swap it)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _ordinary_permissions(folder: Path) -> None:
    """``0666 & ~umask`` for files and ``0777 & ~umask`` for folders, as ``open`` / ``mkdir`` make them: the
    weights transformers writes through a private temporary file arrive as 0600, unreadable to other users."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _commit(tmp: Path, out: Path) -> None:
    backup = _side_name(out, "old") if out.exists() else None
    if backup is not None:
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except OSError:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup)


def _write(tmp: Path, model: Any, processor: Any, merge_lora: bool, out: Path) -> str:
    """Weights (+ adapter) and processor into ``tmp``; returns the card's LoRA line."""
    from peft import PeftModel

    lora = "none"
    if isinstance(model, PeftModel):
        if merge_lora:
            model, lora = model.merge_and_unload(), "merged into the weights"
        else:
            model.save_pretrained(tmp)
            adapter_config = tmp / "adapter_config.json"
            data = json.loads(adapter_config.read_text())
            data["base_model_name_or_path"] = str(out.resolve())  # the base is the export itself
            adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            model, lora = model.unload(), "adapter beside the base weights (`from_pretrained` applies it)"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return lora


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    merge_lora: bool = False,
    overwrite: bool = False,
    libra_config: LibraConfig | str | os.PathLike | None = None,
    n_visual: int | None = None,
    dtype: Any = None,
) -> Path:
    """Export a checkpoint to ``out`` (see the module doc) and return ``out``.

    Args:
        checkpoint: ``output_dir/checkpoint-N`` of a training run, or a plain transformers model directory.
        out: the export directory; must not exist or be empty unless ``overwrite``.
        merge_lora: merge a LoRA adapter into the weights (else it is saved beside the base); no effect
            on a checkpoint without LoRA.
        overwrite: replace an existing non-empty ``out`` (only once the new export is complete).
        libra_config: the merge config, for a checkpoint that lacks one (a ``LibraConfig`` or a JSON path).
        n_visual: visual tokens per image for the card's table (default: the config's ``image_seq_length``).
        dtype: cast the weights (``torch.bfloat16`` or ``"bfloat16"``; default: as loaded, fp32 from ZeRO).

    Raises:
        FileNotFoundError: missing checkpoint or files in it.
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
        ValueError: no merge config, or one that does not fit the model.
    """
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    _check_out(checkpoint, out, overwrite)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    dtype = parse_dtype(dtype)
    recipe_file = find_recipe(checkpoint)
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file else None
    model, processor, found = load_checkpoint(checkpoint, dtype=dtype)
    cfg = _merge_config(checkpoint, libra_config, found, recipe)
    model_config = model.config  # a peft wrapper forwards to the base model
    try:
        cfg.check_num_layers(model_config.get_text_config().num_hidden_layers)
    except ValueError as err:
        raise ValueError(f"the merge config does not fit the model of {checkpoint}: {err}") from err
    _strip_libra(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = _side_name(out, "partial")
    tmp.mkdir()
    try:
        lora = _write(tmp, model, processor, merge_lora, out)
        config_file = tmp / "config.json"
        data = json.loads(config_file.read_text())
        data[CONFIG_KEY] = cfg.to_dict()
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        cfg.save_pretrained(tmp)
        if recipe_file is not None:
            shutil.copyfile(recipe_file, tmp / RECIPE_FILE)
        card = model_card(out.name, cfg, model_config, recipe=recipe, lora=lora, n_visual=n_visual)
        (tmp / "README.md").write_text(card)
        if read_merge_config(tmp) != cfg:  # what a loader will read back
            raise RuntimeError(f"the merge config written to {tmp} does not read back as {cfg}")
        _ordinary_permissions(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
