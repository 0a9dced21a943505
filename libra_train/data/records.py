"""Conversation records: read LLaVA / HF-messages JSON(L) files into one normalised schema.

Two input formats are accepted, in `.json` (one array) or `.jsonl` (one record a line) files, and may even be
mixed in one file:

* LLaVA: ``{"id", "image": str | [str] (optional), "video": str | [str] (optional), "conversations":
  [{"from": "human"|"gpt"|"system", "value": str}]}`` with ``<image>`` / ``<video>`` placeholders in the text
  and paths relative to an image folder. ``video`` is one video: a video file (``.mp4``, ... : decoded by the
  processor) or the list of its frame image files, in order.
* HF messages: ``{"id" (optional), "messages": [{"role": "user"|"assistant"|"system", "content": str |
  [{"type": "text", "text"} | {"type": "image"} | {"type": "video"}]}], "images": [str] (optional),
  "videos": [str | [str]] (optional)}``.

Both become a `Record`: an id, a list of image paths, a list of videos (each a list of frame files, or one
video file) and a list of ``(role, text)`` turns with roles ``system`` / ``user`` / ``assistant`` and one
``<image>`` placeholder per image, one ``<video>`` per video. An optional
``"question_types": [str | null, ...]`` (one per answer, in order; the demo generator writes it) is carried
along so that evaluations can report accuracy per question type; it never affects training.

Why not `datasets.load_dataset("json")`: it does read LLaVA's mixed schemas (records with and without "image",
"image" a string in some records and a list in others, int or str ids), but it types such mixed columns as
`Json` and then decodes every string in them as JSON: the id "000000033471" comes back as the int 33471,
an answer "5" as 5, "null" as None (checked with datasets 5.2). So the file is read with `json`, every record is
normalised in Python to one fixed schema (no mixed types left), and `datasets.Dataset.from_dict` stores the
rows in Arrow, which DataLoader workers share without the copy-on-read growth of 665k Python dicts. Problems
are recorded per row instead of raised, so that all problems of a file are reported at once (or skipped and
counted).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# A video given as one path with one of these suffixes is a video file (the processor decodes it); any other
# single path is a one-frame video.
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg")
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
MAX_LISTED_PROBLEMS = 10


class DataError(ValueError):
    """A sample that cannot be turned into a training example.

    ``DataError(sample_id, reason, message, source)`` words the message as "sample 'id' in file: message".
    ``DataError(text)`` keeps `text` as it is (a problem of a whole file: invalid JSON); DataLoader workers
    re-raise errors that way, and pickling goes through it too, so the error crosses process boundaries as a
    DataError.

    Attributes:
        sample_id: the record's id (LLaVA "id", else ``<file name>:<row>``).
        reason: short code used for the skip counter (``missing_image``, ``no_labels``, ...).
    """

    def __init__(
        self, sample_id: str, reason: str | None = None, message: str | None = None, source: str | None = None
    ):
        if reason is None and message is None:
            super().__init__(sample_id)
            self.sample_id, self.reason = "", "bad_sample"
            return
        where = f" in {source}" if source else ""
        super().__init__(f"sample {sample_id!r}{where}: {message}")
        self.sample_id = sample_id
        self.reason = reason

    @classmethod
    def from_message(cls, sample_id: str, reason: str, message: str) -> DataError:
        """Rebuild an error from its full message (rows of `load_records` keep the message)."""
        err = cls(message)
        err.sample_id, err.reason = sample_id, reason
        return err

    def __reduce__(self):
        return (_rebuild_data_error, (str(self), self.sample_id, self.reason))


def _rebuild_data_error(message: str, sample_id: str, reason: str) -> DataError:
    return DataError.from_message(sample_id, reason, message)


@dataclass(frozen=True)
class Record:
    """One normalised conversation.

    Attributes:
        id: sample id (string).
        images: image paths as written in the file (relative to the image folder unless absolute).
        turns: ``(role, text)`` pairs, role in {"system", "user", "assistant"}; texts hold ``<image>``
            placeholders, one per entry of `images`, in order.
        source: the file the record came from (for error messages).
        index: its row in that file.
        question_types: the type of each answer's question (``colour``, ``count``, ...; None = untyped), in the
            order of the assistant turns; may be shorter than them, empty when the data says nothing.
        videos: one entry per ``<video>`` placeholder, in order: the frame image paths of the video, or a
            one-element list holding a video file (see `is_video_file`).
    """

    id: str
    images: list[str]
    turns: list[tuple[str, str]]
    source: str = ""
    index: int = -1
    question_types: list[str | None] = field(default_factory=list)
    videos: list[list[str]] = field(default_factory=list)


def is_video_file(video: list[str]) -> bool:
    """Whether a record's video is a video file (one path with a `VIDEO_FILE_SUFFIXES` suffix), not frames."""
    return len(video) == 1 and isinstance(video[0], str) and video[0].lower().endswith(VIDEO_FILE_SUFFIXES)


