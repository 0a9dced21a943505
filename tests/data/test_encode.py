"""Exact ids and labels of the committed fixture with the tiny tokenizer, and template equivalences.

How the pinned numbers were checked: the ids were decoded token by token (`convert_ids_to_tokens`) and read
against LLaVA-1.5's vicuna_v1 prompt: ``<s>`` + system + `` USER: <image>\\n`` + question + `` ASSISTANT: `` +
answer + ``</s>`` (+ ``USER: ...`` for the next round); the word-level tokenizer drops whitespace, and the one
``<image>`` becomes 36 copies of id 4 ((48 / 8)^2). The trained positions decode to exactly the answers and
their ``</s>`` (LLaVA's `preprocess_v1` masking); everything else is -100. The pinned ids depend on the tiny
vocabulary (sorted words of the vicuna system prompt and the demo generator): if that changes, re-derive
them the same way.
"""

from __future__ import annotations

import pytest
import torch

from libra_train.data import IGNORE_INDEX, build_dataset
from libra_train.data.encode import labels_from_offsets, shift_spans

IMG = [4] * 36
# fmt: off
# "<s> A chat between ... the user ' s questions . USER :"  (32 tokens shared by every sample)
PREFIX = [1, 30, 46, 44, 34, 51, 75, 37, 36, 40, 58, 41, 7, 32, 41, 53, 55, 6, 52, 6, 37, 62, 38, 73, 71, 75, 5, 67,
          64, 7, 33, 26]
EXPECTED = {  # sample id -> (input_ids, {position: label} for the trained positions; all others are -100)
    # "<image> what colour is the shape at row 1 column 2 ? ASSISTANT : red </s>" (<image> moved to the front)
    "img_one": (PREFIX + IMG + [76, 48, 59, 71, 68, 42, 66, 9, 49, 18, 29, 31, 26, 65, 2], {81: 65, 82: 2}),
    # "what number comes after 4 ? ASSISTANT : 5 </s>"
    "text_only": (PREFIX + [76, 61, 50, 35, 20, 29, 31, 26, 21, 2], {40: 21, 41: 2}),
    # "<image> what shape is at row 2 column 2 ? ASSISTANT : circle </s>
    #  USER : how many blue shapes are there ? ASSISTANT : 2 </s>"
    "multi_turn": (
        PREFIX + IMG + [76, 68, 59, 42, 66, 18, 49, 18, 29, 31, 26, 47, 2,
                        33, 26, 56, 60, 45, 69, 39, 72, 29, 31, 26, 18, 2],
        {79: 47, 80: 2, 92: 18, 93: 2},
    ),
}
# fmt: on


def _labels(n: int, trained: dict[int, int]) -> list[int]:
    return [trained.get(i, IGNORE_INDEX) for i in range(n)]


@pytest.fixture
def fixture_ds(tiny, sample_dir):
    return build_dataset(sample_dir / "llava_small.json", tiny[1], max_length=256)


def test_pinned_ids_and_labels(fixture_ds, tiny):
    assert [fixture_ds.record(i).id for i in range(len(fixture_ds))] == list(EXPECTED)
    for i, (ids, trained) in enumerate(EXPECTED.values()):
        item = fixture_ds[i]
        assert item["input_ids"].tolist() == ids
        assert item["labels"].tolist() == _labels(len(ids), trained)
        assert item["attention_mask"].tolist() == [1] * len(ids)
    tok = tiny[1].tokenizer
    trained = fixture_ds[2]["labels"][fixture_ds[2]["labels"] != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained.tolist()) == ["circle", "</s>", "2", "</s>"]


def test_image_tokens_and_pixels(fixture_ds, tiny):
    model, processor = tiny
    n_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert n_tokens == 36
    for i, has_image in enumerate([True, False, True]):
        item = fixture_ds[i]
        assert int((item["input_ids"] == model.config.image_token_id).sum()) == (n_tokens if has_image else 0)
        assert ("pixel_values" in item) == has_image
        if has_image:
            assert item["pixel_values"].shape == (1, 3, 48, 48)


def test_precheck_lengths_equal_encoded_lengths(fixture_ds):
    assert fixture_ds.lengths == [len(fixture_ds[i]["input_ids"]) for i in range(3)]
    assert fixture_ds.modality_lengths == [83, -42, 94]


def test_hf_messages_equal_llava_format(tiny, sample_dir):
    llava = build_dataset(sample_dir / "llava_small.json", tiny[1], max_length=256)
    hf = build_dataset(sample_dir / "hf_small.jsonl", tiny[1], max_length=256)
    assert len(hf) == len(llava) == 3
    for a, b in zip(llava, hf):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_chat_template_path_equals_vicuna_v1(tiny, sample_dir):
    # The tiny processor's Jinja template renders vicuna_v1 exactly, so the prefix-by-prefix span search
    # must land on the same label boundaries as the direct vicuna_v1 rendering.
    kw = dict(max_length=256, pad_to_square=True)
    direct = build_dataset(sample_dir / "llava_small.json", tiny[1], template="vicuna_v1", **kw)
    jinja = build_dataset(sample_dir / "llava_small.json", tiny[1], template="chat_template", **kw)
    for a, b in zip(direct, jinja):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_chat_template_with_other_layout(tiny, sample_dir):
    # A ChatML-like layout: each turn "<s> role \n content </s> \n"; the assistant span is the answer and its
    # "</s>\n" (end-of-turn), found by rendering prefixes.
    processor = tiny[1]
    saved = processor.chat_template
    processor.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    try:
        ds = build_dataset(sample_dir / "llava_small.json", processor, template="chat_template")
        labels = ds[2]["labels"]
        words = processor.tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
        assert words == ["circle", "</s>", "2", "</s>"]
        processor.chat_template = (
            "{% for m in messages|reverse %}{{ m['role'] }}{% endfor %}"  # not prefix-stable
        )
        with pytest.raises(ValueError, match="prefix"):
            build_dataset(sample_dir / "llava_small.json", processor, template="chat_template")
    finally:
        processor.chat_template = saved


def test_span_helpers():
    # "ab<image>cd": replacing <image> (chars 2..9) by 3 x "<image>" (21 chars) shifts later spans by 14.
    assert shift_spans([(0, 2), (9, 11)], [(2, 9, 21)]) == [(0, 2), (23, 25)]
    # Tokens are trained iff they start inside a span; empty (added BOS) tokens never are.
    assert labels_from_offsets([1, 5, 6, 7], [(0, 0), (0, 2), (2, 4), (4, 6)], [(2, 6)]) == [-100, -100, 6, 7]


def test_generation_prompt(fixture_ds, tiny):
    model, processor = tiny
    inputs, reference = fixture_ds.encoder.encode_prompt(fixture_ds.record(2))
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    # the second round's question, then "ASSISTANT:" and nothing of the answer
    assert reference == "2" and tokens[-9:] == [
        "how",
        "many",
        "blue",
        "shapes",
        "are",
        "there",
        "?",
        "ASSISTANT",
        ":",
    ]
    assert tokens.count("<image>") == 36 and inputs["pixel_values"].shape == (1, 3, 48, 48)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)
