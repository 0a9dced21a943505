"""One record -> model inputs: input_ids, labels, attention_mask, pixel_values (+ extras the model needs).

Method (label boundaries stay exact whatever the tokenizer):
1. `templates.render` gives the prompt text (one image token per image) and the character spans to train on.
2. The processor is called on the whole prompt with the images: it expands each image token to the number
   of visual tokens the model produces (LLaVA: (image_size/patch)^2; LLaVA-NeXT: depends on the aspect ratio;
   Qwen2-VL: on the grid) and returns `text_replacement_offsets`; the spans are shifted through these
   replacements into the expanded text.
3. The tokenizer's offsets (`return_offsets_mapping`) say where each token starts: a token is trained iff it
   starts inside a span; everything else (system, user turns, role names, image tokens, BOS) is -100.
4. Truncation to `max_length` is checked here, not left to the model: a cut through image tokens, or a sample
   left without any trained token, is a `DataError` naming the sample.

`Encoder.check` does steps 1-4 without decoding pixels (image sizes from the file headers and the processor's
`_get_num_multimodal_tokens`): it is the cheap pre-check `build_dataset` runs over the whole file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from libra_train.data.records import DataError, Record
from libra_train.data.templates import render

IGNORE_INDEX = -100
# Per-token keys the processor may return besides input_ids / attention_mask (Qwen2-VL: mm_token_type_ids).
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
DROP_KEYS = ("offset_mapping", "text_replacement_offsets")


def shift_spans(
    spans: list[tuple[int, int]], replacements: list[tuple[int, int, int]]
) -> list[tuple[int, int]]:
    """Map character spans through text replacements.

    Args:
        spans: ``[start, end)`` spans in the original text (never overlapping a replaced range).
        replacements: ``(start, end, new_length)`` of each replaced range in the original text.
    """

    def move(pos: int) -> int:
        return pos + sum(n - (e - s) for s, e, n in replacements if e <= pos)

    return [(move(s), move(e)) for s, e in spans]


def labels_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels: the token id where the token starts inside a span (and is not empty), else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, e) in enumerate(offsets):
        if e > s and any(a <= s < b for a, b in spans):
            labels[i] = ids[i]
    return labels


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio="pad"``: pad to a centred square with the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


class Encoder:
    """Turns `Record`s into tensors for one processor / template / max length.

    Args:
        processor: a transformers processor (LlavaProcessor, LlavaNextProcessor, Qwen2VLProcessor, ...).
        template: ``"vicuna_v1"`` or ``"chat_template"``.
        max_length: longest sequence, visual tokens included.
        image_folder: folder that relative image paths are resolved against.
        pad_to_square: pad images to squares first (LLaVA-1.5's "pad"); None = only for ``vicuna_v1``.
    """

    def __init__(
        self,
        processor: Any,
        template: str,
        max_length: int,
        image_folder: str | os.PathLike | None = None,
        pad_to_square: bool | None = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = template
        self.max_length = max_length
        self.image_folder = image_folder
        self.pad_to_square = template == "vicuna_v1" if pad_to_square is None else pad_to_square
        self.image_token = getattr(processor, "image_token", None) or getattr(
            self.tokenizer, "image_token", None
        )
        self.image_token_id = (
            self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None
        )
        mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(int(x * 255) for x in mean)

    def image_path(self, record: Record, path: str) -> str:
        """Resolve `path` against the image folder; DataError when the file is missing."""
        full = (
            path
            if os.path.isabs(path) or self.image_folder is None
            else os.path.join(self.image_folder, path)
        )
        if not os.path.isfile(full):
            raise DataError(
                record.id,
                "missing_image",
                f"image file {full} not found; check image_folder and the path in the record",
                record.source,
            )
        return full

    def load_image(self, record: Record, path: str) -> Image.Image:
        """Open an image as RGB (padded to a square if configured); DataError when missing or unreadable."""
        full = self.image_path(record, path)
        try:
            with Image.open(full) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(
                record.id,
                "unreadable_image",
                f"cannot decode image {full} ({err}); replace or remove the file",
                record.source,
            ) from err
        return expand2square(image, self.background) if self.pad_to_square else image

    def _finish(self, record: Record, ids: list[int], labels: list[int]) -> int:
        """Check truncation and labels; return the kept length (<= max_length)."""
        keep = min(len(ids), self.max_length)
        if self.image_token_id is not None and self.image_token_id in ids[keep:]:
            raise DataError(
                record.id,
                "image_truncated",
                f"{len(ids)} tokens with the image tokens expanded; max_length={self.max_length} would cut image "
                "tokens (the model would then fail with an image features/tokens mismatch); raise max_length or "
                "shorten the sample",
                record.source,
            )
        if all(x == IGNORE_INDEX for x in labels[:keep]):
            why = "after truncation to max_length=" + str(self.max_length) if keep < len(ids) else "at all"
            raise DataError(
                record.id,
                "no_labels",
                f"no trained (assistant) token {why}; raise max_length or fix the sample",
                record.source,
            )
        return keep

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, return_offsets_mapping=True)
        return enc["input_ids"], labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans)

    def check(self, record: Record) -> int:
        """Validate a record without decoding pixels; return its sequence length after truncation.

        Image files must exist and their headers be readable; the number of visual tokens per image comes from
        the processor's `_get_num_multimodal_tokens` (all transformers VLM processors have it); if the
        processor lacks it, the length checks wait for `encode`.
        """
        rendered = render(self.template, record.turns, self.processor)
        sizes = []
        for path in record.images:
            full = self.image_path(record, path)
            try:
                with Image.open(full) as img:
                    w, h = img.size
            except (OSError, ValueError) as err:
                raise DataError(
                    record.id, "unreadable_image", f"cannot read image {full} ({err})", record.source
                ) from err
            sizes.append((max(w, h), max(w, h)) if self.pad_to_square else (h, w))
        text, spans = rendered.text, rendered.spans
        if sizes:
            counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
            if counter is None:
                return min(len(self.tokenizer(text)["input_ids"]), self.max_length)
            counts = counter(image_sizes=sizes)["num_image_tokens"]
            pieces, replacements, pos = text.split(self.image_token), [], 0
            for k, n in enumerate(counts):
                pos += len(pieces[k])
                replacements.append((pos, pos + len(self.image_token), n * len(self.image_token)))
                pos += len(self.image_token)
            text = "".join(
                p + (self.image_token * counts[k] if k < len(counts) else "") for k, p in enumerate(pieces)
            )
            spans = shift_spans(spans, replacements)
        ids, labels = self._tokenize(text, spans)
        return self._finish(record, ids, labels)

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        """Record -> ``input_ids[L], labels[L], attention_mask[L]`` (+ ``pixel_values[n_img, ...]`` and the
        processor's other outputs, e.g. ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids[L]``).

        Text-only samples go through the processor too, so they carry the same per-token keys.
        """
        rendered = render(self.template, record.turns, self.processor)
        images = [self.load_image(record, p) for p in record.images]
        if self.processor is self.tokenizer:  # a bare tokenizer: text-only data
            if images:
                raise ValueError(
                    f"sample {record.id!r} has images but a tokenizer was given instead of a processor"
                )
            enc = self.tokenizer([rendered.text], return_offsets_mapping=True)
        else:
            enc = self.processor(
                text=[rendered.text],
                images=images or None,
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
            )
        replaced = [
            (*r["span"], r["new_span"][1] - r["new_span"][0])
            for r in enc.get("text_replacement_offsets", [[]])[0]
        ]
        ids = list(enc["input_ids"][0])
        labels = labels_from_offsets(ids, enc["offset_mapping"][0], shift_spans(rendered.spans, replaced))
        keep = self._finish(record, ids, labels)
        out = {"labels": torch.tensor(labels[:keep])}
        for key, value in enc.items():
            if key in DROP_KEYS:
                continue
            if key in TOKEN_KEYS:
                out[key] = torch.as_tensor(value[0][:keep])  # [L]
            else:  # per-image tensors: pixel_values [n_img, ...], image_sizes, image_grid_thw, ...
                out[key] = torch.as_tensor(np.asarray(value))
        return out

    def encode_prompt(self, record: Record) -> tuple[dict[str, torch.Tensor], str]:
        """The generation prompt of a record (all turns but the last answer) and that reference answer.

        Returns:
            (processor outputs with a batch dim of 1: ``input_ids[1, L]``, ``attention_mask[1, L]``,
            ``pixel_values[n_img, ...]`` ...; the last assistant turn's text).
        """
        if not record.turns or record.turns[-1][0] != "assistant":
            raise DataError(
                record.id, "bad_roles", "the last turn must be the answer to evaluate", record.source
            )
        rendered = render(self.template, record.turns[:-1], self.processor, add_generation_prompt=True)
        images = [self.load_image(record, p) for p in record.images]
        if self.processor is self.tokenizer:
            enc = self.tokenizer([rendered.text], return_tensors="pt")
        else:
            enc = self.processor(text=[rendered.text], images=images or None, return_tensors="pt")
        return dict(enc), record.turns[-1][1]
