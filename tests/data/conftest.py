"""Shared fixtures: the tiny LLaVA (built from configs, no download) and the committed sample files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from libra_train.data.demo import draw_scene
from libra_train.models import build_tiny_llava

FIXTURES = Path(__file__).parent / "fixtures"
R, G, B, Y, P = "red", "green", "blue", "yellow", "purple"
# Row-major 3 x 3 boards drawn into the fixture images (the answers in llava_small.json refer to them).
BOARDS = {
    "board_a.png": (
        None,
        (R, "square"),
        (B, "circle"),
        (G, "triangle"),
        None,
        None,
        None,
        (Y, "circle"),
        None,
    ),
    "board_b.png": (
        (B, "square"),
        None,
        (B, "triangle"),
        None,
        (P, "circle"),
        None,
        (R, "circle"),
        None,
        None,
    ),
}


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the default tiny LLaVA: 48 px images, patch 8 -> 36 image tokens."""
    return build_tiny_llava()


@pytest.fixture
def sample_dir(tmp_path) -> Path:
    """The committed fixture files plus their two board images, in a fresh folder."""
    for name in ("llava_small.json", "hf_small.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    for name, cells in BOARDS.items():
        draw_scene(cells, 3, 48).save(tmp_path / name)
    return tmp_path


@pytest.fixture
def write_records():
    """`write(folder, records, name="data.json") -> path`: records as a LLaVA JSON file."""

    def write(folder: Path, records: list[dict], name: str = "data.json") -> Path:
        path = folder / name
        path.write_text(json.dumps(records))
        return path

    return write
