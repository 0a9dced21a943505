"""The demo data set: coloured shapes on a grid, questions that need looking at specific cells.

Each image is a `grid` x `grid` board (default 3 x 3 on 48 px, so with patch 8 a cell is 2 x 2 patches); a cell
is empty or holds a circle, square or triangle in one of five colours. Questions (one-word answers):

* ``colour``: "what colour is the shape at row r column c ?" -> red | green | blue | yellow | purple
* ``shape``:  "what shape is at row r column c ?"            -> circle | square | triangle
* ``count``:  "how many red shapes are there ?"              -> 0 .. grid*grid

Colour and shape questions are only asked about occupied cells. Train samples carry 1..`max_turns` questions
about the same image (multi-turn); validation samples one. A few text-only samples ("what number comes
after 4 ?") go into train so that batches mix image and text-only samples. Everything is drawn from one
`random.Random(seed)`, so the output is a pure function of the arguments; no scene appears in both splits.
Files: ``images/{split}_{i:05d}.png``, ``train.json``, ``val.json`` (LLaVA format, plus a "question_types"
field) and ``scenes.json`` (image name -> row-major cells, ``[colour, shape]`` or null).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from libra_train.data.records import IMAGE_PLACEHOLDER, dump_records

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour", "shape", "count")
MAX_GRID = 4
EMPTY_PROB = 0.3
BACKGROUND = (255, 255, 255)
TEXT_ONLY_QUESTIONS = ("what number comes after {n} ?", "what number comes before {n} ?")

Cell = tuple[str, str] | None  # (colour, shape) or empty


@dataclass(frozen=True)
class DemoPaths:
    """Where `generate_demo_data` wrote its output."""

    root: Path
    image_folder: Path
    train: Path
    val: Path
    scenes: Path


def answer_space(grid: int = 3) -> dict[str, list[str]]:
    """Every possible answer per question type (plus ``text`` for the text-only questions)."""
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(n) for n in range(grid * grid + 1)],
        "text": [str(n) for n in range(grid * grid + 1)],
    }


def chance_accuracy(grid: int = 3) -> dict[str, float]:
    """Accuracy of a uniform guess over each question type's answer space (colour 0.2, shape 0.33, ...).

    Counts are far from uniform (mostly 0-3 of one colour on 9 cells), so for ``count`` compare with the
    majority-answer rate of the split as well (`majority_accuracy`).
    """
    return {k: 1.0 / len(v) for k, v in answer_space(grid).items() if k != "text"}


def majority_accuracy(records: list[dict]) -> dict[str, float]:
    """Per question type, the accuracy of always answering that type's most frequent answer in `records`."""
    answers: dict[str, dict[str, int]] = {}
    for rec in records:
        gpt = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        for qtype, answer in zip(rec.get("question_types", []), gpt):
            counts = answers.setdefault(qtype, {})
            counts[answer] = counts.get(answer, 0) + 1
    return {q: max(c.values()) / sum(c.values()) for q, c in answers.items()}


def demo_vocabulary(max_grid: int = MAX_GRID) -> list[str]:
    """Every string the generator can emit (questions, answers); the tiny tokenizer is built to cover them."""
    texts = [IMAGE_PLACEHOLDER, *COLOURS, *SHAPES, *(str(n) for n in range(max_grid * max_grid + 2))]
    texts += [_question("colour", c, 1, 1) for c in COLOURS] + [_question("shape", None, 1, 1)]
    texts += [_question("count", c, 1, 1) for c in COLOURS] + [q.format(n=1) for q in TEXT_ONLY_QUESTIONS]
    return texts


def _question(qtype: str, colour: str | None, row: int, col: int) -> str:
    if qtype == "colour":
        return f"what colour is the shape at row {row} column {col} ?"
    if qtype == "shape":
        return f"what shape is at row {row} column {col} ?"
    return f"how many {colour} shapes are there ?"


def sample_scene(rng: random.Random, grid: int) -> tuple[Cell, ...]:
    """A random board: row-major cells, each empty with probability 0.3, at least one occupied."""
    while True:
        cells = tuple(
            None if rng.random() < EMPTY_PROB else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            for _ in range(grid * grid)
        )
        if any(cells):
            return cells


def answer(
    cells: tuple[Cell, ...], grid: int, qtype: str, row: int = 1, col: int = 1, colour: str = "red"
) -> str:
    """The answer to a question about a board (rows and columns count from 1, top-left first)."""
    if qtype == "count":
        return str(sum(1 for c in cells if c is not None and c[0] == colour))
    cell = cells[(row - 1) * grid + (col - 1)]
    if cell is None:
        raise ValueError(f"cell ({row}, {col}) is empty")
    return cell[0] if qtype == "colour" else cell[1]


