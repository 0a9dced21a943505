"""Compression units per family (``LibraConfig.unit``): each image, each video frame, compressed alone.

Reference (``tests/compress/unit_reference.py``): the single-sample algorithm on each unit's hidden states and
importance alone, text in between kept; the units are written down here from each family's layout (LLaVA's
adjacent ``<image><image>`` placeholders of 16 tokens each, Qwen2.5-VL's video of ``t`` frames of
``h * w / 4`` tokens, LLaVA-OneVision's 4-token pooled frames and final newline, Qwen3-VL's frame runs), not
derived by the code under test. Then a padded batch with different image counts per sample gives each sample
what it gets alone, and ``generate`` (which encodes the images before the prefill and passes
``mm_encoder_outputs`` / M-RoPE ``position_ids`` instead of pixels and grids) cuts the same units as a forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from libra_train import LibraConfig, apply_libra
from libra_train.plugin import libra_runtime
from libra_train.plugin.apply import find_decoder
from libra_train.plugin.units import qwen_frames
from tests.compress.unit_reference import expected_row
from tests.plugin.conftest import (
    IGNORE,
    IMAGE_TOKEN,
    N_VISUAL,
    PAD,
    VOCAB,
    assert_cached_generation_equals_uncached,
    tiny_llava,
)
from tests.plugin.family_models import (
    IMAGE,
    OV_VIDEO,
    VIDEO,
    collate_onevision,
    collate_qwen,
    onevision_sample,
    qwen_sample,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)

POINT = 1
CFG = dict(layers=[POINT, 3], ratio=0.5, theta=0.9)  # igm: one compensation token per unit that has negatives


def llava_sample(layout: list, answers=((1, 3),), seed: int = 0) -> dict:
    """A LLaVA sample from ``[("text", n) | ("image", k)]`` (``k`` adjacent images of 16 tokens each)."""
    g = torch.Generator().manual_seed(seed)
    ids, images = [], 0
    for kind, n in layout:
        ids += (
            torch.randint(4, VOCAB, (n,), generator=g).tolist()
            if kind == "text"
            else [IMAGE_TOKEN] * (n * N_VISUAL)
        )
        images += n if kind == "image" else 0
    ids = torch.tensor(ids)
    labels = torch.full_like(ids, IGNORE)
    tail = len(ids) - layout[-1][1]
    for start, end in answers:
        labels[tail + start : tail + end] = ids[tail + start : tail + end]
    pixels = torch.randn(images, 3, 16, 16, generator=g)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate_llava(samples: list[dict], side: str = "right", labels: bool = False) -> dict:
    length = max(s["input_ids"].numel() for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), PAD),
        "attention_mask": torch.zeros(len(samples), length, dtype=torch.long),
    }
    if labels:
        batch["labels"] = torch.full((len(samples), length), IGNORE)
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        where = slice(length - n, length) if side == "left" else slice(0, n)
        batch["input_ids"][b, where], batch["attention_mask"][b, where] = s["input_ids"], 1
        if labels:
            batch["labels"][b, where] = s["labels"]
    pixels = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def chunks(positions: torch.Tensor, size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` of the given positions."""
    positions = positions.tolist()
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def first_compression(model, batch: dict, config: LibraConfig) -> dict:
    """One forward of ``model`` with ``config`` applied: what enters the first point's compression (hidden
    states, importance) and what leaves it (hidden states, padding mask, position map)."""
    layer, seen = find_decoder(model).layers[POINT + 1], {}

    def before(module, args, kwargs):  # registered before Libra's hook: the uncompressed input
        state = libra_runtime(model).forward
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.update(hidden=hidden.clone(), alpha=state.importance[POINT].clone(), valid=state.valid.clone())

    def after(module, args, kwargs):  # after Libra's hook: the compressed sequence
        state = libra_runtime(model).forward
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.update(out=hidden.clone(), out_valid=state.valid.clone(), map=state.position_map.clone())

    layer.register_forward_pre_hook(before, with_kwargs=True)
    apply_libra(model, config)
    layer.register_forward_pre_hook(after, with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    return seen


def check_units(seen: dict, b: int, units: list[list[int]], config: LibraConfig) -> None:
    """Sample ``b`` left the first point as each of ``units`` (lists of positions) compressed alone."""
    valid = seen["valid"][b]
    n, offset = int(valid.sum()), int(valid.long().argmax())
    visual = torch.zeros(n, dtype=torch.bool)
    unit_of = torch.full((n,), -1)
    for u, positions in enumerate(units):
        for p in positions:
            visual[p - offset], unit_of[p - offset] = True, u
    hidden, alpha = seen["hidden"][b, offset : offset + n], seen["alpha"][b, offset : offset + n]
    tokens, source, comp = expected_row(hidden, visual, alpha, unit_of, config.ratios[0], theta=config.theta)
    real = seen["out_valid"][b]
    torch.testing.assert_close(seen["out"][b][real], tokens, rtol=1e-5, atol=1e-5)
    expected_map = torch.tensor([-1 if c else s + offset for s, c in zip(source, comp)])
    assert torch.equal(seen["map"][b][real], expected_map)
    assert any(comp) or config.merge_method != "igm"  # some unit made its own compensation token


# -- LLaVA: adjacent images ---------------------------------------------------------------------------------------
def test_llava_each_of_two_adjacent_images_is_compressed_alone():
    """``<image><image>`` is one run of 32 placeholders; the recorded feature counts cut it into two images."""
    samples = [
        llava_sample([("text", 3), ("image", 2), ("text", 4)], seed=0),  # adjacent
        llava_sample(
            [("text", 2), ("image", 1), ("text", 3), ("image", 1), ("text", 4)], seed=1
        ),  # text between
    ]
    config = LibraConfig(**CFG)
    batch = collate_llava(samples)
    seen = first_compression(tiny_llava(), batch, config)
    for b, row in enumerate(batch["input_ids"]):
        check_units(seen, b, chunks((row == IMAGE_TOKEN).nonzero().flatten(), N_VISUAL), config)


def test_llava_deepcopy_records_its_own_feature_counts():
    """The feature recorder of a deep copy (EMA, trl reference models) feeds the copy's forward, not the
    original's: the copy cuts the adjacent images too."""
    batch = collate_llava([llava_sample([("text", 3), ("image", 2), ("text", 4)], answers=())])
    model = apply_libra(tiny_llava(), LibraConfig(**CFG))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        expected, got = model(**batch), clone(**batch)
    assert torch.equal(got.libra_position_map, expected.libra_position_map)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)


