"""Batching: right padding, image stacking in sample order, and a mixed batch through the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from libra_train.data import IGNORE_INDEX, Collator, build_dataset, collate


@pytest.fixture
def items(tiny, sample_dir):
    ds = build_dataset(sample_dir / "llava_small.json", tiny[1], max_length=256)
    return [ds[i] for i in range(3)]  # image (83 tokens), text-only (42), image + 2 rounds (94)


def test_padding(items):
    batch = collate(items, pad_token_id=3)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 94)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == 3).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (94 - n)
    # images of the image samples only, in sample order
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))
    assert collate(items, 3, pad_to_multiple_of=8)["input_ids"].shape == (3, 96)
    assert "pixel_values" not in collate([items[1]], 3)
    assert Collator(3)(items).keys() == batch.keys()


def test_mixed_batch_loss_equals_per_sample_losses(tiny, items):
    # The batch loss (mean over trained tokens) must equal the token-weighted mean of the per-sample losses:
    # this holds only if every image's features land in its own sample (padding and image order right).
    model = tiny[0]
    batch = collate(items, pad_token_id=3)
    with torch.no_grad():
        loss = model(**batch).loss
        singles = [model(**collate([it], 3)).loss for it in items]
    counts = [int((it["labels"] != IGNORE_INDEX).sum()) for it in items]
    expected = sum(s * n for s, n in zip(singles, counts)) / sum(counts)
    assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-5)
    swapped = dict(batch, pixel_values=batch["pixel_values"].flip(0))  # the two boards differ
    with torch.no_grad():
        assert not torch.allclose(model(**swapped).loss, loss, atol=1e-5)
    n_image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert n_image_tokens.tolist() == [36, 0, 36]


def test_extra_per_token_and_per_image_keys():
    # Qwen2-VL-like samples: flat patches [n_patches, D], grid sizes, per-token mm_token_type_ids (padded 0);
    # LLaVA-NeXT-like tiles [n_img, n_tiles, 3, H, W] with different tile counts (zero-padded).
    a = {
        "input_ids": torch.tensor([5, 6]),
        "labels": torch.tensor([-100, 6]),
        "attention_mask": torch.ones(2, dtype=torch.long),
        "mm_token_type_ids": torch.tensor([1, 0]),
        "pixel_values": torch.ones(4, 6),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
    }
    b = {
        "input_ids": torch.tensor([7, 8, 9]),
        "labels": torch.tensor([-100, 8, 9]),
        "attention_mask": torch.ones(3, dtype=torch.long),
        "mm_token_type_ids": torch.tensor([1, 1, 0]),
        "pixel_values": torch.zeros(8, 6),
        "image_grid_thw": torch.tensor([[1, 2, 4]]),
    }
    batch = collate([a, b], pad_token_id=0)
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (12, 6) and batch["image_grid_thw"].tolist() == [
        [1, 2, 2],
        [1, 2, 4],
    ]
    c = {
        "input_ids": torch.tensor([1]),
        "labels": torch.tensor([1]),
        "attention_mask": torch.ones(1, dtype=torch.long),
    }
    mixed = collate([c, a], pad_token_id=0)  # a text-only sample without the per-token extra comes first
    assert mixed["mm_token_type_ids"].tolist() == [[0, 0], [1, 0]] and mixed["pixel_values"].shape == (4, 6)
    tiles = collate(
        [dict(a, pixel_values=torch.ones(1, 3, 3, 4, 4)), dict(b, pixel_values=torch.ones(1, 5, 3, 4, 4))], 0
    )
    assert tiles["pixel_values"].shape == (2, 5, 3, 4, 4) and tiles["pixel_values"][0, 3:].abs().sum() == 0
