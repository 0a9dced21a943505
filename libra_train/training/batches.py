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
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from libra_train.config import RecipeConfig
from libra_train.data import (
    Collator,
    LengthGroupedSampler,
    SupervisedDataset,
    build_dataset,
    generate_demo_data,
)
from libra_train.training.dist import DistEnv, barrier

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
    cfg.data.train, cfg.data.eval, cfg.data.image_folder = (
        str(root / "train.json"),
        str(root / "val.json"),
        str(root / "images"),
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
class TrainData:
    """The training split as the loop consumes it.

    Attributes:
        dataset, sampler, loader: this rank's view; call `epoch` to iterate.
        accumulation: micro-batches per optimizer step.
        steps_per_epoch: optimizer steps per epoch (full global batches only).
    """

    dataset: SupervisedDataset
    sampler: ResumableSampler
    loader: DataLoader
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int

    def epoch(self, epoch: int, start_micro_batch: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The accumulation groups (lists of micro-batches) of ``epoch`` from micro-batch ``start_micro_batch``."""
        self.sampler.set_epoch(epoch, skip=start_micro_batch * self.micro_batch_size)
        batches = iter(self.loader)
        for _ in range(start_micro_batch // self.accumulation, self.steps_per_epoch):
            yield [next(batches) for _ in range(self.accumulation)]


def load_split(cfg: RecipeConfig, path: str, processor: Any) -> SupervisedDataset:
    d = cfg.data
    return build_dataset(
        path,
        processor,
        image_folder=d.image_folder,
        template=d.template,
        max_length=d.max_length,
        skip_bad_samples=d.skip_bad_samples,
    )


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
    return TrainData(dataset, sampler, loader, micro, accumulation, steps)


def eval_shard(n: int, dist: DistEnv, limit: int | None = None) -> list[tuple[int, bool]]:
    """This rank's evaluation indices as ``(index, counted)``: contiguous shards of ``min(n, limit)`` samples,
    padded with uncounted repeats so that every rank runs the same number of forwards (ZeRO-3 needs every rank
    in every forward)."""
    n = min(n, limit) if limit else n
    per_rank = math.ceil(n / dist.world_size)
    own = list(range(dist.rank * per_rank, min(n, (dist.rank + 1) * per_rank)))
    return [(i, True) for i in own] + [(0, False)] * (per_rank - len(own))


def skipped_summary(
    train: SupervisedDataset, eval_set: SupervisedDataset | None, skip_bad_samples: bool
) -> str:
    """One line on bad samples: how many each split skipped and why (``data.skip_bad_samples``)."""
    if not skip_bad_samples:
        return "skip_bad_samples off (a bad sample is an error)"
    parts = []
    for name, ds in (("train", train), ("eval", eval_set)):
        if ds is not None:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(ds.skipped.items())) or "none"
            parts.append(f"{name} skipped {sum(ds.skipped.values())} ({reasons})")
    return "skip_bad_samples: " + "; ".join(parts)


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
