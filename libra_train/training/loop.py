"""The training loop over a DeepSpeed engine: one optimizer step per accumulation group.

Loss normalisation. The loss of an optimizer step is the mean over *every supervised token of the global
batch* (all micro-batches, all ranks), as one big batch would give it; a per-micro-batch mean would weight
tokens of short micro-batches more, so micro-batch 1 x accumulation 4 would not equal 4 x 1. Each micro-batch
passes the global count as transformers' ``num_items_in_batch`` (its loss is then ``sum / count``) and the
backward gets ``loss * world_size * accumulation`` because DeepSpeed divides by the accumulation steps in
``engine.backward`` and averages gradients over ranks: the accumulated gradient is exactly that of the
global token mean. Clipping (``gradient_clipping``) and the lr schedule happen inside ``engine.step()`` on the
accumulation boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from libra_train.data import IGNORE_INDEX
from libra_train.plugin import libra_runtime
from libra_train.training.batches import TrainData
from libra_train.training.checkpoint import TrainState
from libra_train.training.dist import DistEnv, all_reduce_sum
from libra_train.training.evaluate import to_device
from libra_train.training.metrics import MetricsLogger


@dataclass
class StepResult:
    """One optimizer step, reduced over ranks.

    Attributes:
        loss: mean loss per supervised token of the global batch.
        tokens: real (unpadded) input tokens of the global batch, before compression.
        visual_tokens: mean visual tokens per image sample at each stage (stage 0 = all of them), over the
            step's compressed samples; empty without Libra.
        skipped: samples of the step that failed to load and were replaced (``data.skip_bad_samples``).
    """

    loss: float
    tokens: int
    visual_tokens: list[float] = field(default_factory=list)
    skipped: int = 0


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets that count in the loss (labels shift by one)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def find_runtime(model: torch.nn.Module) -> Any:
    """The Libra runtime of ``model`` or of a module inside it (peft wraps the patched model), else None."""
    return next((rt for m in model.modules() if (rt := libra_runtime(m)) is not None), None)


def train_step(
    engine: Any,
    micro_batches: list[dict[str, torch.Tensor]],
    dist: DistEnv,
    dtype: torch.dtype,
    stages: int = 0,
    skipped: int = 0,
) -> StepResult:
    """Forward/backward every micro-batch of one accumulation group; DeepSpeed steps on the last one.

    Args:
        stages: Libra stages to report (compression points + 1; 0 without Libra).
        skipped: this rank's samples of the group that were replaced at load time (summed over ranks here).
    """
    local = torch.stack([supervised_targets(b["labels"]) for b in micro_batches]).sum()
    num_items = all_reduce_sum(local.unsqueeze(0)).to(dist.device, torch.long)  # global supervised tokens
    scale = dist.world_size * len(micro_batches)
    runtime = find_runtime(engine.module) if stages else None
    # Step metrics accumulate on the device and are read once per optimizer step (a float() per micro-batch
    # would stall a GPU's launch queue every forward): loss, tokens, replaced samples, compressed samples,
    # visual tokens per stage.
    sums = torch.zeros(4 + stages, dtype=torch.float64, device=dist.device)
    sums[2] = skipped
    for batch in micro_batches:
        batch = to_device(batch, dist.device, dtype)
        labels = batch.pop("labels")
        if runtime is not None:
            runtime.last_visual_tokens = None  # a forward that compresses nothing leaves it as it was
        out = engine(**batch, labels=labels, num_items_in_batch=num_items, use_cache=False)
        engine.backward(out.loss * scale)
        engine.step()
        sums[0] += out.loss.detach().to(torch.float64).sum()  # [] or [1] (num_items_in_batch is [1])
        sums[1] += batch["attention_mask"].sum()
        kept = runtime.last_visual_tokens if runtime is not None else None
        if kept:  # per stage, [B] visual tokens (0 for samples that were not compressed)
            sums[3] += (kept[0] > 0).sum()
            sums[4:] += torch.stack([k.to(torch.float64).sum() for k in kept])
    loss, tokens, skipped_all, samples, *visual = all_reduce_sum(sums).tolist()
    return StepResult(loss, int(tokens), [v / samples for v in visual] if samples else [], int(skipped_all))


@dataclass
class TrainStats:
    """Totals of a `train` call: optimizer steps, input tokens and seconds spent in training steps (evaluation
    and checkpoints excluded), samples replaced because they failed to load (all ranks)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0


def train(
    engine: Any,
    data: TrainData,
    state: TrainState,
    total_steps: int,
    dist: DistEnv,
    dtype: torch.dtype,
    logger: MetricsLogger,
    log_every: int,
    on_step_end: Callable[[TrainState], bool],
    stages: int = 0,
) -> TrainStats:
    """Run optimizer steps from ``state`` (fresh or restored; updated in place) until ``total_steps``.

    ``on_step_end(state)`` runs after each step (evaluation and checkpoints decide there whether it is their turn)
    and returns True to stop early (a signal: every rank must return the same); ``stages`` is the number of
    Libra stages to report (0 without Libra).
    """
    stats = TrainStats()
    window: list[StepResult] = []
    window_seconds = 0.0
    groups = _groups(data, state)
    while state.step < total_steps:
        engine.train()
        start = time.perf_counter()
        group = next(groups)
        result = train_step(engine, group, dist, dtype, stages, data.skips.take_pending())
        seconds = time.perf_counter() - start
        state.step += 1
        state.micro_batch += data.accumulation
        stats.steps, stats.tokens, stats.seconds = (
            stats.steps + 1,
            stats.tokens + result.tokens,
            stats.seconds + seconds,
        )
        stats.skipped += result.skipped
        window.append(result)
        window_seconds += seconds
        if state.step % log_every == 0 or state.step == total_steps:
            record = _record(engine, data, state, window, window_seconds)
            if data.skips.enabled:  # replaced samples so far in this run, all ranks
                record["skipped_samples"] = stats.skipped
            logger.log(record)
            logger.progress(len(window), _postfix(record))
            window, window_seconds = [], 0.0
        if on_step_end(state):
            break
    return stats


def _groups(data: TrainData, state: TrainState) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Accumulation groups from the saved position on, epoch after epoch (the state's epoch fields advance)."""
    while True:
        yield from data.epoch(state.epoch, state.micro_batch)
        state.epoch += 1
        state.micro_batch = 0


def _record(
    engine: Any, data: TrainData, state: TrainState, window: list[StepResult], elapsed: float
) -> dict:
    lrs = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else [float("nan")]
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": state.step,
        "epoch": state.epoch + state.micro_batch / (data.steps_per_epoch * data.accumulation),
        "loss": sum(r.loss for r in window) / len(window),
        "lr": float(lrs[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": sum(r.tokens for r in window) / max(elapsed, 1e-9),
        "step_time_s": elapsed / len(window),
    }
    stages = [r.visual_tokens for r in window if r.visual_tokens]
    if stages:
        record["visual_tokens"] = [sum(s[i] for s in stages) / len(stages) for i in range(len(stages[0]))]
    return record


def _postfix(record: dict) -> dict[str, str]:
    postfix = {
        "loss": f"{record['loss']:.4f}",
        "lr": f"{record['lr']:.2e}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
    }
    if "visual_tokens" in record:
        postfix["vis"] = "/".join(f"{v:.1f}" for v in record["visual_tokens"])
    return postfix
