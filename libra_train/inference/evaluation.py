"""Short-answer evaluation: a QA file -> batched greedy generation -> accuracy, latency and peak memory.

Input files: LLaVA / HF-messages conversations (``.json`` or ``.jsonl``; the demo's ``val.json``), or JSON
lines of ``{"question", "answer" | "answers", "image" (optional), "id" (optional), "question_type"
(optional)}``. A conversation is scored on its first answer, as the training loop's evaluation does; with
``all_turns`` every answer is one example, asked with the turns before it (gold answers included) as context.

Accuracy per question type: the type comes from the data (a conversation's ``question_types``, one per answer,
which the demo generator writes; a QA line's ``question_type``), never from the question's wording. Examples
without a type count in the overall accuracy only.

Measurements (ToMe's ``benchmark`` discipline: a warm-up call discarded, the device synchronised before the
clock is read): *latency* is the wall time of the ``generate`` calls divided by the number of examples
(batched; image decoding and tokenization excluded). *Peak memory* is the CUDA allocator's maximum on GPU,
and on CPU the peak resident set size of the process during the run, reset before it through
``/proc/self/clear_refs`` (Linux); where that is not possible the process-lifetime ``ru_maxrss`` is reported
and labelled as such.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from libra_train.bench.memory import PeakMemory
from libra_train.data.records import normalize_record, read_json_records
from libra_train.inference.answers import is_correct
from libra_train.inference.generation import Query, generate
from libra_train.training.evaluate import MAX_NEW_TOKENS

__all__ = [
    "EvalResult",
    "PeakMemory",
    "QAExample",
    "check_images",
    "evaluate",
    "format_by_type",
    "format_table",
    "load_qa",
]


@dataclass
class QAExample:
    """One question with its accepted answers."""

    query: Query
    answers: list[str]
    question_type: str | None = None


def _qa_line(raw: dict[str, Any], index: int, path: Path) -> QAExample:
    sample_id = str(raw.get("id", f"{path.name}:{index}"))
    answers = raw.get("answers", raw.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(raw["question"], str) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(
            f"{path}, record {index} ({sample_id!r}): needs a string 'question' and 'answer'/'answers'"
        )
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{path}, record {index} ({sample_id!r}): 'image' must be one path")
    qtype = raw.get("question_type")
    if qtype is not None and not isinstance(qtype, str):
        raise ValueError(f"{path}, record {index} ({sample_id!r}): 'question_type' must be a string")
    query = Query.single(raw["question"], image, sample_id)
    return QAExample(query, list(answers), qtype)


def load_qa(path: str | os.PathLike, limit: int | None = None, all_turns: bool = False) -> list[QAExample]:
    """Read a QA file (see the module doc) into examples, the first ``limit`` of them when given.

    Args:
        path: the ``.json`` / ``.jsonl`` file.
        limit: keep the first ``limit`` examples.
        all_turns: one example per answer of a multi-turn conversation (default: its first answer only).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file or record that cannot be read (the message names the file and the record).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    examples: list[QAExample] = []
    for index, raw in enumerate(read_json_records(path)):
        if limit is not None and len(examples) >= limit:
            break
        if not isinstance(raw, dict):
            raise ValueError(f"{path}, record {index}: a record must be a JSON object")
        if "question" in raw:
            examples.append(_qa_line(raw, index, path))
            continue
        record = normalize_record(raw, index, str(path), "evaluation")  # DataError names sample and file
        qtypes = record.question_types
        answer_turns = [k for k, (role, _) in enumerate(record.turns) if role == "assistant"]
        answer_turns = answer_turns if all_turns else answer_turns[:1]
        for j, k in enumerate(answer_turns):
            sample_id = record.id if len(answer_turns) == 1 else f"{record.id}#{j}"
            query = Query(record.turns[:k], list(record.images), sample_id)
            examples.append(QAExample(query, [record.turns[k][1]], qtypes[j] if j < len(qtypes) else None))
    if not examples:
        raise ValueError(f"{path} holds no question")
    return examples[:limit] if limit is not None else examples


