"""Video records through the data pipeline and generation: Qwen2-VL / Qwen2.5-VL (``pixel_values_videos``,
``video_grid_thw``, the video token) and LLaVA-OneVision (frames).

The processors are the families' real classes (their token expansion, their ``mm_token_type_ids``) with the
video part built by hand (`tests.fixtures.family_checkpoints.QwenVideoStandIn` / `OneVisionVideoStandIn`): every
transformers video processor needs torchvision, which does not import on these CPU machines. Without it the
pipeline stops with the install line (tested here too). The stand-ins are checked against the real video
processors, where torchvision works, in ``test_real_video_processors.py`` (``scripts/check_video_processors.sh``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from libra_train import LibraConfig, apply_libra
from libra_train.data import IGNORE_INDEX, BadSamplesError, DataError, build_dataset, collate
from libra_train.inference.generation import Query, build_inputs, generate
from libra_train.plugin import libra_runtime
from tests.fixtures.family_checkpoints import (
    QwenVideoStandIn,
    build_model,
    build_processor,
    family_tokenizer,
    onevision_frame_tokens,
    with_video_standin,
    write_image,
)

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
QUESTION = "what colour is the shape ?"
CFG = LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9, unit="frame")


def _video_record(sid: str, frames: list[str] | str, answer: str = "red circle") -> dict:
    turns = [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": answer}]
    return {"id": sid, "video": frames, "conversations": turns}


def _image_record(sid: str, image: str, answer: str = "blue") -> dict:
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]
    return {"id": sid, "image": image, "conversations": turns}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Frames f0..f5 (16 px), an image (16 px) and a wide image (32 x 12)."""
    root = tmp_path_factory.mktemp("video")
    for i in range(6):
        write_image(root / f"f{i}.png", (16, 16), seed=i)
    write_image(root / "a.png", (16, 16), seed=10)
    write_image(root / "wide.png", (32, 12), seed=11)
    return root


def _dataset(folder: Path, records: list[dict], processor, name: str = "data.json", **kwargs):
    path = folder / name
    path.write_text(json.dumps(records))
    return build_dataset(
        path, processor, image_folder=folder, template="chat_template", max_length=512, **kwargs
    )


def _processor(family: str):
    return with_video_standin(build_processor(family, family_tokenizer()))


def _expected_video_tokens(family: str, processor, frames: int) -> int:
    if family == "llava_onevision":  # pooled frames, then one image_newline after the last
        return frames * onevision_frame_tokens(processor) + 1
    # 16 px frames: 8 x 8 patches, 2 x 2 merged: 16 tokens per temporal group of 2 frames (the last padded)
    return math.ceil(frames / 2) * 16


# -- encoding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [3, 4])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_record_encodes_with_its_video_tokens(folder, family, frames):
    processor = _processor(family)
    tok = processor.tokenizer
    dataset = _dataset(folder, [_video_record("v", [f"f{i}.png" for i in range(frames)])], processor)
    sample = dataset[0]
    video_id = tok.convert_tokens_to_ids("<video>")
    is_video = sample["input_ids"] == video_id
    assert int(is_video.sum()) == _expected_video_tokens(family, processor, frames)
    run = is_video.nonzero().flatten()
    assert torch.equal(run, torch.arange(run[0], run[0] + len(run)))  # one contiguous run
    assert tok.convert_ids_to_tokens(sample["labels"][sample["labels"] != IGNORE_INDEX]) == [
        "red",
        "circle",
        "<|im_end|>",
    ]
    assert "pixel_values" not in sample and "pixel_values_videos" in sample
    if family == "llava_onevision":
        assert sample["pixel_values_videos"].shape == (1, frames, 3, 16, 16)
    else:
        assert sample["video_grid_thw"].tolist() == [[math.ceil(frames / 2), 8, 8]]
        assert torch.equal(sample["mm_token_type_ids"] == 2, is_video)  # what M-RoPE reads


