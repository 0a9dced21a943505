"""Data for the loop: the demo set generated on first use, datasets, the sharded resumable loader.

Sharding. The sampler is the data package's `LengthGroupedSampler` with its megabatch set to one *global*
batch (``micro_batch_size * accumulation`` samples per rank, ``world_size`` ranks): a global step always holds
the same samples, whatever the split into processes and micro-batches, so one process and two processes (or
micro-batch 4 x accumulation 1 and 1 x 4) see the same data at every step. Rank r takes the r-th consecutive
share of each megabatch, the DataLoader cuts it into micro-batches.

An epoch is the full global batches of the shuffled order: the remainder (the tails of the two modality groups,
which the sampler puts together last) is left out of that epoch, as with ``drop_last``; every epoch reshuffles,
so different samples are left out each time. Keeping it would make a step's samples depend on the process
layout, which the sampler's last, padded megabatch does.

Resume. Every step consumes ``accumulation`` full micro-batches of this rank's stream, so the position in an
epoch is a number of micro-batches; `ResumableSampler` skips that many samples of the epoch's order.

Start-up. `load_split` builds a split on rank 0 first (reading the JSON, the pre-check with ``data.num_proc``
processes, both cached under ``data.cache_dir``) while the other ranks wait; then each node's local rank 0, then
everyone else, loads the cached result (a node without the shared folder computes it once for itself). So the
pre-check of a 665k-record file runs once per file and configuration, not once per rank and start.

Bad samples at run time (``data.skip_bad_samples=true``): the training set replaces a sample that fails to load
by the next one that loads (`SupervisedDataset`), identically on every rank, and marks the batch; `TrainData`
takes the marks off before the batch reaches the model and counts them (`SkipCounter`); the loop all-reduces the
count into the JSONL log and the run ends with `skipped_summary`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Sampler

from libra_train.config import RecipeConfig
from libra_train.config.schema import demo_data_paths
from libra_train.data import (
    Collator,
    LengthGroupedSampler,
    SupervisedDataset,
    build_dataset,
    generate_demo_data,
)
from libra_train.data.dataset import RUNTIME_REASONS, SKIPPED_KEY
from libra_train.training.dist import DistEnv, barrier

T = TypeVar("T")
DATA_CACHE = "data_cache"  # under train.output_dir when data.cache_dir is not set

DEMO_MARKER = (
    "demo_args.json"  # written last: its presence (with the same arguments) means the data is complete
)


def prepare_demo_data(cfg: RecipeConfig, dist: DistEnv) -> None:
    """With ``data.demo`` set, generate the demo set into ``<output_dir>/demo_data`` (rank 0, once per
    argument set) and point ``data.train`` / ``data.eval`` / ``data.image_folder`` at it (every rank)."""
    if cfg.data.demo is None:
        return
    root = Path(cfg.train.output_dir) / "demo_data"
    args = dict(cfg.data.demo)
    marker = root / DEMO_MARKER
    if dist.is_main and not (marker.is_file() and json.loads(marker.read_text()) == args):
        marker.unlink(missing_ok=True)
        generate_demo_data(root, **args)
        marker.write_text(json.dumps(args, sort_keys=True))
    barrier()
    paths = demo_data_paths(cfg.train.output_dir)  # the same strings `validate` accepts for these keys
    cfg.data.train, cfg.data.eval, cfg.data.image_folder = (
        paths["train"],
        paths["eval"],
        paths["image_folder"],
    )


class ResumableSampler(Sampler[int]):
    """A `LengthGroupedSampler` whose epoch can start after ``skip`` samples of its order."""

    def __init__(self, sampler: LengthGroupedSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@dataclass
class SkipCounter:
    """Samples the training set replaced at run time, as seen by this rank (see the module doc).

    Attributes:
        enabled: ``data.skip_bad_samples``.
        seen: dataset position -> reason of every replaced sample this rank met.
        pending: replacements in the batches handed out since the last `take_pending`.
    """

    enabled: bool = False
    seen: dict[int, str] = field(default_factory=dict)
    pending: int = 0

    def take(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Remove the skip marks from a batch (``skipped_samples[k, 2]``: position, reason code) and count them."""
        marks = batch.pop(SKIPPED_KEY, None)
        if marks is not None:
            for pos, code in marks.tolist():
                self.seen[pos] = RUNTIME_REASONS[code]
            self.pending += len(marks)
        return batch

    def take_pending(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def gathered(self) -> Counter:
        """Distinct replaced samples of all ranks, by reason (a collective: call on every rank)."""
        seen = dict(self.seen)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            parts: list[Any] = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(parts, seen)
            seen = {pos: reason for part in parts for pos, reason in part.items()}
        return Counter(seen.values())


@dataclass
class TrainData:
    """The training split as the loop consumes it.

    Attributes:
        dataset, sampler, loader: this rank's view; call `epoch` to iterate.
        accumulation: micro-batches per optimizer step.
        steps_per_epoch: optimizer steps per epoch (full global batches only).
        skips: samples replaced at run time (``data.skip_bad_samples``).
    """

    dataset: SupervisedDataset
    sampler: ResumableSampler
    loader: DataLoader
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    skips: SkipCounter = field(default_factory=SkipCounter)

    def epoch(self, epoch: int, start_micro_batch: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The accumulation groups (lists of micro-batches) of ``epoch`` from micro-batch ``start_micro_batch``."""
        self.sampler.set_epoch(epoch, skip=start_micro_batch * self.micro_batch_size)
        batches = iter(self.loader)
        for _ in range(start_micro_batch // self.accumulation, self.steps_per_epoch):
            yield [self.skips.take(next(batches)) for _ in range(self.accumulation)]


def _env() -> DistEnv:
    """This process's place from the process group (or the launcher's variables), when none is given."""
    initialized = torch_dist.is_initialized()
    rank = torch_dist.get_rank() if initialized else 0
    world = torch_dist.get_world_size() if initialized else 1
    return DistEnv(rank, int(os.environ.get("LOCAL_RANK", rank)), world, torch.device("cpu"))


def main_process_first(dist: DistEnv, build: Callable[[], T]) -> T:
    """Run ``build`` on rank 0, then on the other nodes' local rank 0, then on every other rank.

    The first run fills a cache the later ones load. Every rank passes the same barriers whether ``build``
    succeeds or raises (an error is re-raised after them), so a bad data file ends every rank with the same
    error instead of leaving the others waiting.
    """
    phase = 0 if dist.rank == 0 else 1 if dist.local_rank == 0 else 2
    result, error = None, None
    for turn in range(3):
        if turn == phase:
            try:
                result = build()
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the barriers)
                error = exc
        barrier()
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def data_cache_dir(cfg: RecipeConfig) -> str:
    """``data.cache_dir``, defaulting to ``<train.output_dir>/data_cache``."""
    return cfg.data.cache_dir or str(Path(cfg.train.output_dir) / DATA_CACHE)


def load_split(
    cfg: RecipeConfig, path: str, processor: Any, dist: DistEnv | None = None
) -> SupervisedDataset:
    """A data split as the recipe says, built on rank 0 first and cached for every rank (see the module doc)."""
    d = cfg.data
    purpose = "evaluation" if path == d.eval and path != d.train else "training"

    def build() -> SupervisedDataset:
        return build_dataset(
            path,
            processor,
            image_folder=d.image_folder,
            template=d.template,
            max_length=d.max_length,
            skip_bad_samples=d.skip_bad_samples,
            cache_dir=data_cache_dir(cfg),
            num_proc=d.num_proc,
            purpose=purpose,
        )

    return main_process_first(dist or _env(), build)


def build_train_data(
    cfg: RecipeConfig, dataset: SupervisedDataset, processor: Any, dist: DistEnv, accumulation: int
) -> TrainData:
    """Wrap ``dataset`` in the global-batch sampler and a DataLoader (see the module docstring)."""
    micro = cfg.train.micro_batch_size
    grouped = LengthGroupedSampler(
        dataset.modality_lengths
        if cfg.data.group_by_modality_length
        else [abs(n) for n in dataset.modality_lengths],
        micro * accumulation,
        world_size=dist.world_size,
        rank=dist.rank,
        seed=cfg.train.seed,
        group_by_modality=cfg.data.group_by_modality_length,
    )
    sampler = ResumableSampler(grouped)
    dataset.report_skips = cfg.data.skip_bad_samples  # before the DataLoader copies it into workers
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        collate_fn=Collator(processor.tokenizer.pad_token_id),
        num_workers=cfg.data.num_workers,
        pin_memory=dist.device.type == "cuda",
    )
    # One step per full global batch of the epoch's order (the count does not depend on the epoch's shuffle).
    global_batch = micro * accumulation * dist.world_size
    steps = sum(len(megabatch) == global_batch for megabatch in grouped.global_order())
    if steps < 1:
        raise ValueError(
            f"{len(dataset)} training samples make no optimizer step of {micro * accumulation * dist.world_size} "
            "samples (train.global_batch_size); use more data or a smaller global batch"
        )
    return TrainData(
        dataset, sampler, loader, micro, accumulation, steps, SkipCounter(cfg.data.skip_bad_samples)
    )


def eval_shard(n: int, dist: DistEnv, limit: int | None = None) -> list[tuple[int, bool]]:
    """This rank's evaluation indices as ``(index, counted)``: contiguous shards of ``min(n, limit)`` samples,
    padded with uncounted repeats so that every rank runs the same number of forwards (ZeRO-3 needs every rank
    in every forward)."""
    n = min(n, limit) if limit else n
    per_rank = math.ceil(n / dist.world_size)
    own = list(range(dist.rank * per_rank, min(n, (dist.rank + 1) * per_rank)))
    return [(i, True) for i in own] + [(0, False)] * (per_rank - len(own))


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def skipped_summary(
    train: SupervisedDataset,
    eval_set: SupervisedDataset | None,
    skip_bad_samples: bool,
    runtime: Counter | None = None,
) -> str:
    """One line on bad samples: how many each split skipped and why (``data.skip_bad_samples``).

    Args:
        train, eval_set: the splits (their ``skipped`` counts hold the pre-check's problems; the eval set's also
            what failed to load in this process).
        skip_bad_samples: ``data.skip_bad_samples``.
        runtime: training samples replaced at run time over all ranks (`SkipCounter.gathered`; None at
            start-up).
    """
    if not skip_bad_samples:
        return "data.skip_bad_samples=false (a bad sample is an error)"
    parts = []
    for name, ds in (("train", train), ("eval", eval_set)):
        if ds is None:
            continue
        counts = Counter(ds.skipped)
        if name == "train":  # this copy's load-time failures are in `runtime`, counted over all ranks
            counts.subtract(Counter(ds.runtime_skipped.values()))
            counts = +counts
        parts.append(f"{name} skipped {sum(counts.values())} ({_reasons(counts)})")
    if runtime is not None:
        parts.append(
            f"train samples that failed to load during training: {sum(runtime.values())} ({_reasons(runtime)})"
        )
    return "data.skip_bad_samples=true: " + "; ".join(parts)


def baseline_note(cfg: RecipeConfig) -> str:
    """For the demo set, what guessing would score on the evaluated samples: uniform guessing per question
    type, and always giving each type's most frequent answer; empty for other data."""
    from libra_train.data import chance_accuracy, majority_accuracy

    if cfg.data.demo is None or cfg.data.eval is None:
        return ""
    records = json.loads(Path(cfg.data.eval).read_text())[: cfg.data.eval_max_samples or None]
    types = [t for r in records for t in r.get("question_types", [])[:1]]
    if not types:
        return ""
    chance = chance_accuracy(cfg.data.demo.get("grid", 3))
    majority = majority_accuracy(records)
    uniform = sum(chance.get(t, 0.0) for t in types) / len(types)
    most = sum(majority.get(t, 0.0) for t in types) / len(types)
    return (
        f" (uniform guessing {100 * uniform:.1f}%, most frequent answer per question type {100 * most:.1f}%)"
    )