def check_images(examples: list[QAExample], image_folder: str | os.PathLike | None) -> None:
    """Fail before any generation when image files are missing (all of them listed, up to ten)."""
    missing = []
    for ex in examples:
        for image in ex.query.images:
            full = (
                image if os.path.isabs(image) or image_folder is None else os.path.join(image_folder, image)
            )
            if not os.path.isfile(full):
                missing.append(f"{full} (sample {ex.query.id!r})")
    if missing:
        listed = "\n  ".join(missing[:10]) + (
            f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise FileNotFoundError(f"{len(missing)} image file(s) not found (check --image-folder):\n  {listed}")


@dataclass
class EvalResult:
    """Accuracy and cost of one configuration on one QA set."""

    label: str
    correct: int
    total: int
    predictions: list[str]
    seconds: float  # generate wall time over all examples
    memory: PeakMemory
    visual_tokens: list[float] = field(default_factory=list)  # mean visual tokens per stage (image examples)
    scores: list[bool] = field(default_factory=list)  # per example, in order: correct or not
    question_types: list[str | None] = field(default_factory=list)  # per example: from the data, or None
    text_tokens: float = 0.0  # mean prompt tokens that are not visual (image examples), for FLOPs models

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def by_type(self) -> dict[str, tuple[int, int]]:
        """``{question type: (correct, total)}`` over the typed examples, types sorted by name."""
        counts: dict[str, list[int]] = {}
        for qtype, ok in zip(self.question_types, self.scores):
            if qtype is not None:
                c = counts.setdefault(qtype, [0, 0])
                c[0] += ok
                c[1] += 1
        return {t: (c[0], c[1]) for t, c in sorted(counts.items())}

    @property
    def latency(self) -> float:
        """Seconds of generation per example."""
        return self.seconds / self.total if self.total else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    examples: list[QAExample],
    *,
    template: str,
    image_folder: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    label: str = "model",
    progress: bool = True,
    warmup: bool = True,
) -> EvalResult:
    """Greedy short answers for ``examples``, scored with :func:`libra_train.inference.answers.is_correct`.

    Args:
        model, processor: e.g. from ``libra_train.infer.load`` (Libra applied or not).
        examples: from :func:`load_qa`.
        template: the chat template (``libra_train.infer.prompt_template``).
        image_folder: folder relative image paths are resolved against.
        batch_size: queries per ``generate`` call (left-padded).
        max_new_tokens: most tokens per answer (default: the training loop's evaluation's).
        label: the row name in :func:`format_table`.
        progress: show a tqdm bar.
        warmup: run the first batch once, untimed, before measuring.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_images(examples, image_folder)
    device = next(model.parameters()).device
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    kwargs = {"template": template, "image_folder": image_folder, "max_new_tokens": max_new_tokens}
    if warmup and batches:
        generate(model, processor, [ex.query for ex in batches[0]], **kwargs)
    predictions, scores, visual, text, seconds = [], [], [], [], 0.0
    with (
        PeakMemory(device) as memory,
        tqdm(total=len(examples), desc=label, unit="ex", disable=not progress) as bar,
    ):
        for batch in batches:
            _sync(device)
            start = time.perf_counter()
            outputs = generate(model, processor, [ex.query for ex in batch], **kwargs)
            _sync(device)
            seconds += time.perf_counter() - start
            for ex, out in zip(batch, outputs):
                predictions.append(out.text)
                scores.append(is_correct(out.text, ex.answers))
                if out.visual_tokens:
                    visual.append(out.visual_tokens)
                    text.append(out.prompt_tokens - out.visual_tokens[0])
            bar.update(len(batch))
            bar.set_postfix(acc=f"{sum(scores) / len(predictions):.3f}")
    depth = max((len(v) for v in visual), default=0)
    visual = [v for v in visual if len(v) == depth]
    means = [sum(v[s] for v in visual) / len(visual) for s in range(depth)]
    return EvalResult(
        label, sum(scores), len(examples), predictions, seconds, memory, means, scores,
        [ex.question_type for ex in examples], sum(text) / len(text) if text else 0.0,
    )  # fmt: skip


def format_by_type(result: EvalResult) -> str:
    """``colour 80.0% (40/50), count ...`` for the typed examples; ``-`` when the data gives no types."""
    parts = [f"{t} {c / n:.1%} ({c}/{n})" for t, (c, n) in result.by_type.items()]
    return ", ".join(parts) or "-"


def format_table(results: list[EvalResult]) -> str:
    """The results side by side as a Markdown table."""
    lines = [
        "| config | accuracy | per question type | latency / example | peak memory | visual tokens per stage |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = f"{r.memory.peak_mib:.0f} MiB ({r.memory.label}; {r.memory.start_mib:.0f} at start)"
        tokens = " -> ".join(f"{t:g}" for t in (round(v, 1) for v in r.visual_tokens)) or "-"
        lines.append(
            f"| {r.label} | {r.accuracy:.1%} ({r.correct}/{r.total}) | {format_by_type(r)} | {r.latency * 1e3:.1f} ms "
            f"| {memory} | {tokens} |"
        )
    return "\n".join(lines)
