"""Batched generation with the training chat template: queries -> left-padded inputs -> ``model.generate``.

Prompts are rendered and tokenized by the data package's ``Encoder.prompt`` (``templates.render`` with
``add_generation_prompt=True``, the same tokenization as the training samples: for ``vicuna_v1`` LLaVA's
piece-by-piece `tokenizer_image_token` rule, see ``libra_train.data.templates``), and images are read and padded
by it too, so a question is shown to the model exactly as in training and as LLaVA's own evaluation shows it.
Batches are left-padded, so every prompt ends at the same position and the last prompt token (the query of
Libra's importance in prefill) is each row's last position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

from libra_train.data.collate import collate
from libra_train.data.encode import Encoder, expand2square
from libra_train.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record

__all__ = ["Generation", "ImageEncoder", "Query", "build_inputs", "find_runtime", "generate", "visual_counts"]


@dataclass
class Query:
    """One generation request.

    Attributes:
        turns: ``(role, text)`` pairs ending with a user turn; one ``<image>`` placeholder per image, one
            ``<video>`` per video.
        images: image paths (relative to the image folder unless absolute), or decoded PIL images (what
            harnesses such as lmms-eval hand over).
        id: a name for messages (sample id, image path).
        videos: per video its frames (paths or PIL images, in order) or ``[path]`` of a video file, as in the
            training records (`libra_train.data.records`).
    """

    turns: list[tuple[str, str]]
    images: list[str | Image.Image] = field(default_factory=list)
    id: str = ""
    videos: list[list[str | Image.Image]] = field(default_factory=list)

    @classmethod
    def single(
        cls, question: str, image: str | None = None, id: str = "", video: list | None = None
    ) -> Query:
        """A one-turn question about at most one image and at most one video (frames or ``[file]``); the
        placeholders are added when missing."""
        if video is not None and VIDEO_PLACEHOLDER not in question:
            question = f"{VIDEO_PLACEHOLDER}\n{question}"
        if image is not None and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        name = id or (image or ("video" if video is not None else "text"))
        return cls([("user", question)], [image] if image is not None else [], name, [video] if video else [])


@dataclass
class Generation:
    """The answer to one query.

    Attributes:
        text: decoded answer, special tokens removed, stripped.
        token_ids: generated ids up to and including the end-of-sequence token.
        visual_tokens: visual tokens of this sample per compression stage (stage 0 = all of them, then after
            each point; one entry without compression; empty for a text-only query).
        prompt_tokens: tokens of the prompt before compression (padding excluded), visual ones included.
    """

    text: str
    token_ids: list[int]
    visual_tokens: list[int]
    prompt_tokens: int = 0


def find_runtime(model: nn.Module) -> Any:
    """The Libra runtime on ``model`` or on a module inside it (a peft wrapper), else None."""
    from libra_train.plugin.apply import RUNTIME_ATTR

    for module in model.modules():
        runtime = vars(module).get(RUNTIME_ATTR)
        if runtime is not None:
            return runtime
    return None


class ImageEncoder(Encoder):
    """The data package's ``Encoder``, also given already-decoded PIL images: they get the same preparation as
    the files it opens (RGB, padded to a square when the template trains that way), so an image handed over
    in memory is seen exactly as the same image read from disk."""

    def load_image(self, record: Record, path: str | Image.Image, kind: str = "image") -> Image.Image:
        if not isinstance(path, Image.Image):
            return super().load_image(record, path, kind)
        image = path.convert("RGB")
        return expand2square(image, self.background) if self.pad_to_square else image


def build_inputs(
    processor: Any,
    queries: Sequence[Query],
    template: str,
    image_folder: str | os.PathLike | None = None,
) -> Any:
    """Render, read the images and videos and tokenize a batch of queries, left-padded.

    Returns:
        A ``BatchFeature``: ``input_ids[B, L]``, ``attention_mask[B, L]`` (left padding) and the per-image
        tensors of all queries concatenated (``pixel_values[sum n_img, ...]``, ...).

    Raises:
        libra_train.data.DataError: an image is missing or cannot be decoded (the message names the file).
    """
    encoder = ImageEncoder(
        processor, template, max_length=1 << 30, image_folder=image_folder, purpose="evaluation"
    )
    prompts = []
    for query in queries:
        if not query.turns or query.turns[-1][0] != "user":
            raise ValueError(f"query {query.id!r}: the conversation must end with a user turn")
        videos = [list(v) for v in query.videos]
        prompts.append(encoder.prompt(Record(query.id, list(query.images), list(query.turns), videos=videos)))
    tokenizer = getattr(processor, "tokenizer", processor)
    return BatchFeature(collate(prompts, tokenizer.pad_token_id, padding_side="left"))


def visual_counts(model: nn.Module, runtime: Any, input_ids: torch.Tensor) -> list[list[int]]:
    """Visual tokens of each sample of the last forward per stage (``Generation.visual_tokens``).

    Args:
        model: the model that ran the forward.
        runtime: its Libra runtime (``find_runtime``), or None.
        input_ids: ``[B, L]`` the forward's input ids (counted when it did not compress).
    """
    if runtime is not None and runtime.last_visual_tokens is not None:
        stages = [t.tolist() for t in runtime.last_visual_tokens]
    else:  # no compression in this forward: the image and video tokens of the prompt
        tokens = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")]
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in (t for t in tokens if t is not None):
            visual |= input_ids == token
        stages = [visual.sum(1).tolist()]
    return [[int(s[b]) for s in stages] if stages[0][b] else [] for b in range(len(input_ids))]


@torch.no_grad()
def generate(
    model: nn.Module,
    processor: Any,
    queries: Sequence[Query],
    *,
    template: str,
    image_folder: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
) -> list[Generation]:
    """Answer a batch of queries in one ``model.generate`` call (KV cache on; Libra compresses in prefill).

    Args:
        model: a VLM, with Libra applied or not (``libra_train.infer.load``).
        processor: its processor.
        queries: the batch.
        template: ``vicuna_v1`` or ``chat_template`` (``libra_train.infer.prompt_template(export_dir)``).
        image_folder: folder relative image paths are resolved against.
        max_new_tokens: most tokens generated per query.
        do_sample: sample instead of greedy decoding (seed with ``torch.manual_seed`` for repeatability).
        temperature, top_p: sampling parameters (ignored when greedy).

    Returns:
        One :class:`Generation` per query, in order.
    """
    inputs = build_inputs(processor, queries, template, image_folder).to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    sampling: dict[str, float] = {}
    if do_sample:
        sampling["temperature"] = temperature
        if top_p is not None:
            sampling["top_p"] = top_p
    runtime = find_runtime(model)
    if runtime is not None:
        runtime.last_visual_tokens = None
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    new = output[:, inputs["input_ids"].shape[1] :].cpu()  # [B, T]: left padding, every prompt ends here
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompt_tokens = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).sum(1).tolist()  # [B]
    results = []
    for b, counts in enumerate(visual_counts(model, runtime, inputs["input_ids"].cpu())):
        ids = new[b].tolist()
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        text = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
        results.append(Generation(text, ids[:cut], counts, int(prompt_tokens[b])))
    return results
