"""The chat_template path with a tiny LLaVA-NeXT: aspect-dependent visual counts, image_sizes, padded tiles.

(Qwen2-VL's processor cannot be built here: it needs torchvision for its video processor.)
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from libra_train.data import IGNORE_INDEX, build_dataset, collate
from libra_train.models import build_tiny_tokenizer

PINPOINTS = [[32, 64], [64, 32], [64, 64]]
Q = "what colour is the shape at row 1 column 1 ?"


def _sample(sid: str, images: list[str], answer: str) -> dict:
    question = "<image>\n" * len(images) + Q
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": sid, "conversations": turns} | ({"image": images} if images else {})


@pytest.fixture(scope="module")
def tiny_next():
    tok = build_tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=4,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval(), processor


def test_llava_next_batch(tiny_next, tmp_path, write_records):
    model, processor = tiny_next
    Image.new("RGB", (64, 32), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40), "green").save(tmp_path / "square.png")
    records = [
        _sample("wide", ["wide.png"], "red"),
        _sample("text", [], "blue"),
        _sample("square", ["square.png"], "green"),
    ]
    ds = build_dataset(write_records(tmp_path, records), processor, template="chat_template", max_length=512)
    items = [ds[i] for i in range(3)]
    assert ds.lengths == [len(it["input_ids"]) for it in items]  # the pre-check counts visual tokens right
    n_visual = [int((it["input_ids"] == 4).sum()) for it in items]
    assert n_visual[1] == 0 and n_visual[0] != n_visual[2]  # depends on the aspect ratio
    assert items[0]["image_sizes"].tolist() == [[32, 64]] and items[2]["pixel_values"].shape[1] == 5
    batch = collate(items, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["image_sizes"].tolist() == [[32, 64], [40, 40]]
    with torch.no_grad():
        loss = model(**batch).loss
        singles = [model(**collate([it], 3)).loss for it in items]
    counts = [int((it["labels"] != IGNORE_INDEX).sum()) for it in items]
    assert torch.allclose(loss, sum(s * n for s, n in zip(singles, counts)) / sum(counts), atol=1e-5)


def test_llava_next_vicuna_v1_splices_the_processors_image_runs(tiny_next, tmp_path, write_records):
    # vicuna_v1 (LLaVA-NeXT-Vicuna's template) tokenizes the text between images itself and takes each image's
    # tokens from the processor: the aspect-dependent counts, the pre-check and the chat_template path agree
    # (the word-level tokenizer has no dummy prefix, so the two templates give the same ids here).
    _, processor = tiny_next
    Image.new("RGB", (64, 32), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (32, 64), "blue").save(tmp_path / "tall.png")
    records = [_sample("two", ["wide.png", "tall.png"], "red"), _sample("one", ["tall.png"], "blue")]
    path = write_records(tmp_path, records)
    kw = dict(max_length=512, pad_to_square=False)
    vicuna = build_dataset(path, processor, template="vicuna_v1", **kw)
    jinja = build_dataset(path, processor, template="chat_template", **kw)
    for i in range(2):
        a, b = vicuna[i], jinja[i]
        assert vicuna.lengths[i] == len(a["input_ids"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int((vicuna[0]["input_ids"] == 4).sum()) > int((vicuna[1]["input_ids"] == 4).sum())
