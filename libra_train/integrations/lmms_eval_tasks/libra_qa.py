"""A local lmms-eval task over a QA file: the questions ``scripts/evaluate.py`` asks, scored as it scores them.

    python -m libra_train.integrations.lmms_eval_tasks --data demo_data/val.json --out tasks/
    python -m lmms_eval --model libra --model_args pretrained=exports/demo \\
        --tasks libra_qa_val --include_path tasks/ --output_path results/

``write_task`` reads the file with ``libra_train.infer.load_qa`` (LLaVA / HF-messages conversations scored on
their first answer, or JSON lines of ``{"question", "answer(s)", "image"}``), writes one JSON line per
question (image paths made absolute) and a task YAML beside it that includes this package's
``_libra_qa_yaml`` (prompt, generation settings, metric). lmms-eval loads the lines with datasets' ``json``
builder from the local file (no hub), relative to the YAML, so the folder can be moved as long as the images
stay where they are. The functions below are the task's ``!function`` hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["TEMPLATE", "doc_to_text", "doc_to_visual", "main", "process_results", "write_task"]

TEMPLATE = Path(__file__).with_name("_libra_qa_yaml")  # the task definition every written task includes


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's image, decoded (lmms-eval hands models PIL images), or none for a text question."""
    if not doc.get("image"):
        return []
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The user turn as written in the data (with its ``<image>`` placeholder)."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``accuracy``: 1 when the prediction matches one of the accepted answers (``is_correct``)."""
    from libra_train.inference.answers import is_correct

    return {"accuracy": float(is_correct(results[0], doc["answers"]))}


def _rows(data: Path, image_folder: str | os.PathLike | None, limit: int | None) -> list[dict[str, Any]]:
    from libra_train.inference.evaluation import check_images, load_qa

    examples = load_qa(data, limit=limit)
    folder = image_folder if image_folder is not None else data.parent
    check_images(examples, folder)
    rows = []
    for ex in examples:
        turns = ex.query.turns
        if len(turns) != 1 or turns[0][0] != "user" or len(ex.query.images) > 1:
            raise ValueError(
                f"{data}, sample {ex.query.id!r}: a local lmms-eval task holds single-turn questions with at "
                "most one image; this one has turns "
                f"{[role for role, _ in turns]} and {len(ex.query.images)} images"
            )
        image = ex.query.images[0] if ex.query.images else None
        if image is not None and not os.path.isabs(image):
            image = os.path.abspath(os.path.join(folder, image))
        rows.append(
            {
                "id": ex.query.id,
                "question": turns[0][1],
                "answer": ex.answers[0],
                "answers": ex.answers,
                "image": image,
                "question_type": ex.question_type,
            }
        )
    return rows


def write_task(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    image_folder: str | os.PathLike | None = None,
    limit: int | None = None,
) -> Path:
    """Write ``out_dir/<name>.yaml`` and ``out_dir/<name>.jsonl`` for the questions of ``data``.

    Args:
        data: the QA file (``.json`` / ``.jsonl``, see the module doc).
        out_dir: the folder to pass to lmms-eval's ``--include_path``.
        name: the task name (default ``libra_qa_<file stem>``).
        image_folder: folder the image paths are relative to (default: the data file's).
        limit: keep the first ``limit`` questions.

    Returns:
        The YAML's path.

    Raises:
        FileNotFoundError: the data file or some image is missing.
        ValueError: a record that cannot be read, or a multi-turn / multi-image question.
    """
    data = Path(data)
    name = name or f"libra_qa_{data.stem}"
    rows = _rows(data, image_folder, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    yaml_file = out / f"{name}.yaml"
    yaml_file.write_text(
        f"# {len(rows)} questions of {data.resolve()}; written by libra_train.integrations.lmms_eval_tasks\n"
        f"include: {TEMPLATE}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {name}.jsonl\n"
    )
    return yaml_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="QA file (.json or .jsonl)")
    parser.add_argument("--out", required=True, help="folder for the task (lmms-eval's --include_path)")
    parser.add_argument("--name", help="task name (default: libra_qa_<data file stem>)")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (default: the data's)")
    parser.add_argument("--limit", type=int, help="keep the first N questions")
    args = parser.parse_args(argv)
    from libra_train.data.records import DataError

    try:
        path = write_task(
            args.data, args.out, name=args.name, image_folder=args.image_folder, limit=args.limit
        )
    except (FileNotFoundError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    task = path.stem
    print(f"wrote {path}: run it with  python -m lmms_eval --tasks {task} --include_path {path.parent} ...")
    return 0
