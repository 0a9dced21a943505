"""LengthGroupedSampler: deterministic, disjoint shards, modality-pure global steps."""

from __future__ import annotations

import random

import pytest

from libra_train.data import LengthGroupedSampler


def _lengths(n_image: int = 70, n_text: int = 26, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = [rng.randint(40, 90) for _ in range(n_image)] + [-rng.randint(10, 60) for _ in range(n_text)]
    rng.shuffle(lengths)
    return lengths


def _shards(lengths, bs, ws, **kw) -> list[list[int]]:
    return [list(LengthGroupedSampler(lengths, bs, world_size=ws, rank=r, **kw)) for r in range(ws)]


def test_deterministic_and_epoch_dependent():
    lengths = _lengths()
    a, b = LengthGroupedSampler(lengths, 4, seed=1), LengthGroupedSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first) == list(range(len(lengths)))


@pytest.mark.parametrize(("bs", "ws"), [(4, 2), (3, 4), (5, 1)])
def test_shards_disjoint_and_complete(bs, ws):
    lengths = _lengths(n_image=70, n_text=26)  # 96 samples: divisible by 1, 2 and 4
    shards = _shards(lengths, bs, ws, seed=7)
    assert all(len(s) == 96 // ws for s in shards)
    assert sorted(i for s in shards for i in s) == list(range(96))


def test_padding_and_drop_last():
    lengths = _lengths(n_image=7, n_text=4)  # 11 samples on 2 ranks
    padded = _shards(lengths, 2, 2)
    assert [len(s) for s in padded] == [6, 6] and set(padded[0] + padded[1]) == set(range(11))
    dropped = _shards(lengths, 2, 2, drop_last=True)
    assert [len(s) for s in dropped] == [5, 5] and not set(dropped[0]) & set(dropped[1])


def test_global_steps_are_one_modality_and_sorted_by_length():
    lengths, bs, ws = _lengths(), 4, 2
    shards = _shards(lengths, bs, ws, seed=3)
    steps = len(shards[0]) // bs
    mixed = 0
    for step in range(steps):
        batch = [i for s in shards for i in s[step * bs : (step + 1) * bs]]  # one global step
        signs = {lengths[i] > 0 for i in batch}
        mixed += len(signs) > 1
        rank_batches = [[abs(lengths[i]) for i in s[step * bs : (step + 1) * bs]] for s in shards]
        assert all(rb == sorted(rb, reverse=True) for rb in rank_batches)
        assert min(rank_batches[0]) >= max(rank_batches[1])  # rank 0 takes the longest chunk
    assert mixed <= 1  # only the leftover megabatch at the end may mix modalities
    plain = _shards(lengths, bs, ws, seed=3, group_by_modality=False)
    assert sorted(plain[0] + plain[1]) == list(range(len(lengths)))


def test_bad_arguments():
    with pytest.raises(ValueError):
        LengthGroupedSampler([1, 2], 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="non-zero"):
        LengthGroupedSampler([1, 0], 2)
