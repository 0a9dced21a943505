"""Runtime state of one forward pass, keyed by layer index, plus the ``visual_span`` / ``libra_labels`` contexts.

One :class:`ForwardState` lives from the entry that starts a forward (the outer model, the inner multimodal
model or the text decoder, whichever the caller entered) to its return. Everything a layer needs is looked up by
that layer's index (never a counter or a pop-from-a-list: gradient checkpointing re-runs a layer's forward
during backward, and the recomputed attention simply finds its importance already recorded).

Host synchronisation. The state reads the device exactly once per prefill/training forward
(:func:`begin_prefill`): per sample, the visual tokens, the query tokens, the real tokens and whether the last
position is real. Every later shape (each stage's visual width, target width, sequence width) follows from
those counts and the config on the host (:class:`~libra_train.compress.stage.HostLayout`), while the per-sample
values are computed on the device by the same formulas. Whether a point emits a compensation token depends on
the data, so its slot is reserved (an invalid position when unused) instead of asked for.

Per-generation state (the compressed padding mask of each stage, needed by every decode step) lives on the
KV cache object, whose lifetime is exactly the generation's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from libra_train.compress.stage import HostLayout, StagePlan, compress_sequence
from libra_train.compress.types import to_host
from libra_train.plugin.attention import query_attention
from libra_train.plugin.config import LibraConfig

IGNORE_INDEX = -100
CACHE_ATTR = "_libra_stages"


@dataclass
class SpanOverride:
    mask: torch.Tensor | None
    query_index: torch.Tensor | None


_SPAN: contextvars.ContextVar[SpanOverride | None] = contextvars.ContextVar("libra_visual_span", default=None)
_LABELS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("libra_labels", default=None)


def given_cache(kwargs: dict) -> Cache | None:
    """The KV cache a model forward or a decoder layer was called with, or None.

    transformers 5.24 renamed the argument ``past_key_values`` to ``cache`` (the old name still works for callers
    until 5.40, through a deprecation shim); the plug-in reads whichever is there, so it runs on both.
    """
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


@contextlib.contextmanager
def visual_span(
    mask: torch.Tensor | None = None, *, query_index: torch.Tensor | None = None
) -> Iterator[None]:
    """Tell the plug-in which positions are visual (and optionally which tokens are the queries).

    For models or inputs without image tokens (a text LM fed ``inputs_embeds``), or to pin the compression
    decision (e.g. compare an uncached forward of ``prompt + generated`` with cached generation).

    Args:
        mask: ``[B, L]`` bool, True at visual positions; None keeps the model's own (image token ids).
        query_index: ``[B]`` or ``[B, Q]`` positions whose attention is the importance (after the image).
    """
    if query_index is not None and query_index.ndim == 1:
        query_index = query_index[:, None]
    token = _SPAN.set(SpanOverride(mask, query_index))
    try:
        yield
    finally:
        _SPAN.reset(token)


@contextlib.contextmanager
def libra_labels(labels: torch.Tensor | None) -> Iterator[None]:
    """Give the training query rule its labels when the model is entered below its outer forward.

    The outer ``*ForConditionalGeneration`` / ``*ForCausalLM`` forward sees ``labels`` itself. A trainer that calls
    the inner multimodal model or the decoder directly (TRL's fused LM head calls ``model.model(...)``) passes the
    batch's ``[B, L]`` labels here, so that the importance is the attention of the token before each answer, as in
    training through the outer forward; without them the query is the last real token (the inference rule).
    """
    token = _LABELS.set(labels)
    try:
        yield
    finally:
        _LABELS.reset(token)


def current_span() -> SpanOverride | None:
    return _SPAN.get()


def current_labels() -> torch.Tensor | None:
    return _LABELS.get()


@dataclass
class CachedStage:
    """What a decode step needs to know about one compression stage of the prefill."""

    start_layer: int
    valid: torch.Tensor  # [B, L'] the stage's padding mask at the end of the prefill
    prefill_length: int  # L of the uncompressed prefill


def query_starts(
    labels: torch.Tensor | None, valid: torch.Tensor, visual: torch.Tensor, rule: str
) -> torch.Tensor:
    """``[B, L]`` bool: the query tokens, whose attention on the visual tokens is the importance.

    With labels (training): the token before each answer span (``answer_starts``) or before the first one only
    (``last_instruction``). Without labels (inference): the last real token. Queries must come after the
    sample's last visual token (a causal query before the image cannot see it); a sample left without any is
    not compressed (its visual mask is cleared by the caller).
    """
    bsz, length = valid.shape
    pos = torch.arange(length, device=valid.device)
    if labels is None:
        last = torch.where(valid, pos, -1).max(1).values
        starts = (pos == last[:, None]) & (last >= 0)[:, None]
    else:
        supervised = labels != IGNORE_INDEX
        begin = (
            supervised & ~torch.nn.functional.pad(supervised, (1, 0))[:, :-1]
        )  # first token of each answer
        starts = torch.nn.functional.pad(begin, (0, 1))[:, 1:]  # the token before it
        if rule == "last_instruction":
            first = torch.where(starts, pos, length).min(1).values
            starts = pos == first[:, None]
    last_visual = torch.where(visual, pos, -1).max(1).values
    return starts & valid & (pos > last_visual[:, None])


def packed_indices(flags: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries per row, front-packed: ``([B, width], [B, width] mask)``.

    ``width`` is the host's count of the most flags in a row (at least 1), so no value is read back here.
    """
    order = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width, device=flags.device) < flags.sum(1, keepdim=True)