def _content_to_text(content: Any) -> str:
    """HF content (a string, or a list of text/image parts) -> text with ``<image>`` placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TypeError(f"content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append(IMAGE_PLACEHOLDER + "\n")
        elif kind == "video":
            pieces.append(VIDEO_PLACEHOLDER + "\n")
        else:
            raise TypeError(f"content part must be {{'type': 'text'|'image'|'video'}}, got {part!r}")
    return "".join(pieces)


def normalize_record(raw: dict[str, Any], index: int, source: str = "", purpose: str = "training") -> Record:
    """Turn one raw LLaVA or HF-messages record into a `Record`.

    Args:
        raw: the decoded JSON object.
        index: its row in the file (used for the id when the record has none).
        source: the file name, for error messages.
        purpose: ``training`` or ``evaluation``: what a record without an answer is missing for.

    Raises:
        DataError: unknown format or role, roles that do not alternate user/assistant (after an optional
            system turn), no assistant turn, or a ``<image>`` count different from the number of images.
    """
    sample_id = str(raw["id"]) if raw.get("id") is not None else f"{Path(source).name}:{index}"

    def fail(reason: str, message: str) -> DataError:
        return DataError(sample_id, reason, message, source)

    try:
        if raw.get("conversations") is not None:
            turns = [(ROLE_ALIASES.get(t["from"], t["from"]), t["value"]) for t in raw["conversations"]]
            images = raw.get("image")
            videos = [raw["video"]] if raw.get("video") is not None else []
        elif raw.get("messages") is not None:
            turns = [
                (ROLE_ALIASES.get(m["role"], m["role"]), _content_to_text(m["content"]))
                for m in raw["messages"]
            ]
            images = raw.get("images")
            videos = raw.get("videos") or []
        else:
            raise fail("bad_format", "no 'conversations' (LLaVA) or 'messages' (HF) list; see data/README.md")
    except (KeyError, TypeError) as err:
        raise fail(
            "bad_format", f"malformed turn ({err}); see data/README.md for the accepted formats"
        ) from err
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise fail("bad_format", f"image paths must be non-empty strings, got {images!r}")
    videos = [[v] if isinstance(v, str) else v for v in videos] if isinstance(videos, list) else [videos]
    for video in videos:
        if not isinstance(video, list) or not video or not all(isinstance(p, str) and p for p in video):
            raise fail(
                "bad_video",
                f"a video must be a video file path or a non-empty list of frame image files, got {video!r}",
            )
    for role, text in turns:
        if role not in ("system", "user", "assistant") or not isinstance(text, str):
            raise fail("bad_format", f"unknown role {role!r} or non-string text")
    chat = turns[1:] if turns and turns[0][0] == "system" else turns
    expected = ["user", "assistant"] * (len(chat) // 2 + 1)
    if not chat or [r for r, _ in chat] != expected[: len(chat)]:
        raise fail(
            "bad_roles", "turns must alternate user/assistant, starting with user (after one optional system)"
        )
    if not any(r == "assistant" for r, _ in chat):
        missing = "reference answer to evaluate against" if purpose == "evaluation" else "answer to train on"
        raise fail(
            "no_labels",
            f"no assistant turn, so no {missing}; add a 'gpt' / 'assistant' turn after the question",
        )
    qtypes = raw.get("question_types")
    qtypes = [] if qtypes is None else qtypes
    n_answers = sum(r == "assistant" for r, _ in chat)
    if not isinstance(qtypes, list) or not all(t is None or isinstance(t, str) for t in qtypes):
        raise fail("bad_format", f"'question_types' must be a list of strings (or null), got {qtypes!r}")
    if len(qtypes) > n_answers:
        raise fail(
            "bad_format", f"{len(qtypes)} 'question_types' for {n_answers} answer(s): give one per answer"
        )
    for kind, placeholder, items, where in (
        ("image", IMAGE_PLACEHOLDER, images, "LLaVA: '<image>\\n' before the first question"),
        ("video", VIDEO_PLACEHOLDER, videos, "'<video>\\n' before the question"),
    ):
        n_placeholders = sum(text.count(placeholder) for _, text in turns)
        if n_placeholders != len(items):
            raise fail(
                f"{kind}_count_mismatch",
                f"{n_placeholders} {placeholder} placeholder(s) but {len(items)} {kind}(s); put exactly one "
                f"{placeholder} in the text per {kind} ({where})",
            )
    return Record(sample_id, images, turns, source, index, qtypes, videos)


FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "videos": datasets.List(datasets.List(datasets.Value("string"))),
        "roles": datasets.List(datasets.Value("string")),
        "texts": datasets.List(datasets.Value("string")),
        "index": datasets.Value("int64"),
        "question_types": datasets.List(datasets.Value("string")),
        "reason": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)


def _json_error(path: Path, err: json.JSONDecodeError, line: int | None = None) -> str:
    """``file, line L, column C: what`` for a JSON syntax error (`line`: the line of a JSONL record)."""
    where = f"line {line if line is not None else err.lineno}, column {err.colno}"
    return f"{path}, {where}: not valid JSON ({err.msg})"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save the data file as UTF-8 JSON"
        ) from None


def iter_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, record)`` of a JSON array file, or a JSON-lines file (`.jsonl`, or any file not starting with
    "["); a JSONL line that is not valid JSON comes as ``(line, DataError)`` so that a caller can skip it.

    Raises:
        DataError: a JSON array file that is not valid JSON (one paragraph naming the file, line and column).
    """
    text = _read_text(path)
    if path.suffix != ".jsonl" and re.match(r"\s*\[", text):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{_json_error(path, err)}. Fix the file at that place (python -m json.tool {path} reports "
                "the same position); a .jsonl file (one record per line) lets data.skip_bad_samples=true skip "
                "a broken record instead"
            ) from None
        del text  # the file's text: as large as the file, no longer needed while the records are used
        yield from ((0, raw) for raw in records)
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            yield (
                line_no,
                DataError(
                    f"{path.name}:line {line_no}",
                    "bad_json",
                    f"{_json_error(path, err, line_no)}; fix or delete the line, or set data.skip_bad_samples=true "
                    "to skip it",
                ),
            )