@pytest.mark.parametrize(("side", "with_labels"), [("left", False), ("right", True)], ids=["infer", "train"])
def test_llava_batch_with_different_image_counts_equals_each_sample_alone(side, with_labels):
    samples = [
        llava_sample([("text", 3), ("image", 2), ("text", 6)], answers=((1, 3), (4, 6)), seed=0),
        llava_sample([("text", 5), ("text", 4)], answers=((1, 3),), seed=1),  # text only
        llava_sample([("text", 2), ("image", 1), ("text", 5)], seed=2),
        llava_sample([("text", 1), ("image", 3), ("text", 4)], seed=3),
    ]
    model = apply_libra(tiny_llava(), LibraConfig(**CFG))
    batch = collate_llava(samples, side, labels=with_labels)
    total = int((batch["labels"][:, 1:] != IGNORE).sum()) if with_labels else None
    with torch.no_grad():
        out = model(**batch)
    assert [int(n) for n in libra_runtime(model).last_visual_tokens[0]] == [32, 0, 16, 48]
    length, loss = batch["input_ids"].shape[1], 0.0
    for b, sample in enumerate(samples):
        single = collate_llava([sample], side, labels=with_labels)
        with torch.no_grad():
            ref = model(**single, num_items_in_batch=total)
        n = sample["input_ids"].numel()
        offset = length - n if side == "left" else 0
        real = out.libra_attention_mask[b]
        alone = ref.get("libra_attention_mask", single["attention_mask"][0].bool()[None])[
            0
        ]  # text only: whole
        alone_map = ref.get("libra_position_map", torch.arange(n)[None])[0][alone]
        positions = out.libra_position_map[b][real]
        assert torch.equal(torch.where(positions >= 0, positions - offset, -1), alone_map)
        torch.testing.assert_close(out.logits[b][real], ref.logits[0][alone], rtol=1e-5, atol=1e-5)
        loss = loss + (ref.loss if with_labels else 0.0)
    if with_labels:
        torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)


def test_llava_generation_cuts_adjacent_images_as_the_forward_does():
    """``generate`` encodes the images first and passes ``mm_encoder_outputs``: their counts cut the same units,
    so the cached steps equal the uncached forward with the same compression (one image at a time)."""
    samples = [
        llava_sample([("text", 3), ("image", 2), ("text", 4)], answers=(), seed=0),
        llava_sample([("text", 2), ("image", 1), ("text", 3)], answers=(), seed=1),
    ]
    batch = collate_llava(samples, "left")
    model = apply_libra(tiny_llava(), LibraConfig(**CFG))
    assert_cached_generation_equals_uncached(model, batch, 2)


# -- Qwen2.5-VL: image + video frames -----------------------------------------------------------------------------
def _qwen25_mixed(seed: int = 0) -> dict:
    return qwen_sample(
        [("text", 3), ("image", (1, 4, 4)), ("text", 2), ("video", (3, 4, 4)), ("text", 4)],
        answers=((1, 3),),
        seed=seed,
    )


def test_qwen2_5_vl_each_frame_and_the_image_are_compressed_alone():
    config = LibraConfig(**CFG)  # unit None: the family's default, "frame"
    sample = _qwen25_mixed()
    seen = first_compression(tiny_qwen2_5_vl(), collate_qwen([sample], "right"), config)
    ids = sample["input_ids"]
    image = (ids == IMAGE).nonzero().flatten().tolist()
    frames = chunks((ids == VIDEO).nonzero().flatten(), 4)  # t = 3 groups of h * w / merge^2 = 4 tokens
    check_units(seen, 0, [image, *frames], config)


