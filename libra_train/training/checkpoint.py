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

``trainer_state.json`` also records the run's structure (ZeRO stage, precision, trainable parameter shapes: a
resume must match them), the history of resumes with changed recipe values, and the name and size of every
file of the folder (how a complete checkpoint is told from a half-written or half-deleted one).

Atomicity: everything is written into ``<output_dir>/.tmp-step-<step>``, which becomes ``checkpoint-<step>``
by a rename once complete; ``latest`` (the name of the newest complete checkpoint) is replaced after that, and
checkpoints are deleted only after that. What each phase leaves behind if the process dies there, and how the
next start cleans it up: `libra_train.training.output_dir`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from libra_train.config import RecipeConfig, load_recipe, save_recipe
from libra_train.plugin import LibraConfig
from libra_train.training import faults
from libra_train.training.dist import DistEnv, barrier, on_main
from libra_train.training.output_dir import (
    LATEST,
    TMP_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_bytes,
    checkpoint_problem,
    checkpoints,
    delete_checkpoint,
    manifest,
    move_into_place,
    newest_complete,
    prune,
    read_latest,
    read_state,
    space_problem,
    write_failure,
    write_latest,
)
from libra_train.training.resume import ResumeError, structure_problems, trainable_shapes

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


def estimated_bytes(model: nn.Module, previous: Path | None = None) -> int:
    """About how much disk a checkpoint of ``model`` takes: the size of ``previous`` (the same run's last
    checkpoint) when there is one, else the weights in their dtype plus 12 bytes per trainable parameter
    (DeepSpeed's fp32 master copy and the two AdamW moments), plus 5%."""
    if previous is not None and checkpoint_problem(previous) is None:
        return checkpoint_bytes(previous)
    weights = trainable = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        weights += n * param.element_size()
        trainable += 12 * n if param.requires_grad else 0
    return int(1.05 * (weights + trainable))


def check_space(engine: Any, cfg: RecipeConfig, what: str) -> int:
    """Refuse to write ``what`` when it does not fit on the output disk (rank 0 measures, every rank raises);
    returns the estimate in bytes.

    Raises:
        CheckpointError: with the path, the space needed and the space free.
    """
    out = Path(cfg.train.output_dir)

    def measure() -> int:
        found = checkpoints(out)
        needed = estimated_bytes(engine.module, found[-1] if found else None)
        problem = space_problem(out, needed, what)
        if problem is not None:
            raise CheckpointError(problem)
        return needed

    return on_main(measure)