def read_json_records(path: Path) -> list[Any]:
    """The records of a JSON array or JSON-lines file as a list (see `iter_json_rows`).

    Raises:
        DataError: the file, or one of its lines, is not valid JSON (the message names file, line and column).
    """
    records = []
    for _, raw in iter_json_rows(path):
        if isinstance(raw, DataError):
            raise raw
        records.append(raw)
    return records


def load_records(path: str | Path, purpose: str = "training") -> datasets.Dataset:
    """Read a LLaVA / HF-messages `.json` or `.jsonl` file into a normalised `datasets.Dataset`.

    Args:
        path: the JSON (array) or JSONL file.
        purpose: ``training`` or ``evaluation``, for the wording of problems.

    Returns:
        A dataset with columns ``id, images, videos, roles, texts, index, question_types, reason, error``; rows
        that failed to normalise (or JSONL lines that are not valid JSON) have a non-empty ``reason`` (a
        `DataError` code) and ``error`` (its message).

    Raises:
        FileNotFoundError: no such file.
        DataError: a JSON array file that is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} does not exist (see data/README.md for how to get the data)"
        )
    columns: dict[str, list] = {name: [] for name in FEATURES}
    for index, (_, raw) in enumerate(iter_json_rows(path)):
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(
                    f"{path.name}:{index}", "bad_format", "a record must be a JSON object", str(path)
                )
            rec, reason, error = normalize_record(raw, index, str(path), purpose), "", ""
        except DataError as err:
            rec, reason, error = Record(err.sample_id, [], [], str(path), index), err.reason, str(err)
        columns["id"].append(rec.id)
        columns["images"].append(rec.images)
        columns["videos"].append(rec.videos)
        columns["roles"].append([r for r, _ in rec.turns])
        columns["texts"].append([t for _, t in rec.turns])
        columns["index"].append(index)
        columns["question_types"].append(rec.question_types)
        columns["reason"].append(reason)
        columns["error"].append(error)
    # Straight to Arrow: the columns hold plain strings, ints and lists of them, so `Dataset.from_dict`'s
    # per-value feature encoding (2-3x slower on 665k records) has nothing to do.
    table = pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=FEATURES))


def row_to_record(row: dict[str, Any], source: str = "") -> Record:
    """A row of `load_records`' dataset -> `Record`."""
    turns = list(zip(row["roles"], row["texts"]))
    videos = [list(v) for v in row.get("videos") or []]
    return Record(
        row["id"], list(row["images"]), turns, source, row["index"], list(row["question_types"]), videos
    )


def summarize_problems(errors: list[str], reasons: Counter, hint: str) -> str:
    """One message for many bad samples: counts per reason, the first few messages, and what to do."""
    listed = "\n  ".join(errors[:MAX_LISTED_PROBLEMS])
    more = (
        f"\n  ... and {len(errors) - MAX_LISTED_PROBLEMS} more" if len(errors) > MAX_LISTED_PROBLEMS else ""
    )
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    return f"{len(errors)} bad sample(s) ({counts}):\n  {listed}{more}\n{hint}"


def dump_records(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write records as a LLaVA-style JSON array (`.json`) or JSON lines (`.jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path