def test_hf_messages_video_part(folder):
    processor = _processor("qwen2_5_vl")
    record = {
        "id": "hf",
        "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "red circle"},
        ],
        "videos": [["f0.png", "f1.png"]],
    }
    sample = _dataset(folder, [record], processor, "hf.json")[0]
    assert int((sample["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum()) == 16


def test_video_file_goes_to_the_processor_resolved(folder, monkeypatch):
    processor = _processor("qwen2_5_vl")
    (folder / "clip.mp4").write_bytes(b"not decoded here")
    seen = []
    frames = [Image.open(folder / f"f{i}.png") for i in range(2)]

    def decode(self, videos, **kwargs):  # the real video part decodes and samples the file
        seen.extend(videos)
        return call(self, [frames if isinstance(v, str) else v for v in videos], **kwargs)

    call = QwenVideoStandIn.__call__
    monkeypatch.setattr(QwenVideoStandIn, "__call__", decode)
    sample = _dataset(folder, [_video_record("file", "clip.mp4")], processor, "file.json")[0]
    assert seen == [str(folder / "clip.mp4")]
    assert sample["video_grid_thw"].tolist() == [[1, 8, 8]]


# -- bad video input ----------------------------------------------------------------------------------------------
BAD = {
    "missing_video": _video_record("no-frame", ["f0.png", "gone.png"]),
    "bad_video": _video_record("empty", []),
    "video_count_mismatch": {
        "id": "two-placeholders",
        "video": ["f0.png"],
        "conversations": [{"from": "human", "value": "<video> <video> q"}, {"from": "gpt", "value": "a"}],
    },
}


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_video_is_an_error_naming_the_sample(folder, reason):
    processor = _processor("qwen2_5_vl")
    records = [BAD[reason], _image_record("fine", "a.png")]
    with pytest.raises(BadSamplesError) as info:
        _dataset(folder, records, processor, f"bad-{reason}.json")
    (problem,) = info.value.problems
    assert problem.reason == reason and problem.sample_id == BAD[reason]["id"]
    assert BAD[reason]["id"] in str(info.value) and "data.skip_bad_samples=true" in str(info.value)
    if reason == "missing_video":
        assert "gone.png not found" in str(problem)


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_video_is_skipped_and_counted(folder, reason):
    processor = _processor("qwen2_5_vl")
    records = [BAD[reason], _image_record("fine", "a.png")]
    dataset = _dataset(folder, records, processor, f"skip-{reason}.json", skip_bad_samples=True)
    assert len(dataset) == 1 and dataset.skipped == {reason: 1} and dataset.skipped_ids == [BAD[reason]["id"]]


def test_frame_lost_after_the_precheck(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"g{i}.png", seed=i)
    write_image(tmp_path / "a.png", seed=5)
    processor = _processor("qwen2_5_vl")
    records = [_video_record("late", ["g0.png", "g1.png"]), _image_record("fine", "a.png")]
    lenient = _dataset(tmp_path, records, processor, "lenient.json", skip_bad_samples=True)
    strict = _dataset(tmp_path, records, processor, "strict.json")
    (tmp_path / "g1.png").unlink()
    with pytest.raises(DataError, match=r"'late'.*g1.png not found"):
        strict[0]
    item = lenient[0]  # the next sample that loads stands in, counted
    assert "pixel_values" in item and lenient.skipped == {"missing_video": 1}


def test_without_a_video_processor_the_error_says_what_to_install(folder):
    processor = build_processor("qwen2_5_vl", family_tokenizer())  # loaded without torchvision
    with pytest.raises(ImportError, match=r"sample 'v'.*pip install torchvision -c constraints.txt"):
        _dataset(folder, [_video_record("v", ["f0.png", "f1.png"])], processor, "novideo.json")


def test_image_only_family_and_vicuna_template_refuse_videos(folder):
    from libra_train.models import build_tiny_llava

    _, llava = build_tiny_llava()
    with pytest.raises(ValueError, match="LlavaProcessor takes no videos"):
        _dataset(folder, [_video_record("v", ["f0.png"])], llava, "llava.json")
    with pytest.raises(ValueError, match="data.template=chat_template"):
        path = folder / "vicuna.json"
        path.write_text(json.dumps([_video_record("v", ["f0.png"])]))
        build_dataset(path, _processor("qwen2_5_vl"), image_folder=folder, template="vicuna_v1")


def test_onevision_videos_of_different_lengths_cannot_share_a_batch(folder):
    processor = _processor("llava_onevision")
    records = [
        _video_record("three", ["f0.png", "f1.png", "f2.png"]),
        _video_record("two", ["f0.png", "f1.png"]),
    ]
    dataset = _dataset(folder, records, processor, "ov-lengths.json")
    with pytest.raises(ValueError, match=r"videos with \[2, 3\] frames in one batch"):
        collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)


# -- training and generation under compression ---------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_next_to_image_batched_equals_per_sample_loss(folder, family):
    processor = _processor(family)
    tok = processor.tokenizer
    records = [_video_record("v", [f"f{i}.png" for i in range(4)]), _image_record("i", "wide.png")]
    dataset = _dataset(folder, records, processor, f"train-{family}.json")
    samples = [dataset[0], dataset[1]]
    model = apply_libra(build_model(family, tok), CFG)
    batch = collate(samples, tok.pad_token_id)
    assert (
        "pixel_values_videos" in batch and "pixel_values" in batch
    )  # a video sample next to an image sample
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        out = model(**batch)
    kept = libra_runtime(model).last_visual_tokens
    assert (kept[-1] < kept[0]).all()  # both samples compressed
    alone = 0.0
    for sample in samples:
        with torch.no_grad():
            alone = alone + model(**collate([sample], tok.pad_token_id), num_items_in_batch=total).loss
    torch.testing.assert_close(out.loss, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_generation_with_a_video_query_equals_it_alone(folder, family):
    processor = _processor(family)
    model = apply_libra(build_model(family, processor.tokenizer), CFG)
    frames = [str(folder / f"f{i}.png") for i in range(4)]
    queries = [Query.single(QUESTION, video=frames, id="v"), Query.single(QUESTION, str(folder / "a.png"))]
    inputs = build_inputs(processor, queries[:1], "chat_template")
    assert "pixel_values_videos" in inputs
    together = generate(model, processor, queries, template="chat_template", max_new_tokens=4)
    for query, got in zip(queries, together):
        (alone,) = generate(model, processor, [query], template="chat_template", max_new_tokens=4)
        assert got.token_ids == alone.token_ids and got.visual_tokens == alone.visual_tokens
    assert together[0].visual_tokens[0] == _expected_video_tokens(family, processor, 4)
    assert together[0].visual_tokens[-1] < together[0].visual_tokens[0]


def test_video_cut_by_max_length_is_found_when_encoded(folder):
    # The pre-check cannot count a video's tokens (the processor samples the frames), so the cut is found by
    # `encode`: an error naming the sample, or skipped and counted under data.skip_bad_samples=true.
    processor = _processor("qwen2_5_vl")
    records = [_video_record("long", [f"f{i}.png" for i in range(4)]), _image_record("fine", "a.png")]
    path = folder / "long.json"
    path.write_text(json.dumps(records))
    kwargs = dict(
        image_folder=folder, template="chat_template", max_length=34
    )  # the video: 32 tokens from position 4
    strict = build_dataset(path, processor, **kwargs)
    with pytest.raises(
        DataError, match=r"'long'.*image / video tokens expanded; max_length=34 would cut them"
    ) as info:
        strict[0]
    assert info.value.reason == "image_truncated"
    lenient = build_dataset(path, processor, skip_bad_samples=True, **kwargs)
    assert "pixel_values" in lenient[0] and lenient.skipped == {"image_truncated": 1}
