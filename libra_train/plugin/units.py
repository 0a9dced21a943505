"""Compression units: which visual tokens of a sample are compressed together (``LibraConfig.unit``).

``sample``: all of a sample's visual tokens are one span (one set of intervals, one compensation token after the
last image). ``image``: each image (or video) is its own span, with its own intervals, targets, temperature and
compensation token at its end; ``frame``: each image one span and each video frame one span. With the paper's
single image per sample the three are the same compression.

Where the units come from, per family (the forward's own inputs; nothing is read back from the device here):

- every family: each maximal run of visual positions is at least one unit (the families put text or separator
  tokens between images: Qwen-VL's vision start/end tokens, LLaVA's ``"\\n"`` after each ``<image>`` in the
  usual prompts);
- adjacent placeholders (``<image><image>`` in LLaVA-1.5 / NeXT / OneVision prompts) make ONE run, so images
  and videos are also cut by their feature counts: the multimodal model fills the placeholders with the
  features of its images (videos) in batch order, so item ``i`` holds the next ``count_i`` placeholders. The
  counts are the lengths of the features: recorded from the instance's ``get_image_features`` /
  ``get_video_features`` while the forward runs (wrappers set by ``apply_libra`` on the LLaVA families), or read
  from the ``mm_encoder_outputs`` a caller passes (``generate`` encodes the images before the prefill);
- LLaVA-OneVision video (each video is ``F`` frames of ``p = ceil(s / 2)**2`` pooled tokens, ``s = image_size /
  patch_size``, then one ``image_newline``): ``image`` is the whole video (newline included), ``frame`` cuts it
  into its ``F`` frames and leaves the newline out of every unit: a separator, carried unchanged as text is;
- Qwen2-VL / Qwen2.5-VL video (one run per video): ``frame`` cuts the run into its ``t`` temporal groups of
  ``h * w / merge**2`` tokens, from ``video_grid_thw`` of the call or, in ``generate`` (which passes
  ``position_ids`` and no grid), where the M-RoPE height and width ids return to the run's first ones (each
  group starts at its top-left patch; the temporal ids may repeat after time scaling, these never do);
- Qwen3-VL video (the processor writes every frame as its own run, a timestamp between them): ``frame`` is each
  run; ``image`` joins the runs of each video (``video_grid_thw``'s ``t``, or the video's feature count) into
  one unit, the timestamps in between carried as text;
- ``visual_span(mask, units=...)`` gives the units explicitly (a text LM fed ``inputs_embeds``; without
  ``units`` its runs are used).

The family defaults (:func:`default_unit`): ``image`` for LLaVA-1.5 / NeXT (the paper's single-image setting is
unchanged, several images no longer share intervals or a compensation token) and ``frame`` for the video
families (the same as ``image`` for images; a video's intervals stay inside a frame, so every frame keeps its own
spatial coverage, and no compensation token mixes frames; one compensation token per frame per point).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

UNIT_DEFAULTS = {  # model_type -> unit; every other model: "image"
    "qwen2_vl": "frame",
    "qwen2_5_vl": "frame",
    "qwen3_vl": "frame",
    "llava_onevision": "frame",
}
TEXT, IMAGE, VIDEO = 0, 1, 2  # token kinds
RECORDING_FAMILIES = ("llava", "llava_next", "llava_onevision")  # feature counts recorded in the forward
QWEN_SPLIT_FRAMES = ("qwen2_vl", "qwen2_5_vl")  # one run per video: "frame" splits it
QWEN_FRAME_RUNS = ("qwen3_vl",)  # one run per frame: "image" joins them


def default_unit(model: nn.Module) -> str:
    """The unit a model family compresses by when ``LibraConfig.unit`` is None."""
    return UNIT_DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None), "image")


def run_units(visual: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` long: the index of the visual run each visual position belongs to (``0, 1, ...`` per sample),
    -1 at other positions."""
    previous = torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    starts = visual & ~previous
    return (starts.long().cumsum(1) - 1).masked_fill(~visual, -1)


