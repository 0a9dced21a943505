"""Token ids and labels exactly as LLaVA-1.5 trained, on the real Llama-2 tokenizer and a llava-hf processor.

The expected ids come from LLaVA's own algorithm, re-written here from its published description and kept apart
from libra_train's encoder: `llava/conversation.py` ``conv_vicuna_v1`` (SeparatorStyle.TWO) builds the prompt
after `llava/train/train.py` ``preprocess_multimodal`` moved the image to the front of its turn;
`llava/mm_utils.py` ``tokenizer_image_token`` tokenizes the text between images piece by piece
(IMAGE_TOKEN_INDEX = -200 in between); ``preprocess_v1`` masks each round's instruction, with the
``not tokenizer.legacy`` round-length correction, and masks a whole sample on a length mismatch. A llava-hf
checkpoint then has 576 copies of ``<image>`` (id 32000) where LLaVA has one -200. The reference itself is
pinned on ids that SOURCE.md of the tokenizer fixture checked against real SentencePiece.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from libra_train.data import IGNORE_INDEX, build_dataset
from libra_train.data.encode import Encoder
from libra_train.data.records import Record
from libra_train.data.templates import VICUNA_V1_JINJA
from libra_train.inference.generation import Query, build_inputs
from tests.fixtures.llava15 import IMAGE_TOKEN_ID, IMAGE_TOKENS, PAD_TOKEN_ID, llava15_processor

LLAVA_IMAGE_INDEX = -200  # llava/constants.py IMAGE_TOKEN_INDEX
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP, SEP2 = " ", "</s>"


# -- LLaVA's algorithm (reference) ------------------------------------------------------------------------------
def llava_prompt(conversations: list[dict], has_image: bool, generation: bool = False) -> str:
    """preprocess_multimodal + conv_vicuna_v1.get_prompt (``generation``: an empty last ASSISTANT message)."""
    messages = []
    for sentence in conversations:
        value = sentence["value"]
        if has_image and "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        messages.append((ROLES[sentence["from"]], value))
    if generation:
        messages.append(("ASSISTANT", None))
    out = SYSTEM + SEP
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}{(SEP, SEP2)[i % 2]}" if message else f"{role}:"
    return out


def llava_tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """mm_utils.tokenizer_image_token: tokenize the chunks between <image> separately, -200 in between."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(LLAVA_IMAGE_INDEX)
        ids += chunk[offset:]
    return ids