def save_checkpoint(
    engine: Any,
    cfg: RecipeConfig,
    state: TrainState,
    processor: Any,
    libra: LibraConfig | None,
    dist: DistEnv,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<state.step>`` (every rank calls this) and return its path.

    Order (see `libra_train.training.output_dir` for what each phase leaves behind if the process dies there):
    check the free space; every rank writes its DeepSpeed shards and RNG state into ``.tmp-step-<step>``; rank 0
    adds the recipe, processor, merge config and LoRA files, then ``trainer_state.json`` with the list of every
    file (this makes the folder complete); the folder is renamed to ``checkpoint-<step>`` (exchanged with the
    old one when the step was saved before), ``latest`` is pointed at it, and only then the replaced and the
    pruned checkpoints are deleted.

    Args:
        meta: extra ``trainer_state.json`` entries (structure of the run, resume history).

    Raises:
        CheckpointError: not enough free space (nothing written), or the write failed (the partial folder is
            removed, ``latest`` is unchanged).
    """
    out = Path(cfg.train.output_dir)
    tmp, final = out / f"{TMP_PREFIX}{state.step}", out / f"checkpoint-{state.step}"
    needed = check_space(engine, cfg, final.name)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        faults.point("save:begin", step=state.step, path=tmp)
        engine.save_checkpoint(str(tmp), tag=tag(state.step))
        torch.save(rng_state(), tmp / f"rng_state_{dist.rank}.pth")
        trainable = gather_trainable(engine.module) if cfg.lora.enabled else None
        faults.point("save:engine", step=state.step)
        barrier()
        if dist.is_main:
            if trainable is not None:
                _save_lora(engine.module, trainable, tmp)
            save_recipe(cfg, tmp / "recipe.yaml")
            processor.save_pretrained(str(tmp))
            if libra is not None and libra.enabled:
                libra.save_pretrained(tmp)
            record = {**asdict(state), **(meta or {}), "files": manifest(tmp)}
            (tmp / TRAINER_STATE).write_text(
                json.dumps(record, indent=2) + "\n"
            )  # last: the folder is complete
    except Exception as exc:
        free = shutil.disk_usage(out).free
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(exc, out, final.name, needed, free) from exc
    if dist.is_main:
        faults.point("save:written", step=state.step)
        replaced = move_into_place(tmp, final)
        faults.point("save:swapped", step=state.step)
        write_latest(out, final.name)
        faults.point("save:latest", step=state.step)
        if replaced is not None:
            delete_checkpoint(replaced)
        prune(out, cfg.train.save_total_limit, keep=final)
    barrier()
    return final


def resolve_resume(cfg: RecipeConfig) -> Path | None:
    """The complete checkpoint ``train.resume`` names: None, ``latest`` or a checkpoint directory.

    ``latest`` is ``<output_dir>/latest``; without that file (or when it names a checkpoint that is not
    complete) the newest complete ``checkpoint-*`` is taken, and with no checkpoint at all the run starts
    fresh (so a restart script can always pass it).

    Raises:
        ResumeError: an explicit checkpoint that is not complete (half-deleted, interrupted save).
    """
    resume = cfg.train.resume
    if resume is None:
        return None
    out = Path(cfg.train.output_dir)
    if resume == LATEST:
        pointer = read_latest(out)
        if pointer is not None and checkpoint_problem(pointer) is None:
            return pointer
        return newest_complete(out)
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ResumeError(
            f"train.resume={resume}: {path} is not a complete checkpoint ({problem}). Resume from a complete one "
            "(train.resume=latest takes the newest complete checkpoint of train.output_dir)"
        )
    return path


def run_structure(engine: Any, zero_stage: int, precision: str) -> dict[str, Any]:
    """What a checkpoint of this run records about its structure (besides the batch layout of `TrainState`),
    and what a resume must match."""
    return {
        "zero_stage": zero_stage,
        "precision": precision,
        "trainable": trainable_shapes(engine.module),
    }


def restore(
    engine: Any, path: Path, expected: TrainState, dist: DistEnv, structure: dict[str, Any]
) -> tuple[TrainState, dict[str, Any]]:
    """Load engine state, RNG states and the data position from checkpoint ``path``.

    Args:
        expected: the current run's batch layout.
        structure: `run_structure` of this run; the checkpoint must match it (checked before DeepSpeed reads a
            byte, so a mismatch is one paragraph and not a state_dict traceback).

    Returns:
        The restored `TrainState` and the checkpoint's whole ``trainer_state.json``.

    Raises:
        ResumeError: the checkpoint does not fit this run.
    """
    saved = read_state(path) or {}
    known = {f.name for f in fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved.items() if k in known})
    problems = structure_problems(saved, {**structure, **asdict(expected)})
    if problems:
        raise ResumeError(
            f"cannot resume {path}: "
            + "; ".join(problems)
            + ". Resume it with the settings it was saved with "
            f"(its recipe: {path / 'recipe.yaml'}), or start a new run in another train.output_dir"
        )
    try:
        loaded, _ = engine.load_checkpoint(str(path), tag=tag(state.step))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResumeError(
            f"DeepSpeed could not load {path / tag(state.step)} into this run ({type(exc).__name__}: {first}); "
            f"the checkpoint does not fit this model or optimizer. Resume it with its own recipe "
            f"({path / 'recipe.yaml'})"
        ) from exc
    if loaded is None:
        raise ResumeError(f"DeepSpeed found no checkpoint in {path / tag(state.step)}")
    set_rng_state(torch.load(path / f"rng_state_{dist.rank}.pth", weights_only=False))
    return state, saved


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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"{path} is not a complete training checkpoint: {problem}")
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