def units_from_keys(visual: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` unit of each visual position (``0, 1, ...`` per sample in position order, -1 elsewhere).

    A new unit starts at a sample's first visual position and wherever one of ``keys`` (``[B, L]`` each)
    differs from its value at the sample's previous visual position (text in between does not start one).
    """
    pos = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, pos, -1).cummax(1).values
    previous = torch.nn.functional.pad(last_visual, (1, 0), value=-1)[:, :-1]  # [B, L] previous visual index
    starts = visual & (previous < 0)
    for key in keys:
        starts |= visual & (key != key.gather(1, previous.clamp_min(0)))
    return (starts.long().cumsum(1) - 1).masked_fill(~visual, -1)


def spread(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values [T]`` placed on the True positions of ``mask [B, L]`` in row-major order (as ``masked_scatter``
    fills a multimodal model's placeholders): ``[B, L]`` long, -1 elsewhere and past the end of ``values``."""
    flat = mask.flatten()
    rank = flat.long().cumsum(0) - 1
    if values.numel() == 0:
        return torch.full_like(mask, -1, dtype=torch.long)
    out = values[rank.clamp(0, values.numel() - 1)]
    return torch.where(flat & (rank < values.numel()), out, -1).view(mask.shape)


def _run_offsets(runs_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the runs of ``runs_of [B, L]`` (bool): ``(global run index in batch order, offset in the run, index of
    the run's first position)``, each ``[B, L]``."""
    pos = torch.arange(runs_of.shape[1], device=runs_of.device)
    starts = runs_of & ~torch.nn.functional.pad(runs_of, (1, 0))[:, :-1]
    index = starts.flatten().long().cumsum(0).view(runs_of.shape) - 1
    first = torch.where(starts, pos, -1).cummax(1).values
    return index, pos - first, first.clamp_min(0)


def qwen_frames(
    video: torch.Tensor, video_grid_thw: torch.Tensor | None, position_ids: torch.Tensor | None, merge: int
) -> torch.Tensor | None:
    """``[B, L]`` temporal group of each token of a Qwen2-VL / 2.5-VL video run (one run per video), or None.

    From the grid (``h * w / merge**2`` tokens a group), else from M-RoPE ``position_ids`` (``[3|4, B, L]``, the
    last two rows height and width): a group starts where both return to the run's first values.
    """
    run, offset, first = _run_offsets(video)
    if video_grid_thw is not None and len(video_grid_thw):
        grid = video_grid_thw.to(video.device).long()
        frame_size = (grid[:, 1] * grid[:, 2]) // merge**2
        return offset // frame_size[run.clamp(0, len(grid) - 1)]
    if position_ids is None or position_ids.ndim != 3:
        return None
    height, width = position_ids[-2].to(video.device), position_ids[-1].to(video.device)
    corner = (height == height.gather(1, first)) & (width == width.gather(1, first)) & video
    return corner.long().cumsum(1) - corner.long().cumsum(1).gather(1, first)


def _items(counts: Sequence[int], device) -> torch.Tensor:
    """``[sum(counts)]`` the item index of each feature token (device fills: no host-to-device copy)."""
    return torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])


def _frame_ids(tokens: int, per_frame: int | None, device) -> torch.Tensor:
    """Frame index of each token of a OneVision video of ``tokens = F * per_frame + 1`` (the newline: -1).

    A video of another shape (another pooling) stays one unit, newline included.
    """
    if not per_frame or (tokens - 1) % per_frame or tokens < 2:
        return torch.zeros(tokens, dtype=torch.long, device=device)
    index = torch.arange(tokens, device=device) // per_frame
    return index.masked_fill(index >= (tokens - 1) // per_frame, -1)


@dataclass
class UnitSource:
    """What one forward tells about its visual tokens, to cut them into units (one per prefill/training forward).

    Built at the forward's entry from its call; the feature recorders of the LLaVA families add the image and
    video feature counts while the multimodal model runs; :meth:`resolve` (at the first compression, after the
    features) gives the units. Everything is computed on the device from host-known counts (no device read).

    Attributes:
        family: the model's ``model_type``.
        unit: ``image`` or ``frame``.
        entry_units: ``[B, L]`` units known at the entry (runs, Qwen2-VL's frames, or ``visual_span(units=...)``).
        kind: ``[B, L]`` long token kind (``TEXT`` / ``IMAGE`` / ``VIDEO``), or None when only the visual mask is
            known (``visual_span``).
        explicit: the units were given by ``visual_span(units=...)``: used as they are.
        video_item: ``[B, L]`` video index of each video token from ``video_grid_thw`` (Qwen3-VL), or None.
        frame_tokens: pooled tokens per video frame (LLaVA-OneVision), or None.
        image_counts, video_counts: feature tokens of each image / video, in batch order (recorded or given).
    """

    family: str | None
    unit: str
    entry_units: torch.Tensor
    kind: torch.Tensor | None = None
    explicit: bool = False
    video_item: torch.Tensor | None = None
    frame_tokens: int | None = None
    image_counts: list[int] | None = None
    video_counts: list[int] | None = None

    @classmethod
    def at_entry(
        cls,
        family: str | None,
        unit: str,
        visual: torch.Tensor,
        kind: torch.Tensor | None,
        call: dict,
        *,
        merge: int = 1,
        frame_tokens: int | None = None,
    ) -> UnitSource:
        """The units the entry's call tells: runs, the Qwen video rules, the counts of ``mm_encoder_outputs``."""
        source = cls(family, unit, run_units(visual), kind, frame_tokens=frame_tokens)
        encoded = call.get("mm_encoder_outputs") or {}
        for what in ("image", "video"):
            counts = feature_counts(encoded.get(what))
            if counts is not None:
                source.record(what, counts)
        if kind is None:
            return source
        video, grid = kind == VIDEO, call.get("video_grid_thw")
        if family in QWEN_SPLIT_FRAMES and unit == "frame":
            frames = qwen_frames(video, grid, call.get("position_ids"), merge)
            if frames is not None:
                source.entry_units = units_from_keys(
                    visual, source.entry_units, frames.masked_fill(~video, -1)
                )
        if family in QWEN_FRAME_RUNS and unit == "image" and grid is not None and len(grid):
            run, _, _ = _run_offsets(video)  # a frame run's index -> its video: t runs each
            video_item = torch.searchsorted(grid[:, 0].to(visual.device).long().cumsum(0), run, right=True)
            source.video_item = video_item.masked_fill(~video, -1)
        return source

    def record(self, what: str, counts: Sequence[int]) -> None:
        """Feature tokens of each ``image`` / ``video`` of the forward, in batch order."""
        if what == "image":
            self.image_counts = [*(self.image_counts or []), *counts]
        else:
            self.video_counts = [*(self.video_counts or []), *counts]

    def extra_units(self) -> int:
        """How many units the counts can add to a sample at most (host-side: sizes the per-unit count read)."""
        if self.explicit or self.kind is None:
            return 0
        videos = self.video_counts or ()
        frames = sum(max(1, (n - 1) // self.frame_tokens) for n in videos) if self.frame_tokens else 0
        return len(self.image_counts or ()) + len(videos) + frames

    def resolve(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(units [B, L], visual [B, L])`` for the compressed visual positions ``visual``.

        ``visual`` comes back narrowed where a token belongs to no unit (OneVision's video newline in ``frame``
        mode).
        """
        if self.explicit or self.kind is None:
            return self.entry_units.masked_fill(~visual, -1), visual
        device = visual.device
        image, video = self.kind == IMAGE, self.kind == VIDEO
        item = torch.full_like(self.entry_units, -1)
        sub = torch.zeros_like(self.entry_units)
        if self.image_counts:
            item = torch.where(image, spread(image, _items(self.image_counts, device)), item)
        video_item = self.video_item
        if video_item is None and self.video_counts:
            video_item = spread(video, _items(self.video_counts, device))
        if video_item is not None:
            item = torch.where(video & (video_item >= 0), video_item + len(self.image_counts or ()), item)
        if self.family in QWEN_FRAME_RUNS and self.unit == "image":  # the frame runs of one video: one unit
            key = torch.where(video & (item >= 0), -2 - item, self.entry_units)  # never equal to a run index
            return units_from_keys(visual, key), visual
        if self.unit == "frame" and self.frame_tokens and self.video_counts:
            frames = torch.cat([_frame_ids(n, self.frame_tokens, device) for n in self.video_counts])
            sub = torch.where(video, spread(video, frames), sub)
            visual = visual & (sub >= 0)
        return units_from_keys(visual, self.entry_units, item, sub), visual


class FeatureRecorder:
    """The instance-level ``get_image_features`` / ``get_video_features`` of a LLaVA-family model while Libra is
    applied: calls the model's own method and records the feature counts of the forward in flight.

    A callable object, not a closure, so that ``copy.deepcopy(model)`` rebinds it (as ``LibraEntry``).
    """

    def __init__(self, runtime, method, what: str) -> None:
        self.runtime = runtime
        self.what = what
        self.__wrapped__ = method

    def __call__(self, *args, **kwargs):
        out = self.__wrapped__(*args, **kwargs)
        state = self.runtime.forward
        source = None if state is None else state.unit_source
        counts = feature_counts(out) if source is not None else None
        if counts is not None:
            source.record(self.what, counts)
        return out


def feature_counts(out) -> list[int] | None:
    """Feature tokens of each item of a features output: ``pooler_output`` is a list of ``[n_i, D]`` (images,
    Qwen videos) or one ``[N, n, D]`` tensor (OneVision videos); None when there is none."""
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        return None
    if isinstance(pooled, (list, tuple)):
        return [int(f.shape[0]) for f in pooled]
    return [int(pooled.shape[1])] * int(pooled.shape[0])
