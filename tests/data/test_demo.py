"""The demo data generator: deterministic, consistent with its images, disjoint splits, known words only."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from PIL import Image

from libra_train.data.demo import (
    COLOURS,
    answer,
    answer_space,
    chance_accuracy,
    generate_demo_data,
    majority_accuracy,
)


def _hashes(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_data(tmp_path_factory.mktemp("demo"), n_train=150, n_val=50, seed=3)


def test_deterministic(demo, tmp_path):
    again = generate_demo_data(tmp_path / "a", n_train=150, n_val=50, seed=3)
    assert _hashes(again.root) == _hashes(demo.root)
    other = generate_demo_data(tmp_path / "b", n_train=150, n_val=50, seed=4)
    assert _hashes(other.root)["train.json"] != _hashes(demo.root)["train.json"]


def test_answers_match_scenes_and_pixels(demo):
    scenes = json.loads(demo.scenes.read_text())
    for split in (demo.train, demo.val):
        for rec in json.loads(split.read_text()):
            turns = rec["conversations"]
            for qtype, q, a in zip(rec["question_types"], turns[::2], turns[1::2]):
                question, reply = q["value"].replace("<image>\n", ""), a["value"]
                if qtype == "text":
                    n = int(re.search(r"\d+", question).group())
                    assert int(reply) == (n + 1 if "after" in question else n - 1)
                    continue
                cells = [tuple(c) if c else None for c in scenes[rec["image"]]]
                if qtype == "count":
                    colour = re.search(r"how many (\w+) shapes", question).group(1)
                    assert reply == answer(cells, 3, "count", colour=colour)
                else:
                    row, col = map(int, re.search(r"row (\d) column (\d)", question).groups())
                    assert reply == answer(cells, 3, qtype, row, col)
                assert reply in answer_space(3)[qtype]
    # The drawn pixels agree with the scene: each cell's centre has the shape's colour, or stays white.
    for name, cells in list(scenes.items())[:40]:
        image = Image.open(demo.image_folder / name).convert("RGB")
        for i, cell in enumerate(cells):
            row, col = divmod(i, 3)
            centre = image.getpixel((col * 16 + 8, row * 16 + 8))
            assert centre == (COLOURS[cell[0]] if cell else (255, 255, 255))


def test_splits_disjoint_and_text_only_present(demo):
    train, val = json.loads(demo.train.read_text()), json.loads(demo.val.read_text())
    scenes = json.loads(demo.scenes.read_text())
    train_boards = {json.dumps(scenes[r["image"]]) for r in train if "image" in r}
    val_boards = {json.dumps(scenes[r["image"]]) for r in val}
    assert not train_boards & val_boards and len(val_boards) == len(val) == 50
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    text_only = [r for r in train if "image" not in r]
    assert len(text_only) == 3 and len(train) == 153  # 2% of 150, rounded
    assert any(len(r["conversations"]) == 4 for r in train)  # multi-turn samples
    assert all(len(r["conversations"]) == 2 for r in val)


def test_tokenizer_knows_every_word(demo, tiny, tmp_path):
    tok = tiny[1].tokenizer
    big = generate_demo_data(tmp_path, n_train=100, n_val=10, grid=4, image_size=64)
    for path in (demo.train, demo.val, big.train):
        for rec in json.loads(path.read_text()):
            for turn in rec["conversations"]:
                assert tok.unk_token_id not in tok(turn["value"])["input_ids"], turn["value"]


def test_baselines(demo):
    assert chance_accuracy(3) == pytest.approx({"colour": 0.2, "shape": 1 / 3, "count": 0.1})
    majority = majority_accuracy(json.loads(demo.val.read_text()))
    assert set(majority) <= {"colour", "shape", "count"} and all(0 < v <= 1 for v in majority.values())
    with pytest.raises(ValueError, match="grid"):
        generate_demo_data("unused", grid=5)