def ask(rng: random.Random, cells: tuple[Cell, ...], grid: int) -> tuple[str, str, str]:
    """Draw a question about `cells`: (question type, question, answer)."""
    qtype = rng.choice(QUESTION_TYPES)
    if qtype == "count":
        colour = rng.choice(list(COLOURS))
        return qtype, _question(qtype, colour, 0, 0), answer(cells, grid, qtype, colour=colour)
    occupied = [i for i, c in enumerate(cells) if c is not None]
    row, col = divmod(rng.choice(occupied), grid)
    return qtype, _question(qtype, None, row + 1, col + 1), answer(cells, grid, qtype, row + 1, col + 1)


def draw_scene(cells: tuple[Cell, ...], grid: int, image_size: int) -> Image.Image:
    """Render a board as an RGB image of `image_size` x `image_size` pixels."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    step = image_size / grid
    margin = step * 0.15
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        row, col = divmod(i, grid)
        x0, y0 = col * step + margin, row * step + margin
        x1, y1 = (col + 1) * step - margin - 1, (row + 1) * step - margin - 1
        colour, shape = COLOURS[cell[0]], cell[1]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return image


def _text_only_sample(rng: random.Random, index: int, grid: int) -> dict:
    template = rng.choice(TEXT_ONLY_QUESTIONS)
    after = template == TEXT_ONLY_QUESTIONS[0]
    n = rng.randint(0, grid * grid - 1) if after else rng.randint(1, grid * grid)
    question, reply = template.format(n=n), str(n + 1 if after else n - 1)
    convs = [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    return {"id": f"text_{index:05d}", "conversations": convs, "question_types": ["text"]}


def generate_demo_data(
    out_dir: str | Path,
    n_train: int = 2000,
    n_val: int = 200,
    image_size: int = 48,
    grid: int = 3,
    seed: int = 0,
    max_turns: int = 2,
    text_only_fraction: float = 0.02,
) -> DemoPaths:
    """Write the demo data set (images + LLaVA JSON) into `out_dir`; deterministic given the arguments.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        n_train: number of image samples in train (text-only samples come on top).
        n_val: number of validation samples (one question each, no text-only ones).
        image_size: image side in pixels (use the model's image size).
        grid: board side, 2..4.
        seed: random seed.
        max_turns: most questions per train image (multi-turn samples).
        text_only_fraction: text-only samples added to train, as a fraction of `n_train` (at least 1 if > 0).

    Returns:
        The paths written.
    """
    if not 2 <= grid <= MAX_GRID:
        raise ValueError(
            f"grid must be in 2..{MAX_GRID} (the tiny tokenizer knows counts up to {MAX_GRID**2})"
        )
    rng = random.Random(seed)
    root = Path(out_dir)
    paths = DemoPaths(root, root / "images", root / "train.json", root / "val.json", root / "scenes.json")
    paths.image_folder.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[Cell, ...]] = set()
    scenes: dict[str, list] = {}
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for split, n, turns in (("train", n_train, max_turns), ("val", n_val, 1)):
        for i in range(n):
            cells = sample_scene(rng, grid)
            while cells in seen:  # keep the splits (and samples) disjoint
                cells = sample_scene(rng, grid)
            seen.add(cells)
            name = f"{split}_{i:05d}.png"
            draw_scene(cells, grid, image_size).save(paths.image_folder / name)
            scenes[name] = [list(c) if c else None for c in cells]
            convs, qtypes = [], []
            for t in range(rng.randint(1, turns)):
                qtype, question, reply = ask(rng, cells, grid)
                prefix = IMAGE_PLACEHOLDER + "\n" if t == 0 else ""
                convs += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": reply}]
                qtypes.append(qtype)
            splits[split].append(
                {"id": f"{split}_{i:05d}", "image": name, "conversations": convs, "question_types": qtypes}
            )
    n_text = max(1, round(n_train * text_only_fraction)) if text_only_fraction > 0 else 0
    for j in range(n_text):  # spread the text-only samples through train
        splits["train"].insert(rng.randint(0, len(splits["train"])), _text_only_sample(rng, j, grid))
    dump_records(splits["train"], paths.train)
    dump_records(splits["val"], paths.val)
    paths.scenes.write_text(json.dumps(scenes))
    return paths
