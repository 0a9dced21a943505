"""One record -> model inputs: input_ids, labels, attention_mask, pixel_values (+ extras the model needs).

Method (label boundaries stay exact whatever the tokenizer):
1. `templates.render` gives the prompt text (one image token per image) and the character spans to train on.
2. The text is tokenized with offsets (`tokenize_prompts`). ``vicuna_v1`` follows LLaVA's
   `tokenizer_image_token`: the prompt is cut at each image token and every text piece is tokenized on its own
   (see `templates` for the rule and why); ``chat_template`` tokenizes the prompt in one call, as the processor
   does.
3. The processor is called on the prompt with the images: it computes the pixel values and expands each image
   token to the number of visual tokens the model produces (LLaVA: (image_size/patch)^2; LLaVA-NeXT: depends on
   the aspect ratio; Qwen2-VL: on the grid). ``chat_template`` keeps the processor's ids as they are; for
   ``vicuna_v1`` the processor's image-token runs are spliced between the separately tokenized text pieces.
4. A token is trained iff it starts inside a span (its offset); everything else (system, user turns, role
   names, image tokens, BOS, the "▁" after an image) is -100.
5. Truncation to `max_length` is checked here, not left to the model: a cut through image tokens, or a sample
   left without any trained token, is a `DataError` naming the sample.

`Encoder.check_batch` does steps 1, 2, 4 and 5 without decoding pixels (image sizes from the file headers, the
visual-token counts from the processor's `_get_num_multimodal_tokens`), a batch of records per tokenizer call:
it is the pre-check `build_dataset` runs over the whole file (in parallel, cached: see `precheck`).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from libra_train.data.records import DataError, Record, is_video_file
from libra_train.data.templates import Rendered, render, splits_at_images

IGNORE_INDEX = -100
# Per-token keys the processor may return besides input_ids / attention_mask (Qwen2-VL: mm_token_type_ids).
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
DROP_KEYS = ("offset_mapping", "text_replacement_offsets")
# What a message suggests, by purpose: training runs can skip bad samples; generation / evaluation cannot.
HINTS = {
    "training": {"skip": "or set data.skip_bad_samples=true to leave it out", "folder": "data.image_folder"},
    "evaluation": {"skip": "or leave the sample out of the evaluation", "folder": "the image folder"},
}

Offsets = list[tuple[int, int]]


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


def labels_from_offsets(ids: list[int], offsets: Offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the token id where the token starts inside a span (and is not empty), else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, e) in enumerate(offsets):
        if e > s and any(a <= s < b for a, b in spans):
            labels[i] = ids[i]
    return labels


def tokenize_prompts(
    tokenizer: Any, texts: Sequence[str], image_token: str | None, split_at_images: bool
) -> list[tuple[list[int], Offsets]]:
    """Token ids and character offsets (into each text) of prompts holding one image token per image.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        texts: rendered prompts, image tokens not expanded.
        image_token: the processor's image token (None: text-only, nothing to split at).
        split_at_images: LLaVA's `tokenizer_image_token`: cut each text at its image tokens; the first piece is
            tokenized with the tokenizer's special tokens (BOS), the others without, and one image-token id goes
            between consecutive pieces. Otherwise each text is tokenized whole.

    Returns:
        ``(ids, offsets)`` per text; with `split_at_images` an image token's offset is its place in the text.
    """
    if not texts:
        return []
    if not split_at_images or not image_token:
        enc = tokenizer(list(texts), return_offsets_mapping=True)
        return [(list(ids), list(offs)) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    pieces = [text.split(image_token) for text in texts]
    first = tokenizer([p[0] for p in pieces], return_offsets_mapping=True)
    rest_text = [piece for p in pieces for piece in p[1:]]
    rest = tokenizer(rest_text, add_special_tokens=False, return_offsets_mapping=True) if rest_text else None
    out, r = [], 0
    for k, parts in enumerate(pieces):
        ids, offsets = list(first["input_ids"][k]), list(first["offset_mapping"][k])
        pos = len(parts[0])
        for part in parts[1:]:
            ids.append(image_id)
            offsets.append((pos, pos + len(image_token)))
            pos += len(image_token)
            ids += rest["input_ids"][r]
            offsets += [(pos + s, pos + e) for s, e in rest["offset_mapping"][r]]
            pos += len(part)
            r += 1
        out.append((ids, offsets))
    return out


def image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of `image_token_id` in `ids`."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != image_token_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio="pad"``: pad to a centred square with the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def video_decoder_available() -> bool:
    """Whether transformers can decode a video file here (torchcodec with FFmpeg, or torchvision's old reader)."""
    from transformers.utils import import_utils

    usable = getattr(import_utils, "is_torchcodec_usable", None)
    if usable is not None and usable(decode="video"):
        return True
    try:
        from transformers.video_utils import is_torchvision_video_decoding_available
    except ImportError:
        return False
    return bool(is_torchvision_video_decoding_available())


class Encoder:
    """Turns `Record`s into tensors for one processor / template / max length.

    Args:
        processor: a transformers processor (LlavaProcessor, LlavaNextProcessor, Qwen2VLProcessor, ...).
        template: ``"vicuna_v1"`` or ``"chat_template"``.
        max_length: longest sequence, visual tokens included.
        image_folder: folder that relative image paths are resolved against.
        pad_to_square: pad images to squares first (LLaVA-1.5's "pad"); None = only for ``vicuna_v1``.
        purpose: ``training`` or ``evaluation``: what the error messages suggest.
    """

    def __init__(
        self,
        processor: Any,
        template: str,
        max_length: int,
        image_folder: str | os.PathLike | None = None,
        pad_to_square: bool | None = None,
        purpose: str = "training",
    ):
        self.processor = processor
        self.hints = HINTS[purpose]
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
        self.split_at_images = splits_at_images(template) and self.image_token is not None
        self.video_token = getattr(processor, "video_token", None) or getattr(
            self.tokenizer, "video_token", None
        )
        self.video_token_id = (
            self.tokenizer.convert_tokens_to_ids(self.video_token) if self.video_token else None
        )
        mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(int(x * 255) for x in mean)

    # -- images -------------------------------------------------------------------------------------------------
    def image_path(self, record: Record, path: str, kind: str = "image") -> str:
        """Resolve `path` against the image folder; DataError when the file is missing.

        Args:
            kind: ``image`` or ``video`` (a video file or frame): the reason code and wording.
        """
        full = (
            path
            if os.path.isabs(path) or self.image_folder is None
            else os.path.join(self.image_folder, path)
        )
        if not os.path.isfile(full):
            what = "image file" if kind == "image" else "video file or frame"
            raise DataError(
                record.id,
                f"missing_{kind}",
                f"{what} {full} not found; check {self.hints['folder']} and the path in the record, "
                + self.hints["skip"],
                record.source,
            )
        return full

    def load_image(self, record: Record, path: str, kind: str = "image") -> Image.Image:
        """Open an image (or a video frame: `kind` ``video``) as RGB, padded to a square if configured;
        DataError when missing or unreadable.

        Any exception of the decoder counts as unreadable: PIL reports damaged files as OSError, SyntaxError
        ("broken PNG file"), EOFError, zlib or struct errors, ValueError..., depending on where the damage is.
        """
        full = self.image_path(record, path, kind)
        try:
            with Image.open(full) as img:
                image = img.convert("RGB")
        except Exception as err:  # noqa: BLE001 (see the docstring: the decoder's failures have many types)
            raise self._unreadable(record, full, kind, "decode", f"{type(err).__name__}: {err}") from err
        return expand2square(image, self.background) if self.pad_to_square else image

    def image_size(self, record: Record, path: str, kind: str = "image") -> tuple[int, int]:
        """``(height, width)`` as the processor will see it (after square padding), read from the header."""
        full = self.image_path(record, path, kind)
        try:
            with Image.open(full) as img:
                w, h = img.size
        except Exception as err:  # noqa: BLE001 (as in load_image)
            raise self._unreadable(record, full, kind, "read", str(err)) from err
        return (max(w, h), max(w, h)) if self.pad_to_square else (h, w)

    def _unreadable(self, record: Record, full: str, kind: str, verb: str, detail: str) -> DataError:
        """The error of an image (or video frame) file that cannot be read or decoded."""
        what = "image" if kind == "image" else "video frame"
        return DataError(
            record.id,
            f"unreadable_{kind}",
            f"cannot {verb} {what} {full} ({detail}); replace the file, {self.hints['skip']}",
            record.source,
        )

    # -- videos -------------------------------------------------------------------------------------------------
    def check_video_support(self, records: Sequence[Record]) -> None:
        """Raise (not a DataError: no sample is at fault, and skipping every video would hide it) when records
        hold videos that this processor / template cannot encode."""
        record = next((r for r in records if r.videos), None)
        if record is None:
            return
        where = f"sample {record.id!r}" + (f" in {record.source}" if record.source else "")
        if self.split_at_images:
            raise ValueError(
                f"{where} has a video, but template={self.template!r} is LLaVA-1.5's image-only format; video "
                "models (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision) train with data.template=chat_template"
            )
        if hasattr(self.processor, "video_processor") and self.video_token_id is not None:
            self._check_video_decoder(records)
            return
        if getattr(self.processor, "libra_video_missing", False):
            from libra_train.models import TORCHVISION_HINT

            raise ImportError(
                f"{where} has a video, but the processor was loaded without its video part because torchvision "
                f"is not installed (every transformers video processor needs it); install it with "
                f"{TORCHVISION_HINT}, or leave the video samples out of the data"
            )
        raise ValueError(
            f"{where} has a video, but {type(self.processor).__name__} takes no videos; use a video model's "
            "checkpoint (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) or leave the video samples out of the data"
        )

    def _check_video_decoder(self, records: Sequence[Record]) -> None:
        """Raise when a record holds a video *file* and the processor's video part cannot decode one here.

        transformers' video processors decode files with torchcodec, which loads FFmpeg's shared libraries
        (torchvision's reader, the fallback, is gone from torchvision 0.26). Without them the first video file
        would stop the run mid-epoch; this stops it at the pre-check. Frame lists need no decoder.
        """
        record = next((r for r in records if any(is_video_file(v) for v in r.videos)), None)
        video_processor = getattr(self.processor, "video_processor", None)
        if record is None or not any(
            c.__name__ == "BaseVideoProcessor" for c in type(video_processor).__mro__
        ):
            return  # no file, or a video part that is not transformers' (it decodes by its own means)
        if video_decoder_available():
            return
        where = f"sample {record.id!r}" + (f" in {record.source}" if record.source else "")
        file = next(v[0] for v in record.videos if is_video_file(v))
        raise ImportError(
            f"{where} has a video file ({file}), but no video decoder works here: transformers' video processors "
            "decode files with torchcodec, which needs FFmpeg's shared libraries. Install both (pip install "
            "torchcodec, the release built for the installed torch; FFmpeg 4-7: apt install ffmpeg or conda "
            "install ffmpeg), or give the video as a list of frame images"
        )

    def load_video(self, record: Record, video: list[str]) -> list[Image.Image] | str:
        """A record's video as the processor takes it: its frames as RGB images, in order, or the resolved path
        of a video file (the processor's video part decodes and samples it). DataError when a file is missing
        or a frame unreadable."""
        if is_video_file(video):
            return self.image_path(record, video[0], "video")
        return [self.load_image(record, frame, "video") for frame in video]

    def check_video_files(self, record: Record) -> None:
        """The pre-check of a record's videos: every file exists, every frame's header reads."""
        for video in record.videos:
            if is_video_file(video):
                self.image_path(record, video[0], "video")
            else:
                for frame in video:
                    self.image_size(record, frame, "video")

    # -- checks -------------------------------------------------------------------------------------------------
    def _verdict(self, record: Record, length: int, image_end: int, first_label: int | None) -> int:
        """The kept length (<= max_length) of a sample, or its DataError.

        Args:
            length: tokens with the image tokens expanded.
            image_end: position after its last image or video token (0 without any).
            first_label: position of its first trained token (None: no trained token).
        """
        keep = min(length, self.max_length)
        if image_end > keep:
            raise DataError(
                record.id,
                "image_truncated",
                f"{length} tokens with the image / video tokens expanded; max_length={self.max_length} would cut "
                "them (the model would then fail with a visual features/tokens mismatch); raise "
                f"data.max_length or shorten the sample, {self.hints['skip']}",
                record.source,
            )
        if first_label is None or first_label >= keep:
            why = "after truncation to max_length=" + str(self.max_length) if keep < length else "at all"
            raise DataError(
                record.id,
                "no_labels",
                f"no trained (assistant) token {why}; raise data.max_length or fix the sample, {self.hints['skip']}",
                record.source,
            )
        return keep

    def _finish(self, record: Record, ids: list[int], labels: list[int]) -> int:
        """`_verdict` of an encoded sample (expanded ids and their labels)."""
        visual = {t for t in (self.image_token_id, self.video_token_id) if t is not None}
        images = [i for i, t in enumerate(ids) if t in visual]
        first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), None)
        return self._verdict(record, len(ids), images[-1] + 1 if images else 0, first)

    def _measure(
        self, ids: list[int], offsets: Offsets, spans: list[tuple[int, int]], counts: list[int]
    ) -> tuple[int, int, int | None]:
        """`_verdict`'s numbers for unexpanded ids, without building the expanded sequence (the pre-check's
        hot path): ``(length, image_end, first_label)``, as `_finish` would find them after the expansion.

        Image tokens are special (added) tokens, so text on either side tokenizes the same whether the token
        stands once or expanded to ``counts[k]`` copies.
        """
        extra = sum(counts) - len(counts)
        image_end, first_label = 0, None
        if counts and self.image_token_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.image_token_id)
            image_end = last + 1 + extra
        for a, b in spans:  # offsets start in text order: jump to the first token starting in the span
            i = bisect.bisect_left(offsets, a, key=lambda o: o[0])
            while (
                i < len(offsets)
                and offsets[i][0] < b
                and (offsets[i][1] <= offsets[i][0] or ids[i] == self.image_token_id)
            ):
                i += 1  # empty tokens (BOS-like) and image tokens are never trained
            if i < len(offsets) and offsets[i][0] < b:
                seen = min(ids[:i].count(self.image_token_id), len(counts)) if counts else 0
                first_label = i + sum(c - 1 for c in counts[:seen])
                break
        return len(ids) + extra, image_end, first_label

    def _counts(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        """Visual tokens per image of the given ``(height, width)`` sizes; None if the processor cannot say."""
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if counter is None or not sizes:
            return None if sizes else []
        return list(counter(image_sizes=sizes)["num_image_tokens"])

    def check_batch(self, records: Sequence[Record]) -> list[int | DataError]:
        """Validate records without decoding pixels: per record its length after truncation, or its DataError.

        Image files must exist and their headers be readable; the number of visual tokens per image comes from
        the processor's `_get_num_multimodal_tokens` (all transformers VLM processors have it; without it the
        length checks wait for `encode`). One tokenizer call covers the whole batch.
        """
        self.check_video_support(records)
        results: list[int | DataError | None] = [None] * len(records)
        rendered: list[tuple[int, Rendered, list[tuple[int, int]]]] = []
        for k, record in enumerate(records):
            try:
                sizes = [self.image_size(record, p) for p in record.images]
                self.check_video_files(record)
                rendered.append((k, render(self.template, record.turns, self.processor), sizes))
            except DataError as err:
                results[k] = err
        flat_sizes = [s for _, _, sizes in rendered for s in sizes]
        flat_counts = self._counts(flat_sizes)
        tokens = tokenize_prompts(
            self.tokenizer, [r.text for _, r, _ in rendered], self.image_token, self.split_at_images
        )
        used = 0
        for (k, r, sizes), (ids, offsets) in zip(rendered, tokens):
            record = records[k]
            counts = None if flat_counts is None else flat_counts[used : used + len(sizes)]
            used += len(sizes)
            if (sizes and counts is None) or record.videos:
                # Visual counts unknown before encoding (no counter; videos: frames sampled by the processor):
                # the length checks wait for `encode` (`_finish`), a bad sample found then is skipped and counted.
                results[k] = min(len(ids), self.max_length)
                continue
            try:
                results[k] = self._verdict(record, *self._measure(ids, offsets, r.spans, counts or []))
            except DataError as err:
                results[k] = err
        return results  # type: ignore[return-value]

    def check(self, record: Record) -> int:
        """`check_batch` for one record: its length after truncation; raises its DataError."""
        (result,) = self.check_batch([record])
        if isinstance(result, DataError):
            raise result
        return result

    # -- encoding -----------------------------------------------------------------------------------------------
    def _splice(self, ids: list[int], offsets: Offsets, enc: Any) -> tuple[dict[str, list], Offsets]:
        """Our separately tokenized text with the processor's expanded image-token runs in place of the image
        tokens: ``(per-token values by key, offsets)``.

        Image positions take every per-token value from the processor (``mm_token_type_ids`` 1, ...); text
        positions have ``attention_mask`` 1 and 0 in the other keys, as the tokenizer gives them.
        """
        proc_ids = list(enc["input_ids"][0])
        ours, theirs = image_runs(ids, self.image_token_id), image_runs(proc_ids, self.image_token_id)
        if len(ours) != len(theirs):
            raise ValueError(
                f"the processor's prompt has {len(theirs)} image-token runs where the template has {len(ours)}; "
                f"this processor cannot be used with template={self.template!r} (use chat_template)"
            )
        keys = [k for k in TOKEN_KEYS if k in enc]
        values: dict[str, list] = {k: [] for k in keys}
        out_offsets: Offsets = []
        pos = 0
        for (start, end), (p_start, p_end) in zip([*ours, (len(ids), len(ids))], [*theirs, (0, 0)]):
            for key in keys:
                text = (
                    ids[pos:start] if key == "input_ids" else [int(key == "attention_mask")] * (start - pos)
                )
                values[key] += text + list(enc[key][0][p_start:p_end])
            out_offsets += offsets[pos:start] + [(0, 0)] * (p_end - p_start)
            pos = end
        return values, out_offsets

    def _tensors(self, record: Record, rendered: Rendered) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The prompt of `rendered` as tensors (``input_ids[L]``, ``attention_mask[L]``, per-image keys) and
        its labels (not truncated)."""
        images = [self.load_image(record, p) for p in record.images]
        if self.processor is self.tokenizer:  # a bare tokenizer: text-only data
            if images or record.videos:
                raise ValueError(
                    f"sample {record.id!r} has images or videos but a tokenizer was given instead of a processor"
                )
            enc = self.tokenizer([rendered.text], return_offsets_mapping=True)
        else:
            self.check_video_support([record])
            videos = [self.load_video(record, v) for v in record.videos]
            enc = self.processor(
                text=[rendered.text],
                images=images or None,
                videos=videos or None,
                return_offsets_mapping=True,
                return_text_replacement_offsets=not self.split_at_images,
            )
        if self.split_at_images:
            ((ids, offsets),) = tokenize_prompts(self.tokenizer, [rendered.text], self.image_token, True)
            values, offsets = self._splice(ids, offsets, enc)
            labels = labels_from_offsets(values["input_ids"], offsets, rendered.spans)
        else:
            replaced = [
                (*r["span"], r["new_span"][1] - r["new_span"][0])
                for r in enc.get("text_replacement_offsets", [[]])[0]
            ]
            values = {k: list(enc[k][0]) for k in TOKEN_KEYS if k in enc}
            spans = shift_spans(rendered.spans, replaced)
            labels = labels_from_offsets(values["input_ids"], enc["offset_mapping"][0], spans)
        out = {k: torch.as_tensor(v) for k, v in values.items()}  # [L] each
        # per-image / per-video tensors: pixel_values [n_img, ...], image_sizes, pixel_values_videos, video_grid_thw
        for key, value in enc.items():
            if key not in DROP_KEYS and key not in TOKEN_KEYS:
                out[key] = torch.as_tensor(np.asarray(value))
        return out, labels

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        """Record -> ``input_ids[L], labels[L], attention_mask[L]`` (+ ``pixel_values[n_img, ...]`` and the
        processor's other outputs, e.g. ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids[L]``).

        Text-only samples go through the processor too, so they carry the same per-token keys.
        """
        rendered = render(self.template, record.turns, self.processor)
        out, labels = self._tensors(record, rendered)
        keep = self._finish(record, out["input_ids"].tolist(), labels)
        length = len(labels)
        for key in [k for k, v in out.items() if k in TOKEN_KEYS and len(v) == length]:
            out[key] = out[key][:keep]
        return {"labels": torch.tensor(labels[:keep]), **out}

    def prompt(self, record: Record) -> dict[str, torch.Tensor]:
        """The generation prompt of a record ending with a user turn: ``input_ids[L]``, ``attention_mask[L]``
        (+ per-image keys), exactly as the training samples tokenize it, ending with the template's
        generation prompt (vicuna_v1: ``ASSISTANT:``)."""
        if not record.turns or record.turns[-1][0] != "user":
            raise DataError(record.id, "bad_roles", "a prompt must end with a user turn", record.source)
        rendered = render(self.template, record.turns, self.processor, add_generation_prompt=True)
        return self._tensors(record, rendered)[0]

    def encode_prompt(self, record: Record) -> tuple[dict[str, torch.Tensor], str]:
        """The generation prompt of a record (all turns but the last answer) and that reference answer.

        Returns:
            (``input_ids[1, L]``, ``attention_mask[1, L]`` with a batch dim of 1, ``pixel_values[n_img, ...]``
            ...; the last assistant turn's text).
        """
        if not record.turns or record.turns[-1][0] != "assistant":
            raise DataError(
                record.id, "bad_roles", "the last turn must be the answer to evaluate", record.source
            )
        inputs = self.prompt(dataclasses.replace(record, turns=record.turns[:-1]))
        return {k: v[None] if k in TOKEN_KEYS else v for k, v in inputs.items()}, record.turns[-1][1]