def gather_positions(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Gather rotary ``cos``/``sin`` along the sequence: ``[B|1, L, d]`` or M-RoPE ``[k, B|1, L, d]``."""
    seq_dim = t.ndim - 2
    bsz, new_len = source.shape
    shape = list(t.shape)
    shape[seq_dim - 1] = bsz
    t = t.expand(shape)
    index = source.view(*([1] * (t.ndim - 3)), bsz, new_len, 1).expand(*shape[:seq_dim], new_len, shape[-1])
    return t.gather(seq_dim, index)


def begin_prefill(
    config: LibraConfig,
    points: dict[int, float],
    text_config: object,
    visual: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    span: SpanOverride | None,
) -> ForwardState | None:
    """The state of a prefill/training forward, or None when no sample has a visual token to compress.

    This is the forward's one host read: per sample the visual, query and real token counts and whether the
    last position is real (left padding), from which every later shape follows.

    Args:
        visual: ``[B, L]`` bool, the visual positions.
        valid: ``[B, L]`` bool, the 2-D padding mask.
        labels: ``[B, L]`` labels (training query rule) or None (inference: the last real token).
        span: a ``visual_span`` override holding explicit query positions, if any.
    """
    bsz, length = visual.shape
    if span is not None and span.query_index is not None:  # pinned queries: every sample has them
        query_index = span.query_index.to(visual.device)
        starts = None
        visual = visual & valid
        n_query = torch.full((bsz,), query_index.shape[1], device=visual.device)
    else:
        starts = query_starts(labels, valid, visual, config.query)
        n_query = starts.sum(1)
        visual = visual & valid & (n_query > 0)[:, None]  # no query after the image: not compressed
    counts = torch.stack([visual.sum(1), n_query, valid.sum(1), valid[:, -1].long()])  # [4, B]
    n_visual, n_queries, n_valid, last_real = to_host(counts)
    if not any(n_visual):
        return None
    if starts is not None:
        query_index, query_mask = packed_indices(starts, max(1, max(n_queries)))
    else:
        query_mask = torch.ones_like(query_index, dtype=torch.bool)
    positions = torch.arange(length, device=visual.device)
    position_map = torch.where(valid, positions, -1)
    return ForwardState(
        config=config,
        points=points,
        text_config=text_config,
        visual=visual,
        valid=valid,
        occupied=valid,
        layout=HostLayout(tuple(n_visual), tuple(n_valid)),
        query_index=query_index,
        query_mask=query_mask,
        position_map=position_map,
        pad_left=all(last_real),
        prefill_length=length,
        kept_per_stage=[visual.sum(1)],
        tokens_per_stage=[valid.sum(1)],
        widths=[length],
        position_maps=[position_map],
    )


@dataclass
class ForwardState:
    """The state of one forward pass of a model with Libra applied."""

    config: LibraConfig
    points: dict[int, float]  # compression layer -> ratio
    text_config: object
    visual: torch.Tensor | None  # [B, L] current visual span (None in decode steps)
    valid: torch.Tensor | None  # [B, L] current padding mask
    query_index: torch.Tensor | None  # [B, Q] current query positions
    query_mask: torch.Tensor | None  # [B, Q]
    position_map: (
        torch.Tensor | None
    )  # [B, L] original position of each current token (-1: compensation/padding)
    occupied: torch.Tensor | None = None  # [B, L] real tokens + reserved compensation slots (the row layout)
    layout: HostLayout | None = None  # the host's per-sample counts of the current stage
    pad_left: bool = False
    decode_stages: list[CachedStage] | None = None  # set in decode steps
    importance: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] alpha
    overrides: dict[str, object] = field(default_factory=dict)  # kwargs substituted into later layers
    # [B] visual-derived tokens (merged targets + every compensation token so far) at each stage
    kept_per_stage: list[torch.Tensor] = field(default_factory=list)
    compensation: torch.Tensor | int = 0  # [B] compensation tokens carried so far
    tokens_per_stage: list[torch.Tensor] = field(default_factory=list)  # [B] real tokens seen by each stage
    widths: list[int] = field(default_factory=list)  # padded sequence length of each stage (host)
    position_maps: list[torch.Tensor] = field(default_factory=list)  # [B, L_k] position map of each stage
    compressed: bool = False
    prefill_length: int = 0  # L of the uncompressed sequence
    decode_masks: dict[int, object] = field(default_factory=dict)  # stage start layer -> 4-D mask (decode)

    # -- prefill / training -------------------------------------------------------------------------------
    def has_visual(self) -> bool:
        """Whether some sample still has visual tokens to compress (host-side: no device read)."""
        return self.layout is not None and any(self.layout.visual)

    def wants_importance(self, layer_idx: int | None) -> bool:
        return (
            self.decode_stages is None
            and layer_idx in self.points
            and layer_idx not in self.importance
            and self.has_visual()
        )

    def record_importance(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        if key.shape[2] != self.valid.shape[1] or query.shape[2] != key.shape[2]:
            raise RuntimeError(
                f"Libra: layer {layer_idx} attention saw {query.shape[2]} queries / {key.shape[2]} keys but the "
                f"plug-in tracks {self.valid.shape[1]} tokens; compression needs a prefill without a warm cache"
            )
        self.importance[layer_idx] = query_attention(
            query, key, scaling, self.query_index, self.query_mask, self.valid
        )

    def compress(self, layer_idx: int, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """Compress the output of layer ``layer_idx - 1`` before layer ``layer_idx``; return the new hidden."""
        point = layer_idx - 1
        if self.points[point] == 0.0:  # nothing removed: keep the layout (and padding rows) untouched
            self._record_stage(self.kept_per_stage[-1], hidden.shape[1])
            return hidden
        alpha = self.importance.get(point)
        if alpha is None:
            raise RuntimeError(
                f"Libra: no importance was recorded at layer {point}: is the hybrid attention set?"
            )
        plan: StagePlan = compress_sequence(
            hidden,
            self.visual,
            self.valid,
            alpha,
            self.points[point],
            select=self.config.select_method,
            merge=self.config.merge_method,
            theta=self.config.theta,
            lam=self.config.lam,
            pad_left=self.pad_left,
            occupied=self.occupied,
            layout=self.layout,
        )
        old_embeddings = self.overrides.get("position_embeddings", layer_kwargs["position_embeddings"])
        cos, sin = old_embeddings
        bsz, new_len = plan.valid.shape
        position_ids = torch.arange(new_len, device=hidden.device).expand(bsz, new_len)
        cache = given_cache(layer_kwargs)
        mask = create_causal_mask(  # the cache is positional: "past_key_values" up to 5.23, "cache" from 5.24
            self.text_config,
            plan.hidden,
            plan.valid,
            cache,
            position_ids=position_ids,
            layer_idx=layer_idx if cache is not None else None,
            # A materialised mask instead of sdpa's "is it plain causal?" check, which reads the mask back.
            allow_is_causal_skip=False,
        )
        # Original ids only feed the rotary embeddings; the mask and the layers see a contiguous range
        # (transformers 5 reads gaps in position_ids as packed sequences).
        self.overrides = {
            "position_embeddings": (gather_positions(cos, plan.source), gather_positions(sin, plan.source)),
            "attention_mask": mask,
            "position_ids": position_ids,
        }
        self.position_map = torch.where(plan.kept, self.position_map.gather(1, plan.source), -1)
        self.query_index = plan.dest.gather(1, self.query_index).clamp_min(0)
        self.visual, self.valid, self.occupied, self.layout = (
            plan.visual,
            plan.valid,
            plan.occupied,
            plan.layout,
        )
        self.compensation = self.compensation + plan.result.has_compensation.long()
        self._record_stage(plan.result.num_targets + self.compensation, new_len)
        self.compressed = True
        if cache is not None:
            stages = getattr(cache, CACHE_ATTR, None)
            if stages is None:
                stages = []
                setattr(cache, CACHE_ATTR, stages)
            stages.append(CachedStage(layer_idx, plan.valid, self.prefill_length))
        return plan.hidden

    def _record_stage(self, kept: torch.Tensor, width: int) -> None:
        self.kept_per_stage.append(kept)
        self.tokens_per_stage.append(self.valid.sum(1))
        self.widths.append(width)
        self.position_maps.append(self.position_map)

    # -- decode ------------------------------------------------------------------------------------------
    def decode_mask(self, layer_idx: int, hidden: torch.Tensor, layer_kwargs: dict):
        """The 4-D mask of a decode step for layer ``layer_idx`` (None before the first compression stage).

        The stage's cache holds its compressed prefill followed by the decoded tokens, so its 2-D padding mask
        is the stage's prefill mask followed by the part of the step's mask after the uncompressed prefill.
        """
        stage = None
        for candidate in self.decode_stages:
            if candidate.start_layer <= layer_idx:
                stage = candidate
        if stage is None:
            return None
        if stage.start_layer not in self.decode_masks:
            cache = given_cache(layer_kwargs)
            if self.valid is not None:  # the step's full 2-D mask: [B, L + decoded so far]
                tail = self.valid[:, stage.prefill_length :]
            else:
                new = cache.get_seq_length(stage.start_layer) - stage.valid.shape[1] + hidden.shape[1]
                tail = torch.ones((stage.valid.shape[0], new), dtype=torch.bool, device=stage.valid.device)
            self.decode_masks[stage.start_layer] = create_causal_mask(  # positional cache: see compress()
                self.text_config,
                hidden,
                torch.cat([stage.valid, tail.to(stage.valid.device)], dim=1),
                cache,
                position_ids=layer_kwargs.get("position_ids"),
                layer_idx=stage.start_layer,
                allow_is_causal_skip=False,
            )
        return self.decode_masks[stage.start_layer]
