"""Length- and modality-grouped sampling (LLaVA's ``group_by_modality_length``), distributed-aware.

Order of one epoch (seeded by ``seed + epoch``, identical on every rank):
1. Split the indices by modality (lengths > 0: image samples, < 0: text-only; LLaVA's sign convention).
2. Shuffle each group and cut it into megabatches of ``world_size * batch_size`` samples; sort each
   megabatch by length, longest first (so a rank's batch holds samples of similar length: little padding).
3. Shuffle the full megabatches of both groups together; the two partial leftovers form the last, mixed
   megabatch. So every global step (all ranks' batches) is one modality, except possibly the last.
Each megabatch is then cut into ``world_size`` equal consecutive chunks and rank r takes chunk r: the ranks'
shards are disjoint pieces of the same permutation (up to the few repeated indices that pad the total to a
multiple of ``world_size`` when ``drop_last=False``, as in `DistributedSampler`).

Difference from LLaVA: LLaVA spreads long samples over ranks (`split_to_even_chunks`) and lets the trainer
shard the global order; here consecutive chunks keep each rank's batch homogeneous in length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields this rank's indices for one epoch; call `set_epoch` before each epoch.

    Args:
        lengths: per sample, +length (image) or -length (text-only), e.g. `dataset.modality_lengths`; plain
            positive lengths work too.
        batch_size: per-rank micro-batch size (the DataLoader's batch_size).
        world_size, rank: data-parallel size and this process's rank.
        seed: base seed; the epoch is added to it.
        group_by_modality: keep image and text-only samples in separate megabatches.
        drop_last: drop the tail that does not divide by world_size instead of padding it with repeats.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_modality: bool = True,
        drop_last: bool = False,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        if group_by_modality and any(n == 0 for n in lengths):
            raise ValueError("lengths must be non-zero (their sign tells the modality)")
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.epoch = seed, 0
        self.group_by_modality, self.drop_last = group_by_modality, drop_last
        n = len(self.lengths)
        self.num_samples = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use a new order for `epoch` (same on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def global_order(self) -> list[list[int]]:
        """This epoch's megabatches (lists of dataset indices), shared by all ranks."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.world_size * self.batch_size
        if self.group_by_modality:
            groups = [
                [i for i, n in enumerate(self.lengths) if n > 0],
                [i for i, n in enumerate(self.lengths) if n < 0],
            ]
        else:
            groups = [list(range(len(self.lengths)))]
        full, tail = [], []
        for group in groups:
            perm = [group[j] for j in torch.randperm(len(group), generator=gen).tolist()]
            for start in range(0, len(perm), size):
                chunk = sorted(perm[start : start + size], key=lambda i: -abs(self.lengths[i]))
                (full if len(chunk) == size else tail).append(chunk)
        megabatches = [full[j] for j in torch.randperm(len(full), generator=gen).tolist()]
        leftover = sorted((i for chunk in tail for i in chunk), key=lambda i: -abs(self.lengths[i]))
        return megabatches + ([leftover] if leftover else [])

    def __iter__(self) -> Iterator[int]:
        megabatches = self.global_order()
        flat = [i for mb in megabatches for i in mb]
        total = self.num_samples * self.world_size
        # Pad (repeats from the start) or cut the last megabatch so that it divides by world_size.
        cut = len(flat) - total
        if cut > 0:
            megabatches[-1] = megabatches[-1][: len(megabatches[-1]) - cut]
        elif cut < 0:
            megabatches[-1] = megabatches[-1] + (flat * (-cut // len(flat) + 1))[:-cut]
        for mb in megabatches:
            share = len(mb) // self.world_size
            yield from mb[self.rank * share : (self.rank + 1) * share]
