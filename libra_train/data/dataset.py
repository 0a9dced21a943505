"""Map-style supervised dataset over a LLaVA / HF-messages file, with a pre-check and optional skipping.

Bad samples are never dropped silently. With ``skip_bad_samples=False`` (default) `build_dataset` raises a
`BadSamplesError` listing every bad sample found by the pre-check (id, file, what is wrong, what to do), and
`__getitem__` raises `DataError` for a sample that fails later (e.g. an image whose pixel data is corrupt:
the pre-check reads only headers). With ``skip_bad_samples=True`` those samples are left out and counted in
`dataset.skipped` (a Counter by reason) and the ids in `dataset.skipped_ids`; a sample failing in
`__getitem__` is replaced by the next good one and counted once (note: in DataLoader worker processes the
counter of the worker's copy is updated, so rely on the pre-check for complete counts).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from libra_train.data.encode import Encoder
from libra_train.data.records import DataError, Record, load_records, row_to_record, summarize_problems
from libra_train.data.templates import TEMPLATES

logger = logging.getLogger(__name__)
NOMINAL_IMAGE_SIZE = (336, 336)  # for length estimates without the pre-check


class BadSamplesError(ValueError):
    """Several bad samples at once; `problems` holds the individual `DataError`s."""

    def __init__(self, problems: list[DataError], hint: str):
        reasons = Counter(p.reason for p in problems)
        super().__init__(summarize_problems([str(p) for p in problems], reasons, hint))
        self.problems = problems


class SupervisedDataset(Dataset):
    """Tokenised conversations with lazily loaded images.

    Items are dicts of tensors: ``input_ids[L]``, ``labels[L]`` (-100 outside the answers),
    ``attention_mask[L]``, and for samples with images ``pixel_values[n_img, 3, H, W]`` (LLaVA; LLaVA-NeXT:
    ``[n_img, n_tiles, 3, H, W]`` + ``image_sizes[n_img, 2]``; Qwen2-VL: flattened patches + ``image_grid_thw``).

    Args:
        records: output of `load_records`.
        encoder: the `Encoder` (processor, template, max length, image folder).
        skip_bad_samples: skip and count bad samples instead of raising.
        precheck: validate every sample up front (files, placeholders, lengths, truncation, labels) without
            decoding pixels; also makes `lengths` exact. Costs about a tokenisation per sample.
        source: the data file, for messages.
    """

    def __init__(
        self,
        records: Any,
        encoder: Encoder,
        *,
        skip_bad_samples: bool = False,
        precheck: bool = True,
        source: str = "",
    ):
        self.records = records
        self.encoder = encoder
        self.skip_bad_samples = skip_bad_samples
        self.source = source
        self.skipped: Counter = Counter()
        self.skipped_ids: list[str] = []
        self._failed: set[int] = set()
        ids, reasons, errors = list(records["id"]), list(records["reason"]), list(records["error"])
        problems = [DataError.from_message(ids[i], r, errors[i]) for i, r in enumerate(reasons) if r]
        good = [i for i, r in enumerate(reasons) if not r]
        lengths: dict[int, int] = {}
        if precheck:
            for i in good:
                try:
                    lengths[i] = encoder.check(self._row(i))
                except DataError as err:
                    problems.append(err)
            good = [i for i in good if i in lengths]
        if problems and not skip_bad_samples:
            raise BadSamplesError(
                problems, "Fix these samples, or pass skip_bad_samples=True to leave them out."
            )
        for err in problems:
            self._count(err)
        if problems:
            logger.warning("%s: skipped %d bad sample(s): %s", source, len(problems), dict(self.skipped))
        self.indices = good
        images = list(records["images"])
        self.has_images = [len(images[i]) > 0 for i in good]
        self.lengths = [lengths[i] for i in good] if precheck else self._estimate(good, images)

    def _count(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        self.skipped_ids.append(err.sample_id)

    def _estimate(self, good: list[int], images: list[list[str]]) -> list[int]:
        """Cheap lengths without the pre-check: LLaVA's word count plus nominal visual tokens per image."""
        counter = getattr(self.encoder.processor, "_get_num_multimodal_tokens", None)
        try:
            per_image = counter(image_sizes=[NOMINAL_IMAGE_SIZE])["num_image_tokens"][0] if counter else 0
        except Exception:  # an estimate only: processors differ in what they need
            per_image = 0
        texts = list(self.records["texts"])
        return [sum(len(t.split()) for t in texts[i]) + per_image * len(images[i]) for i in good]

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
            i = self.indices[(idx + step) % len(self.indices)]
            try:
                return self.encoder.encode(self._row(i))
            except DataError as err:
                if not self.skip_bad_samples:
                    raise
                if i not in self._failed:
                    self._failed.add(i)
                    self._count(err)
                    logger.warning("skipping %s", err)
        raise RuntimeError("every sample of the data set failed to load")


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
) -> SupervisedDataset:
    """Load a LLaVA / HF-messages JSON(L) file as a `SupervisedDataset`.

    Args:
        path: the `.json` / `.jsonl` file.
        processor: the model's processor (or a tokenizer, for text-only data).
        image_folder: folder the image paths are relative to (default: the data file's folder).
        template: ``vicuna_v1`` (LLaVA-1.5) or ``chat_template`` (the processor's own template).
        max_length: longest sequence, visual tokens included.
        skip_bad_samples: skip and count bad samples (``dataset.skipped``) instead of raising.
        precheck: validate all samples up front (see `SupervisedDataset`).
        pad_to_square: pad images to squares (LLaVA-1.5 "pad"); None = only for ``vicuna_v1``.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    image_folder = Path(path).parent if image_folder is None else image_folder
    records = load_records(path)
    encoder = Encoder(processor, template, max_length, image_folder, pad_to_square)
    return SupervisedDataset(
        records, encoder, skip_bad_samples=skip_bad_samples, precheck=precheck, source=str(path)
    )
