"""Video records through the families' *real* video processors (transformers' ``Qwen2VLVideoProcessor``,
``Qwen3VLVideoProcessor``, ``LlavaOnevisionVideoProcessor``), which need torchvision.

On the CPU machines torchvision does not import beside torch 2.13, so these tests are skipped there and the
other video tests use hand-built stand-ins (``tests/fixtures/family_checkpoints.py``). Here the stand-ins are
checked against the real processors, and every video family (Qwen3-VL too: per-frame runs with timestamp text,
frames sampled by the processor) trains and generates from video records and a real video file (also through
the lmms-eval ``libra`` model). Run them with
``bash scripts/check_video_processors.sh`` (a separate venv with torch 2.14.1 + torchvision 0.29.1, ~6 GB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from libra_train import LibraConfig, apply_libra
from libra_train.data import IGNORE_INDEX, build_dataset, collate
from libra_train.inference.generation import Query, generate
from libra_train.models import load_processor
from libra_train.plugin import libra_runtime
from tests.fixtures.family_checkpoints import (
    FAMILIES,
    build_model,
    build_processor,
    build_processor_with_video,
    onevision_frame_tokens,
    save_family_checkpoint,
    torchvision_works,
    with_video_standin,
    write_image,
)

pytestmark = pytest.mark.skipif(
    not torchvision_works(),
    reason="torchvision does not import here (CPU torch 2.13); run bash scripts/check_video_processors.sh",
)

QUESTION = "what colour is the shape ?"
CFG = LibraConfig(layers=[2, 3], ratio=0.5, theta=0.9, unit="frame")  # Qwen3-VL: points after its DeepStack


def _record(sid: str, kind: str, media) -> dict:
    turns = [{"from": "human", "value": f"<{kind}>\n{QUESTION}"}, {"from": "gpt", "value": "red circle"}]
    return {"id": sid, kind: media, "conversations": turns}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real-video")
    for i in range(6):
        write_image(root / f"f{i}.png", (16, 16), seed=i)
    write_image(root / "a.png", (16, 16), seed=10)
    return root


def _dataset(folder: Path, records: list[dict], processor, name: str):
    path = folder / name
    path.write_text(json.dumps(records))
    return build_dataset(path, processor, image_folder=folder, template="chat_template", max_length=512)


def _frames(folder: Path, n: int):
    from PIL import Image

    return [Image.open(folder / f"f{i}.png").convert("RGB") for i in range(n)]


@pytest.mark.parametrize("frames", [3, 4])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_the_standins_equal_the_real_video_processors(folder, family, frames):
    """What the CPU tests feed the models is what the real processors produce (same layout, same values)."""
    real = build_processor_with_video(family).video_processor(
        videos=[_frames(folder, frames)], return_tensors="pt"
    )
    standin = with_video_standin(build_processor(family)).video_processor([_frames(folder, frames)])
    assert set(real.keys()) >= {"pixel_values_videos"}
    for key in ("pixel_values_videos", "video_grid_thw"):
        if key in real:
            expected = torch.as_tensor(np.asarray(standin[key]))
            assert real[key].shape == expected.shape, key
            torch.testing.assert_close(real[key].to(expected.dtype), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_and_image_records_train_through_the_real_processor(folder, family):
    """Encode a 4-frame video record and an image record, batch them, and train one step with Libra: the video
    tokens are the ones the processor expanded, both samples compress, the batch equals its samples alone."""
    processor = build_processor_with_video(family)
    tok = processor.tokenizer
    records = [_record("v", "video", [f"f{i}.png" for i in range(4)]), _record("i", "image", "a.png")]
    dataset = _dataset(folder, records, processor, f"train-{family}.json")
    video = dataset[0]
    is_video = video["input_ids"] == tok.convert_tokens_to_ids("<video>")
    if family == "llava_onevision":  # 4 pooled frames, then one newline
        assert int(is_video.sum()) == 4 * onevision_frame_tokens(processor) + 1
    else:  # 16 px frames: 8 x 8 patches, 2 x 2 merged, 2 frames per temporal group
        assert video["video_grid_thw"].tolist() == [[2, 8, 8]]
        assert int(is_video.sum()) == 2 * 16
        assert torch.equal(video["mm_token_type_ids"] == 2, is_video)
    if family == "qwen3_vl":  # one run per temporal group, each after its "<t seconds>" text
        starts = (is_video.int().diff(prepend=torch.zeros(1, dtype=torch.int)) == 1).nonzero().flatten()
        assert len(starts) == 2
        between = tok.convert_ids_to_tokens(video["input_ids"][starts[0] + 16 : starts[1]])
        assert between[0] == "<|vision_end|>" and between[-1] == "<|vision_start|>" and len(between) > 2
    answer = tok.convert_ids_to_tokens(video["labels"][video["labels"] != IGNORE_INDEX])
    assert answer == ["red", "circle", "<|im_end|>"]

    model = apply_libra(build_model(family, tok), CFG)
    batch = collate([dataset[0], dataset[1]], tok.pad_token_id)
    out = model(**batch)
    kept = libra_runtime(model).last_visual_tokens
    assert (kept[-1] < kept[0]).all()  # the video and the image sample compressed
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        alone = sum(model(**collate([s], tok.pad_token_id), num_items_in_batch=total).loss for s in dataset)
    torch.testing.assert_close(out.loss.detach(), alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "llava_onevision"])
def test_generation_from_a_video_query_equals_it_alone(folder, family):
    processor = build_processor_with_video(family)
    model = apply_libra(build_model(family, processor.tokenizer), CFG)
    frames = [str(folder / f"f{i}.png") for i in range(4)]
    queries = [Query.single(QUESTION, video=frames, id="v"), Query.single(QUESTION, str(folder / "a.png"))]
    together = generate(model, processor, queries, template="chat_template", max_new_tokens=4)
    for query, got in zip(queries, together):
        (alone,) = generate(model, processor, [query], template="chat_template", max_new_tokens=4)
        assert got.token_ids == alone.token_ids and got.visual_tokens == alone.visual_tokens
    assert together[0].visual_tokens[-1] < together[0].visual_tokens[0]


def _write_clip(path: Path, frames: int = 8, fps: int = 4, size: int = 16) -> Path:
    av = pytest.importorskip("av")
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_a_video_file_is_decoded_and_sampled_by_the_processor(folder, family):
    """An .mp4 record: the processor decodes it (PyAV) and samples its frames; Qwen3-VL's timestamps come from
    the file's frame rate. The sample trains."""
    _write_clip(folder / "clip.mp4")
    processor = build_processor_with_video(family)
    tok = processor.tokenizer
    dataset = _dataset(folder, [_record("clip", "video", "clip.mp4")], processor, f"clip-{family}.json")
    sample = dataset[0]
    n_video = int((sample["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum())
    if family == "llava_onevision":
        frames = sample["pixel_values_videos"].shape[1]
        assert n_video == frames * onevision_frame_tokens(processor) + 1
    else:
        t, h, w = sample["video_grid_thw"][0].tolist()
        assert n_video == t * h * w // 4 and t >= 1
    model = apply_libra(build_model(family, tok), CFG)
    out = model(**collate([sample], tok.pad_token_id))
    assert torch.isfinite(out.loss)
    assert libra_runtime(model).last_visual_tokens[-1][0] < n_video


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_checkpoint_loads_its_real_video_processor(tmp_path, folder, family):
    """Where torchvision works, `load_processor` gives the full processor, its video part configured from the
    checkpoint (not transformers' defaults, which would not match the tower), and video records encode."""
    path = save_family_checkpoint(family, tmp_path / family)
    processor = load_processor(path)
    assert not getattr(processor, "libra_video_missing", False)
    if family != "llava_onevision":
        assert processor.video_processor.patch_size == 2
    dataset = _dataset(
        folder, [_record("v", "video", [f"f{i}.png" for i in range(4)])], processor, "ckpt.json"
    )
    sample = dataset[0]
    model = build_model(family, processor.tokenizer)
    with torch.no_grad():
        assert torch.isfinite(model(**collate([sample], processor.tokenizer.pad_token_id)).loss)


def test_a_video_file_without_a_decoder_stops_at_the_precheck(folder, monkeypatch):
    """Without torchcodec + FFmpeg the real processor cannot decode files: the run stops before its first step,
    naming the sample and what to install (frame lists still work)."""
    import libra_train.data.encode as encode

    _write_clip(folder / "clip.mp4")
    monkeypatch.setattr(encode, "video_decoder_available", lambda: False)
    processor = build_processor_with_video("qwen2_5_vl")
    records = [_record("frames", "video", ["f0.png", "f1.png"]), _record("clip", "video", "clip.mp4")]
    with pytest.raises(ImportError, match=r"sample 'clip'.*clip\.mp4.*pip install torchcodec"):
        _dataset(folder, records, processor, "no-decoder.json")
    assert _dataset(folder, records[:1], processor, "frames-only.json")[0]["video_grid_thw"].tolist() == [
        [1, 8, 8]
    ]


def test_lmms_eval_video_file_requests_are_decoded_and_compressed(folder, tmp_path):
    """lmms-eval's video tasks hand ``doc_to_visual`` video paths: the ``libra`` model loads a saved checkpoint
    with its real video part, which decodes and samples the file; the video is compressed."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh")
    from lmms_eval.api.instance import Instance

    from libra_train.integrations.lmms_eval import LibraLMM

    clip = str(_write_clip(folder / "clip.mp4"))
    path = save_family_checkpoint("qwen3_vl", tmp_path / "qwen3_vl")
    lm = LibraLMM(pretrained=str(path), method="libra", layers=[2, 3], ratio=0.5, unit="frame")
    lm.task_dict = {"clips": {"test": [{"video": clip}]}}
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": []}
    args = (QUESTION, gen, lambda doc: [doc["video"]], 0, "clips", "test")
    (answer,) = lm.generate_until(
        [Instance("generate_until", args, idx=0, metadata={"task": "clips", "doc_id": 0, "repeats": 1})]
    )
    assert isinstance(answer, str)
    (tokens,) = lm.visual_tokens.rows["clips"]
    assert tokens[0] > 0 and tokens[-1] < tokens[0]
