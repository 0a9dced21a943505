"""What a resumed run may change: its recipe is compared with the checkpoint's, its structure with the engine's.

A resume continues the saved run, so by default the recipe must be the one the checkpoint recorded
(``recipe.yaml``); every difference is listed and refused, except keys that cannot change what is trained
(`FREE_KEYS`: where to write, how often to log, save and evaluate). Intended changes are named with
``train.resume_allow_changes=[train.lr,train.max_steps]`` (a section name such as ``libra`` allows all of its
keys); they take effect from the resumed step (`apply_current_schedule` makes the new lr and schedule the ones
in force, which DeepSpeed's restore of the optimizer and scheduler state would otherwise undo) and are recorded
in the new checkpoints' ``trainer_state.json`` and in ``log.jsonl``.

Some changes cannot be resumed at all (`STRUCTURAL_KEYS`: the model's shape, what trains, LoRA's shape, the
batch layout): DeepSpeed would fail with a state_dict error or, for the batch layout, the saved position in the
epoch would point at other samples. They are refused in one paragraph even when allowed, and the saved
structure (trainable parameter shapes, ZeRO stage, precision, batch layout) is checked again against the built
engine before DeepSpeed loads anything (`structure_problems`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from libra_train.config import RecipeConfig, RecipeError, recipe_to_dict

UNSET = "(unset)"
# Keys whose change cannot alter what is trained (an entry also covers the keys below it).
FREE_KEYS = (
    "recipe_name",
    "recipe_path",
    "train.resume",
    "train.resume_allow_changes",
    "train.overwrite_output_dir",
    "train.output_dir",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "data.num_workers",
    "data.eval",
    "data.eval_max_samples",
    "logging",
)
DEMO_PATHS = ("data.train", "data.eval", "data.image_folder")  # derived from output_dir when data.demo is set
STRUCTURAL_KEYS = {
    "model.tiny": "the model's shape",
    "model.family": "the model's architecture",
    "model.freeze_vision_tower": "which parameters train",
    "model.train_projector": "which parameters train",
    "model.train_llm": "which parameters train",
    "lora.enabled": "the LoRA adapters",
    "lora.r": "the LoRA adapters' shape",
    "lora.target_regex": "which modules carry LoRA adapters",
    "train.micro_batch_size": "the batch layout (the saved position in the epoch counts its micro-batches)",
    "train.global_batch_size": "the batch layout (the saved position in the epoch counts its micro-batches)",
}


class ResumeError(RecipeError):
    """A resume that would silently change the run, or cannot work; the message says what to pass instead."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and empty mappings are values."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _covered(key: str, entries: Sequence[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def schema_defaults() -> dict[str, Any]:
    """The schema's default of every recipe key (flattened): what a key that an older version of libra-train
    did not write into a checkpoint's recipe meant."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(RecipeConfig), resolve=False))


def recipe_changes(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, current value)`` for every key that differs and can change what is trained.

    Args:
        defaults: values of keys the saved recipe lacks (`schema_defaults`: a key added to the schema since
            the checkpoint was written is no change while it keeps its default).
    """
    old, new = flatten(saved), flatten(current)
    for key, value in (defaults or {}).items():
        if not any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in old):
            old[key] = value
    for a, b in ((old, new), (new, old)):  # ``model.tiny: {}`` on one side, its keys on the other
        for key in [k for k, v in a.items() if v == {} and any(n.startswith(k + ".") for n in b)]:
            del a[key]
    ignored = list(FREE_KEYS)
    if all((tree.get("data") or {}).get("demo") is not None for tree in (saved, current)):
        ignored += DEMO_PATHS
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, UNSET), new.get(key, UNSET)
        if a != b and not _covered(key, ignored):
            changes[key] = (a, b)
    return changes


def _show(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())