def llava_preprocess_v1(prompt: str, tokenizer, has_image: bool) -> tuple[list[int], list[int]]:
    """train.preprocess_v1 for one conversation: (input_ids, labels), LLaVA's ids (-200 for an image)."""

    def tokens(text: str) -> list[int]:
        return llava_tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    ids = tokens(prompt)
    labels = list(ids)
    sep = SEP + ROLES["gpt"] + ": "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(prompt.split(SEP2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(tokens(rou)), len(tokens(parts[0])) - 2
        if i != 0 and not tokenizer.legacy:  # IS_TOKENIZER_GREATER_THAN_0_14
            round_len -= 1
            instruction_len -= 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), f"LLaVA would mask this sample (tokenization mismatch {cur} vs {len(ids)})"
    return ids, labels


def as_llava_hf(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A llava-hf checkpoint's view: each -200 becomes 576 x <image> (32000), labels -100."""
    out_ids, out_labels = [], []
    for t, y in zip(ids, labels):
        n = IMAGE_TOKENS if t == LLAVA_IMAGE_INDEX else 1
        out_ids += [IMAGE_TOKEN_ID] * n if t == LLAVA_IMAGE_INDEX else [t]
        out_labels += [IGNORE_INDEX] * n if t == LLAVA_IMAGE_INDEX else [y]
    return out_ids, out_labels


def reference(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    has_image = "image" in record
    return as_llava_hf(
        *llava_preprocess_v1(llava_prompt(record["conversations"], has_image), tokenizer, has_image)
    )


# -- fixtures ---------------------------------------------------------------------------------------------------
def _turns(*pairs: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(pairs)]


RECORDS = [
    {
        "id": "single",
        "image": "a.png",
        "conversations": _turns("<image>\nWhat is in the image?", "A red square."),
    },
    {  # placeholder at the end of the turn (LLaVA moves it to the front)
        "id": "image_last",
        "image": "b.png",
        "conversations": _turns("Describe the picture briefly.\n<image>", "Two blue circles on white."),
    },
    {
        "id": "four_rounds",
        "image": "a.png",
        "conversations": _turns(
            "<image>\nHow many shapes are there?",
            "2",
            "What colour is the left one?",
            "Red, like a tomato.",
            "Is it bigger than the other?",
            "No, they are the same size.",
            "Answer in one word: shape?",
            "Square",
        ),
    },  # fmt: skip
    {
        "id": "text_only",
        "conversations": _turns(
            "What is the capital of France?",
            "Paris.",
            "And of Japan?",
            "Tokyo.",
            "Which is further north?",
            "Paris is further north than Tokyo.",
        ),
    },  # fmt: skip
    {
        "id": "digits_cjk",
        "image": "b.png",
        "conversations": _turns(
            "<image>\nWhat year was this taken?",
            "1984, judging by the colours.",
            "用中文描述这张图片。",
            "图片中有两个蓝色的圆圈。",
            "几个？",
            "2个",
        ),
    },  # fmt: skip
    {
        "id": "code_newlines",
        "conversations": _turns(
            "Write a Python function that adds one.\nKeep it short.",
            "```python\ndef add_one(x):\n    return x + 1\n```\n\nIt returns x + 1.",
            "And in C?",
            "```c\nint add_one(int x) { return x + 1; }\n```",
        ),
    },  # fmt: skip
    {
        "id": "unicode",
        "image": "a.png",
        "conversations": _turns(
            "<image>\nCafé ☕ or thé 🍵? Réponds en français — s'il te plaît.",
            "Le café ☕, sans hésiter 👍🏽 (naïve «choix»).",
            "Say it in Arabic and Greek.",
            "القهوة — ο καφές.",
        ),
    },  # fmt: skip
]


@pytest.fixture(scope="module")
def processor():
    return llava15_processor()


@pytest.fixture
def llava_dir(tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (30, 60, 200)).save(tmp_path / "b.png")
    (tmp_path / "llava.json").write_text(json.dumps(RECORDS, ensure_ascii=False))
    return tmp_path


# -- tests ------------------------------------------------------------------------------------------------------
def test_reference_reproduces_sentencepiece_ids(processor):
    # SOURCE.md of the fixture, checked with real sentencepiece: LLaVA's split puts 29871 ("▁") after the image.
    ids = llava_tokenizer_image_token("USER: <image>\nWhat is in the image? ASSISTANT:", processor.tokenizer)
    assert ids == [1, 3148, 1001, 29901, 29871, -200, 29871, 13, 5618, 338, 297, 278, 1967, 29973,
                   319, 1799, 9047, 13566, 29901]  # fmt: skip


@pytest.mark.parametrize("index", range(len(RECORDS)), ids=[r["id"] for r in RECORDS])
def test_vicuna_v1_ids_and_labels_equal_llava(processor, llava_dir, index):
    ds = build_dataset(llava_dir / "llava.json", processor, template="vicuna_v1", max_length=4096)
    assert ds.record(index).id == RECORDS[index]["id"]
    item = ds[index]
    ids, labels = reference(RECORDS[index], processor.tokenizer)
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    assert item["attention_mask"].tolist() == [1] * len(ids)
    assert ds.lengths[index] == len(ids)  # the pre-check counts the same tokens
    if "image" in RECORDS[index]:
        assert item["pixel_values"].shape == (1, 3, 336, 336)
        first = ids.index(IMAGE_TOKEN_ID)
        assert ids[first + IMAGE_TOKENS] == 29871 and labels[first + IMAGE_TOKENS] == IGNORE_INDEX


def test_labels_are_each_answer_and_its_eos(processor, llava_dir):
    ds = build_dataset(llava_dir / "llava.json", processor, max_length=4096)
    tok = processor.tokenizer
    for index, record in enumerate(RECORDS):
        labels = ds[index]["labels"]
        trained = tok.decode(labels[labels != IGNORE_INDEX].tolist())
        answers = [t["value"] for t in record["conversations"][1::2]]
        assert trained.replace(" ", "") == "".join(a + "</s>" for a in answers).replace(" ", "")


def test_generation_prompt_equals_llava_eval(processor, llava_dir):
    # LLaVA's eval scripts: conv with an empty ASSISTANT message, then tokenizer_image_token.
    record = RECORDS[4]
    turns = record["conversations"][:3]
    expected = llava_tokenizer_image_token(llava_prompt(turns, True, generation=True), processor.tokenizer)
    expected = as_llava_hf(expected, expected)[0]
    query = Query([("user", t["value"]) if t["from"] == "human" else ("assistant", t["value"]) for t in turns],
                  ["b.png"], "q")  # fmt: skip
    single = Query.single("What is in the image?", "a.png")
    batch = build_inputs(processor, [query, single], "vicuna_v1", llava_dir)
    short = as_llava_hf(*(2 * [llava_tokenizer_image_token(
        llava_prompt(_turns("<image>\nWhat is in the image?"), True, generation=True), processor.tokenizer)]))[0]  # fmt: skip
    pad = len(expected) - len(short)
    assert batch["input_ids"][0].tolist() == expected
    assert batch["input_ids"][1].tolist() == [PAD_TOKEN_ID] * pad + short  # left padding
    assert batch["attention_mask"][1].tolist() == [0] * pad + [1] * len(short)
    assert batch["pixel_values"].shape == (2, 3, 336, 336)
    encoder = Encoder(processor, "vicuna_v1", 4096, llava_dir)
    inputs, answer = encoder.encode_prompt(Record("x", ["b.png"], [("user", "<image>\nWhat year was this taken?"),
                                                                   ("assistant", "1984")]))  # fmt: skip
    assert answer == "1984" and inputs["input_ids"][0].tolist() == as_llava_hf(*(2 * [llava_tokenizer_image_token(
        llava_prompt(_turns("<image>\nWhat year was this taken?"), True, generation=True), processor.tokenizer)]))[0]  # fmt: skip


def test_multi_image_follows_the_same_rule(processor, tmp_path, llava_dir):
    # No LLaVA-1.5 convention for several images (its preprocess_multimodal would merge them): the rule is
    # tokenizer_image_token's, applied to each image of the rendered prompt.
    record = {"id": "two", "image": ["a.png", "b.png"],
              "conversations": _turns("First <image>\nthen <image>\nWhich is bigger?", "The second.")}  # fmt: skip
    path = llava_dir / "two.json"
    path.write_text(json.dumps([record]))
    ds = build_dataset(path, processor, max_length=4096)
    prompt = SYSTEM + " USER: First <image>\nthen <image>\nWhich is bigger? ASSISTANT: The second.</s>"
    ids, labels = as_llava_hf(*llava_preprocess_v1(prompt, processor.tokenizer, True))
    assert ds[0]["input_ids"].tolist() == ids and ds[0]["labels"].tolist() == labels
    assert ds[0]["pixel_values"].shape == (2, 3, 336, 336) and ds.lengths == [len(ids)]
    assert ids.count(29871) >= 2  # one "▁" after each image


def test_chat_template_stays_the_processors(llava_dir):
    # The same vicuna text rendered through a chat template is tokenized as the processor does it: whole, so
    # without the "▁" after the image; vicuna_v1 differs from it by exactly that token.
    processor = llava15_processor(chat_template=VICUNA_V1_JINJA)
    kw = dict(max_length=4096, pad_to_square=True)
    jinja = build_dataset(llava_dir / "llava.json", processor, template="chat_template", **kw)
    vicuna = build_dataset(llava_dir / "llava.json", processor, template="vicuna_v1", **kw)
    for index, record in enumerate(RECORDS):
        a, b = jinja[index], vicuna[index]
        text = processor.apply_chat_template(
            [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": [
                {"type": "image"}, {"type": "text", "text": t["value"].replace("<image>", "").strip()}]
                if "<image>" in t["value"] else [{"type": "text", "text": t["value"]}]}
             for t in record["conversations"]], tokenize=False)  # fmt: skip
        images = [Image.open(llava_dir / record["image"]).convert("RGB")] if "image" in record else None
        own = processor(text=[text], images=images)["input_ids"][0]
        assert a["input_ids"].tolist() == list(own)
        if "image" not in record:
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            continue
        after = b["input_ids"].tolist().index(IMAGE_TOKEN_ID) + IMAGE_TOKENS
        assert b["input_ids"][after] == 29871
        keep = torch.ones(len(b["input_ids"]), dtype=torch.bool)
        keep[after] = False
        assert torch.equal(b["input_ids"][keep], a["input_ids"]) and torch.equal(
            b["labels"][keep], a["labels"]
        )


def test_precheck_verdict_equals_encoding_at_every_cut(processor, llava_dir):
    # The pre-check measures lengths, image ends and the first trained token without expanding the images;
    # at max_length cuts around each of those points it must come to the verdict encoding comes to.
    from libra_train.data import DataError
    from libra_train.data.records import load_records, row_to_record

    records = [row_to_record(r) for r in load_records(llava_dir / "llava.json")]
    for record in records:
        full = Encoder(processor, "vicuna_v1", 4096, llava_dir).encode(record)
        n, labels = len(full["input_ids"]), full["labels"]
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        images = (full["input_ids"] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
        points = {n - 1, n, first, first + 1} | ({images[-1], images[-1] + 1} if images else set())
        for cut in sorted(points):
            encoder = Encoder(processor, "vicuna_v1", cut, llava_dir)

            def verdict(fn, record=record, encoder=encoder):
                try:
                    out = fn(record)
                    return out if isinstance(out, int) else len(out["input_ids"])
                except DataError as err:
                    return err.reason

            assert verdict(encoder.check) == verdict(encoder.encode), (record.id, cut)
