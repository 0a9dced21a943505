"""Checkpoints: atomic, resumable, loadable.

Layout of ``<output_dir>/checkpoint-<step>/``::

    global_step<step>/       DeepSpeed engine state: module, optimizer, lr scheduler, ZeRO shards (every rank)
    latest                   DeepSpeed's pointer to global_step<step> (what zero_to_fp32 reads)
    zero_to_fp32.py          DeepSpeed's consolidation script
    trainer_state.json       step, epoch, position in the epoch, batch layout, RNG files
    rng_state_<rank>.pth     Python / NumPy / torch RNG states of each rank
    recipe.yaml              the resolved recipe (demo data paths included)
    libra_config.json        the merge config, when Libra is enabled
    processor files          tokenizer + image processor (``AutoProcessor.from_pretrained`` reads them)
    adapter/                 LoRA only: the peft adapter (``PeftModel.from_pretrained``)
    non_lora_trainables.safetensors   LoRA only: the other trained weights (projector, ...), base-model names

Atomicity: everything is written into ``<output_dir>/.tmp-step-<step>``, which is renamed to
``checkpoint-<step>`` (``os.replace``) once complete; ``<output_dir>/latest`` (the name of the newest complete
checkpoint) is replaced last. A crash leaves at worst a ``.tmp-step-*`` folder that nothing reads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from libra_train.config import RecipeConfig, load_recipe, save_recipe
from libra_train.plugin import LibraConfig
from libra_train.training.dist import DistEnv, barrier

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
ADAPTER_DIR = "adapter"
NON_LORA = "non_lora_trainables.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer steps.

    Attributes:
        step: optimizer steps done.
        epoch: current epoch (0-based).
        micro_batch: micro-batches of this epoch consumed (on every rank).
        world_size, micro_batch_size, accumulation: the batch layout, which a resume must keep.
    """

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    accumulation: int = 1


def tag(step: int) -> str:
    """DeepSpeed's tag of a step (its default naming)."""
    return f"global_step{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters; under ZeRO-3 a collective (call on every rank)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def _save_lora(model: nn.Module, trainable: dict[str, torch.Tensor], directory: Path) -> None:
    """The peft adapter and the non-LoRA trainables (keys without peft's prefix)."""
    from safetensors.torch import save_file

    model.save_pretrained(str(directory / ADAPTER_DIR), state_dict=trainable)
    rest = {n.removeprefix(PEFT_PREFIX): t.contiguous() for n, t in trainable.items() if "lora_" not in n}
    save_file(rest, str(directory / NON_LORA))


def save_checkpoint(
    engine: Any,
    cfg: RecipeConfig,
    state: TrainState,
    processor: Any,
    libra: LibraConfig | None,
    dist: DistEnv,
) -> Path:
    """Write ``checkpoint-<state.step>`` (every rank calls this) and return its path."""
    out = Path(cfg.train.output_dir)
    tmp, final = out / f".tmp-step-{state.step}", out / f"checkpoint-{state.step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=tag(state.step))
    torch.save(rng_state(), tmp / f"rng_state_{dist.rank}.pth")
    trainable = gather_trainable(engine.module) if cfg.lora.enabled else None
    barrier()
    if dist.is_main:
        if trainable is not None:
            _save_lora(engine.module, trainable, tmp)
        save_recipe(cfg, tmp / "recipe.yaml")
        processor.save_pretrained(str(tmp))
        if libra is not None and libra.enabled:
            libra.save_pretrained(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(out, final.name)
        _prune(out, cfg.train.save_total_limit, keep=final)
    barrier()
    return final


def _write_latest(out: Path, name: str) -> None:
    tmp = out / f"{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, out / LATEST)


def _prune(out: Path, limit: int | None, keep: Path) -> None:
    """Delete the oldest ``checkpoint-*`` beyond ``limit`` (never ``keep``)."""
    if not limit:
        return
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for path in [p for p in found if p != keep][: max(0, len(found) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(cfg: RecipeConfig) -> Path | None:
    """The checkpoint ``train.resume`` names: None, ``latest`` (``<output_dir>/latest``) or a directory.

    ``latest`` with no checkpoint yet means a fresh start (so a restart script can always pass it).
    """
    resume = cfg.train.resume
    if resume is None:
        return None
    if resume == LATEST:
        pointer = Path(cfg.train.output_dir) / LATEST
        if not pointer.is_file():
            return None
        path = Path(cfg.train.output_dir) / pointer.read_text().strip()
    else:
        path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r}: {path} is not a complete checkpoint (no {TRAINER_STATE})"
        )
    return path


def restore(engine: Any, path: Path, expected: TrainState, dist: DistEnv) -> TrainState:
    """Load engine state, RNG states and the data position from checkpoint ``path``.

    Args:
        expected: the current run's batch layout; a resume with another one is refused, because the saved
            position in the epoch counts this layout's micro-batches.
    """
    state = TrainState(**json.loads((path / TRAINER_STATE).read_text()))
    layout = ("world_size", "micro_batch_size", "accumulation")
    if any(getattr(state, k) != getattr(expected, k) for k in layout):
        saved = {k: getattr(state, k) for k in layout}
        now = {k: getattr(expected, k) for k in layout}
        raise ValueError(
            f"{path} was saved with {saved}; this run has {now}: resume with the same batch layout"
        )
    loaded, _ = engine.load_checkpoint(str(path), tag=tag(state.step))
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {path / tag(state.step)}")
    set_rng_state(torch.load(path / f"rng_state_{dist.rank}.pth", weights_only=False))
    return state


def load_trained_model(
    checkpoint_dir: str | os.PathLike,
    *,
    apply_libra: bool = True,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any, LibraConfig | None]:
    """A consolidated model from a training checkpoint, for inference or export (no DeepSpeed engine).

    The model is rebuilt from the checkpoint's recipe (tiny model from its config, or ``model.path``), wrapped
    with the same LoRA adapters when the run used LoRA, and given the consolidated fp32 weights of the
    DeepSpeed checkpoint (ZeRO-2 or ZeRO-3, every shard merged by DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint``).

    Args:
        checkpoint_dir: a ``checkpoint-<step>`` folder.
        apply_libra: apply the checkpoint's ``libra_config.json`` to the model, as in training.
        merge_lora: merge LoRA adapters into the weights and return the plain transformers model.
        dtype: cast the weights (default: the recipe's ``model.dtype``).

    Returns:
        ``(model in eval mode, processor, LibraConfig or None)``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoProcessor

    from libra_train.plugin import apply_libra as attach_libra
    from libra_train.training.setup import add_lora, build_base_model

    path = Path(checkpoint_dir)
    cfg = load_recipe(path / "recipe.yaml", ["train.resume=null"])
    model, _ = build_base_model(cfg)
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    libra = LibraConfig.from_pretrained(path) if (path / "libra_config.json").is_file() else None
    if libra is not None and apply_libra:
        attach_libra(model, libra)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path))
    model.load_state_dict(state_dict, strict=True)
    if cfg.lora.enabled and merge_lora:
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = True
    return model.eval(), processor, libra