def check_recipe(cfg: RecipeConfig, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """Compare the run's recipe with ``checkpoint/recipe.yaml``; returns the allowed changes.

    Raises:
        ResumeError: a change that ``train.resume_allow_changes`` does not name, a change that cannot be
            resumed (`STRUCTURAL_KEYS`), or an allowed key that does not exist.
    """
    saved = OmegaConf.to_container(OmegaConf.load(checkpoint / "recipe.yaml"), resolve=True)
    current = recipe_to_dict(cfg)
    changes = recipe_changes(saved, current, schema_defaults())
    allowed = list(cfg.train.resume_allow_changes)
    known = set(flatten(saved)) | set(flatten(current))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for entry in allowed:
        if entry not in known and entry not in sections:
            guess = difflib.get_close_matches(entry, sorted(known | sections), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise ResumeError(f"train.resume_allow_changes names '{entry}', which is not a recipe key{hint}")
    structural = {k: v for k, v in changes.items() if _covered(k, list(STRUCTURAL_KEYS))}
    if structural:
        whys = {STRUCTURAL_KEYS[next(s for s in STRUCTURAL_KEYS if _covered(k, [s]))] for k in structural}
        raise ResumeError(
            f"cannot resume {checkpoint} with {_show(structural)}: {' and '.join(sorted(whys))} cannot change in "
            "a resumed run (its weights, optimizer state and data position were saved for the old values). Resume "
            f"with the checkpoint's values (its recipe is {checkpoint / 'recipe.yaml'}), or start a new run "
            "(another train.output_dir) from its weights"
        )
    refused = {k: v for k, v in changes.items() if not _covered(k, allowed)}
    if refused:
        keys = ",".join(refused)
        raise ResumeError(
            f"train.resume={cfg.train.resume}: this run's recipe differs from the one {checkpoint} was saved with "
            f"({checkpoint / 'recipe.yaml'}): {_show(refused)}. A resume continues the saved run; to change these "
            f"on purpose add train.resume_allow_changes=[{keys}] (they then take effect from the resumed step and "
            "are recorded in the new checkpoints and log.jsonl), or start a new run in another train.output_dir"
        )
    return {k: v for k, v in changes.items() if _covered(k, allowed)}


# -- structure of the built run ---------------------------------------------------------------------------------
def trainable_shapes(model: Any) -> dict[str, list[int]]:
    """Name -> full shape of every trainable parameter (ZeRO-3 partitioned parameters report ``ds_shape``)."""
    return {
        name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters() if p.requires_grad
    }


def structure_problems(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's ``trainer_state.json`` and this run's structure (same keys), one
    line each. Keys a checkpoint does not have (older checkpoints) are not compared."""
    problems = []
    layout = ("world_size", "micro_batch_size", "accumulation")
    if any(k in saved and saved[k] != now[k] for k in layout):
        was = ", ".join(f"{k} {saved.get(k)}" for k in layout)
        problems.append(
            f"the batch layout differs: the checkpoint was saved with {was}, this run has "
            + ", ".join(f"{k} {now[k]}" for k in layout)
            + " (run with the same number of processes, train.micro_batch_size and train.global_batch_size)"
        )
    for key, what in (
        ("zero_stage", "ZeRO stage (train.deepspeed)"),
        ("precision", "precision (train.precision)"),
    ):
        if key in saved and saved[key] != now[key]:
            problems.append(f"the {what} differs: {saved[key]} in the checkpoint, {now[key]} now")
    if "trainable" in saved:
        old, new = saved["trainable"], now["trainable"]
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in diff[:3])
            problems.append(f"{len(diff)} trainable parameter(s) differ in name or shape ({shown})")
    return problems


def apply_current_schedule(optimizer: Any, scheduler: Any, intended: list[tuple[float, float]]) -> None:
    """Make this run's lr, weight decay and schedule the ones in force after DeepSpeed restored a checkpoint.

    DeepSpeed restores the optimizer's param groups (lr, ``initial_lr``, weight decay) and the scheduler's
    ``base_lrs`` from the checkpoint, so a new ``train.lr`` would be ignored; the schedule's shape (warm-up,
    decay, ``max_steps``) comes from this run's ``lr_lambdas``, which are not saved. Setting both from the current
    recipe is exact when nothing changed (the same ``base * factor(step)`` as the uninterrupted run).

    Args:
        optimizer: the torch optimizer the scheduler drives (param groups in `optim.param_groups` order).
        scheduler: its ``LambdaLR``, with ``last_epoch`` restored.
        intended: ``(lr, weight_decay)`` per param group, as this run built them.
    """
    for group, (lr, weight_decay) in zip(optimizer.param_groups, intended, strict=True):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
    scheduler.base_lrs = [lr for lr, _ in intended]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