def test_qwen2_5_vl_image_unit_keeps_each_video_whole():
    config = LibraConfig(**CFG, unit="image")
    sample = _qwen25_mixed()
    seen = first_compression(tiny_qwen2_5_vl(), collate_qwen([sample], "right"), config)
    ids = sample["input_ids"]
    check_units(
        seen,
        0,
        [(ids == IMAGE).nonzero().flatten().tolist(), (ids == VIDEO).nonzero().flatten().tolist()],
        config,
    )


def test_qwen_frames_from_mrope_ids_equal_the_grid_even_when_time_ids_repeat():
    """``generate`` passes M-RoPE ``position_ids`` and no grid; the frames found from the height/width ids are
    the grid's, also when time scaling gives two frames the same temporal id (0.25 s a group here)."""
    model = tiny_qwen2_5_vl()
    samples = [_qwen25_mixed(0), qwen_sample([("text", 2), ("video", (4, 8, 4)), ("text", 3)], seed=1)]
    batch = collate_qwen(samples, "left")
    grid = batch["video_grid_thw"]
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=grid,
        second_per_grid_ts=torch.tensor([0.25, 0.25]),
        attention_mask=batch["attention_mask"],
    )
    video = batch["input_ids"] == VIDEO
    temporal = positions[0][1][video[1]].view(4, 8)[:, 0]
    assert len(set(temporal.tolist())) < 4  # the temporal ids repeat across frames
    from_grid = qwen_frames(video, grid, None, merge=2)
    from_ids = qwen_frames(video, None, positions, merge=2)
    assert torch.equal(from_ids[video], from_grid[video])
    assert from_grid[1][video[1]].tolist() == [f for f in range(4) for _ in range(8)]


# -- LLaVA-OneVision: video frames and the newline -----------------------------------------------------------------
def test_onevision_each_frame_is_compressed_alone_and_the_newline_is_kept():
    config = LibraConfig(**CFG)  # "frame"
    model = tiny_llava_onevision()
    sample = onevision_sample(model, 3, 5, frames=3, seed=0)
    seen = first_compression(model, collate_onevision([sample], "right"), config)
    video = (sample["input_ids"] == OV_VIDEO).nonzero().flatten()
    frames, newline = chunks(video[:-1], 4), int(video[-1])  # 3 frames of ceil(4 / 2)^2 = 4 pooled tokens
    check_units(seen, 0, frames, config)
    kept = seen["map"][0] == newline
    torch.testing.assert_close(seen["out"][0][kept][0], seen["hidden"][0, newline])  # carried as text is


# -- Qwen3-VL: frame runs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["frame", "image"])
def test_qwen3_vl_video_units(unit):
    """Each frame is its own run (a timestamp before it): ``frame`` is each run, ``image`` the whole video."""
    config = LibraConfig(**CFG, unit=unit)
    sample = qwen_sample([("text", 3), ("video", (3, 4, 4)), ("text", 4)], frames_as_runs=True, seed=0)
    seen = first_compression(tiny_qwen3_vl(), collate_qwen([sample], "right"), config)
    video = (sample["input_ids"] == VIDEO).nonzero().flatten()
    check_units(seen, 0, chunks(video, 4) if unit == "frame" else [video.tolist()], config)


@pytest.mark.parametrize("build", [tiny_qwen3_vl, tiny_llava_onevision], ids=["qwen3_vl", "onevision"])
def test_video_batch_equals_each_sample_alone(build):
    """A batch of videos (Qwen3-VL: whole videos as units; OneVision: frames) is each sample alone, trained."""
    model = build()
    if build is tiny_qwen3_vl:
        config = LibraConfig(**CFG, unit="image")
        samples = [
            qwen_sample(
                [("text", 3), ("video", (2, 4, 4)), ("text", 6)], answers=((1, 3),), frames_as_runs=True
            ),
            qwen_sample(
                [("text", 2), ("video", (3, 4, 4)), ("text", 5)],
                answers=((2, 4),),
                frames_as_runs=True,
                seed=1,
            ),
        ]
        collate = collate_qwen
    else:
        config = LibraConfig(**CFG)
        samples = [
            onevision_sample(model, 3, 6, frames=3, answers=((1, 3),), seed=0),
            onevision_sample(model, 2, 9, frames=3, answers=((2, 4),), seed=1),
        ]
        collate = collate_onevision
    model = apply_libra(model, config)
    batch = collate(samples, "right", labels=True)
    total = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        out = model(**batch)
    loss = 0.0
    for b, sample in enumerate(samples):
        with torch.no_grad():
            ref = model(**collate([sample], "right", labels=True), num_items_in_batch=total)
        real, alone = out.libra_attention_mask[b], ref.libra_attention_mask[0]
        assert torch.equal(out.libra_position_map[b][real], ref.libra_position_map[0][alone])
        torch.testing.assert_close(out.logits[b][real], ref.logits[0][alone], rtol=1e-5, atol=1e-5)
        loss = loss + ref.loss
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
