"""Map-style supervised dataset over a LLaVA / HF-messages file, with a pre-check and optional skipping.

Bad samples are never dropped silently.

* Found by the pre-check (`precheck`: format, roles, placeholders, image files and headers, lengths,
  truncation, labels) or by reading the file (a JSONL line that is not JSON): with ``skip_bad_samples=False``
  (default) `build_dataset` raises one `BadSamplesError` listing every one of them (id, file, what is wrong,
  what to do); with ``skip_bad_samples=True`` they are left out and counted in `dataset.skipped` (a Counter by
  reason) and `dataset.skipped_ids`.
* Failing only when loaded (an image whose pixel data is damaged passes the header-only pre-check): without
  skipping, `__getitem__` raises a `DataError` naming the sample; with skipping, the item is replaced by the
  next sample in dataset order that loads (deterministic: every rank, worker and epoch substitutes the same
  one, so batch shapes and step counts never diverge between ranks), the failure is counted in this copy's
  `skipped` / `runtime_skipped`, and, when `report_skips` is set (the training loader), the item carries
  ``skipped_samples[1, 2]`` = (position, reason code) of the sample drawn that it stands in for (collated:
  ``[k, 2]`` for k replaced samples of a batch), so that the counts reach the main process from DataLoader
  workers (`libra_train.training.batches` pops the key). Bad samples passed over while looking for the
  replacement are counted when they are drawn themselves.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from libra_train.data.encode import Encoder
from libra_train.data.precheck import load_cached_records
from libra_train.data.precheck import precheck as check_records
from libra_train.data.records import DataError, Record, row_to_record, summarize_problems
from libra_train.data.templates import TEMPLATES

logger = logging.getLogger(__name__)
NOMINAL_IMAGE_SIZE = (336, 336)  # for length estimates without the pre-check
SKIPPED_KEY = "skipped_samples"
# Reason codes of samples that fail when loaded (an index into this tuple travels in SKIPPED_KEY).
RUNTIME_REASONS = (
    "missing_image",
    "unreadable_image",
    "image_truncated",
    "no_labels",
    "bad_sample",
    "missing_video",
    "unreadable_video",
)
BAD_SAMPLES_HINT = (
    "Fix these samples, or set data.skip_bad_samples=true to leave them out and count them "
    "(build_dataset(..., skip_bad_samples=True) from Python)."
)


class BadSamplesError(ValueError):
    """Several bad samples at once; `problems` holds the individual `DataError`s."""

    def __init__(self, problems: list[DataError], hint: str = BAD_SAMPLES_HINT):
        reasons = Counter(p.reason for p in problems)
        super().__init__(summarize_problems([str(p) for p in problems], reasons, hint))
        self.problems = problems
        self.hint = hint

    def __reduce__(self):
        return (type(self), (self.problems, self.hint))


def _column(table: Any, name: str) -> list:
    return table.data.column(name).to_pylist()


class SupervisedDataset(Dataset):
    """Tokenised conversations with lazily loaded images.

    Items are dicts of tensors: ``input_ids[L]``, ``labels[L]`` (-100 outside the answers),
    ``attention_mask[L]``, and for samples with images ``pixel_values[n_img, 3, H, W]`` (LLaVA; LLaVA-NeXT:
    ``[n_img, n_tiles, 3, H, W]`` + ``image_sizes[n_img, 2]``; Qwen2-VL: flattened patches + ``image_grid_thw``).

    Args:
        records: output of `load_records` / `load_cached_records`.
        encoder: the `Encoder` (processor, template, max length, image folder).
        checks: output of `precheck` for these records (exact lengths, every problem); None = no pre-check:
            only the problems found while reading the file are known and lengths are estimated.
        skip_bad_samples: skip and count bad samples instead of raising.
        source: the data file, for messages.
    """

    def __init__(
        self,
        records: Any,
        encoder: Encoder,
        *,
        checks: Any = None,
        skip_bad_samples: bool = False,
        source: str = "",
    ):
        self.records = records
        self.encoder = encoder
        self.skip_bad_samples = skip_bad_samples
        self.source = source
        self.report_skips = False
        self.skipped: Counter = Counter()
        self.skipped_ids: list[str] = []
        self.runtime_skipped: dict[int, str] = {}  # position -> reason, failures at load time (this copy)
        table = checks if checks is not None else records
        reasons = np.asarray(_column(table, "reason"), dtype=object)
        bad = np.flatnonzero(reasons != "")
        problems = [
            DataError.from_message(records[int(i)]["id"], reasons[i], table[int(i)]["error"]) for i in bad
        ]
        if problems and not skip_bad_samples:
            raise BadSamplesError(problems)
        for err in problems:
            self._count(err)
        if problems:
            logger.warning("%s: skipped %d bad sample(s): %s", source, len(problems), dict(self.skipped))
        good = np.flatnonzero(reasons == "")
        self.indices = good.tolist()
        n_images = pc.list_value_length(records.data.column("images")).to_numpy(zero_copy_only=False)
        n_videos = pc.list_value_length(records.data.column("videos")).to_numpy(zero_copy_only=False)
        self.has_images = (n_images[good] + n_videos[good] > 0).tolist()  # image or video: one modality group
        if checks is not None:
            self.lengths = np.asarray(checks.data.column("length").to_numpy())[good].tolist()
        else:
            self.lengths = self._estimate(good, n_images)

    def _count(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        self.skipped_ids.append(err.sample_id)

    def _estimate(self, good: np.ndarray, n_images: np.ndarray) -> list[int]:
        """Cheap lengths without the pre-check: LLaVA's word count plus nominal visual tokens per image."""
        counter = getattr(self.encoder.processor, "_get_num_multimodal_tokens", None)
        try:
            per_image = counter(image_sizes=[NOMINAL_IMAGE_SIZE])["num_image_tokens"][0] if counter else 0
        except Exception:  # noqa: BLE001 (an estimate only: processors differ in what they need)
            per_image = 0
        texts = _column(self.records, "texts")
        return [sum(len(t.split()) for t in texts[i]) + per_image * int(n_images[i]) for i in good]

    def _row(self, i: int) -> Record:
        return row_to_record(self.records[i], self.source)

    def record(self, idx: int) -> Record:
        """The normalised record behind item `idx` (skipped samples are not counted)."""
        return self._row(self.indices[idx])

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention for `group_by_modality_length`: +length for image samples, -length for text-only."""
        return [n if img else -n for n, img in zip(self.lengths, self.has_images)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        idx %= len(self)
        for step in range(len(self.indices)):
            pos = (idx + step) % len(self.indices)
            if pos not in self.runtime_skipped:
                try:
                    item = self.encoder.encode(self._row(self.indices[pos]))
                except DataError as err:
                    if not self.skip_bad_samples:
                        raise
                    reason = err.reason if err.reason in RUNTIME_REASONS else "bad_sample"
                    self.runtime_skipped[pos] = reason
                    self._count(err)
                    logger.warning("skipping (data.skip_bad_samples=true): %s", err)
                else:
                    if step and self.report_skips:  # the sample drawn, which this one stands in for
                        code = RUNTIME_REASONS.index(self.runtime_skipped[idx])
                        item[SKIPPED_KEY] = torch.tensor([[idx, code]], dtype=torch.long)  # [1, 2]
                    return item
        raise DataError(f"{self.source}: every sample of the data set failed to load")


def build_dataset(
    path: str | os.PathLike,
    processor: Any,
    *,
    image_folder: str | os.PathLike | None = None,
    template: str = "vicuna_v1",
    max_length: int = 2048,
    skip_bad_samples: bool = False,
    precheck: bool = True,
    pad_to_square: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    purpose: str = "training",
) -> SupervisedDataset:
    """Load a LLaVA / HF-messages JSON(L) file as a `SupervisedDataset`.

    Args:
        path: the `.json` / `.jsonl` file.
        processor: the model's processor (or a tokenizer, for text-only data).
        image_folder: folder the image paths are relative to (default: the data file's folder).
        template: ``vicuna_v1`` (LLaVA-1.5) or ``chat_template`` (the processor's own template).
        max_length: longest sequence, visual tokens included.
        skip_bad_samples: skip and count bad samples (``dataset.skipped``) instead of raising.
        precheck: validate all samples up front (see `libra_train.data.precheck`); also makes the lengths
            exact. Off: only the problems found while reading the file are reported before training.
        pad_to_square: pad images to squares (LLaVA-1.5 "pad"); None = only for ``vicuna_v1``.
        cache_dir: keep the normalised records and the pre-check there, keyed by file and configuration, so
            that later builds (resumes, other ranks) load them instead of recomputing; None = no cache.
        num_proc: pre-check worker processes (None: one per 5,000 records, at most one per core).
        purpose: ``training`` or ``evaluation``, for the wording of problems.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    image_folder = Path(path).parent if image_folder is None else image_folder
    encoder = Encoder(processor, template, max_length, image_folder, pad_to_square, purpose)
    records = load_cached_records(path, cache_dir, purpose)
    n_videos = pc.list_value_length(records.data.column("videos")).to_numpy(zero_copy_only=False)
    if n_videos.any():  # before the (parallel) pre-check: a processor without a video part stops the run here
        encoder.check_video_support([row_to_record(records[int(np.argmax(n_videos > 0))], str(path))])
    checks = (
        check_records(records, encoder, source=str(path), cache_dir=cache_dir, num_proc=num_proc)
        if precheck
        else None
    )
    return SupervisedDataset(
        records, encoder, checks=checks, skip_bad_samples=skip_bad_samples, source=str(path)
    )
