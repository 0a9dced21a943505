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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask

from libra_train.compress.stage import HostLayout, StagePlan, compress_sequence, unit_counts
from libra_train.compress.types import to_host
from libra_train.plugin.attention import gather_positions, next_layer_importance, query_attention
from libra_train.plugin.config import LibraConfig
from libra_train.plugin.units import UnitSource

IGNORE_INDEX = -100
CACHE_ATTR = "_libra_stages"


@dataclass
class SpanOverride:
    mask: torch.Tensor | None
    query_index: torch.Tensor | None
    units: torch.Tensor | None = None


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
    mask: torch.Tensor | None = None,
    *,
    query_index: torch.Tensor | None = None,
    units: torch.Tensor | None = None,
) -> Iterator[None]:
    """Tell the plug-in which positions are visual (and optionally which tokens are the queries).

    For models or inputs without image tokens (a text LM fed ``inputs_embeds``), or to pin the compression
    decision (e.g. compare an uncached forward of ``prompt + generated`` with cached generation).

    Args:
        mask: ``[B, L]`` bool, True at visual positions; None keeps the model's own (image token ids).
        query_index: ``[B]`` or ``[B, Q]`` positions whose attention is the importance (after the image).
        units: ``[B, L]`` long, the compression unit of each visual position (``0, 1, ...`` in position order
            within a sample; ``LibraConfig.unit`` otherwise derives them); None keeps the config's rule.
    """
    if query_index is not None and query_index.ndim == 1:
        query_index = query_index[:, None]
    token = _SPAN.set(SpanOverride(mask, query_index, units))
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
    removed: torch.Tensor | None = None  # [B] real tokens removed before this stage (positions="renumber")


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


def real_token_window(valid: torch.Tensor, window: int) -> Callable[..., torch.Tensor]:
    """A transformers mask function (``and_mask_function``): the key is one of the query's last ``window`` real
    tokens (``valid`` ``[B, L_kv]``, the 2-D padding mask over the keys; query indices are key indices).

    After a compression point the rows hold holes (unused compensation slots) between real tokens, so slots are
    not tokens. The flash kernels unpad the rows and slide over real tokens; this makes sdpa / eager / flex do the
    same, so every backend computes one function. Before the first point (no holes inside a row) it is
    transformers' own ``i - window < j``.
    """
    rank = valid.long().cumsum(-1)  # [B, L_kv] real tokens up to and including each slot

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return rank[batch_idx, kv_idx] > rank[batch_idx, q_idx] - window

    return inner


def unwindow_cache(cache, layers: list[int]) -> None:
    """Give ``layers`` (sliding layers after a compression point) a whole-sequence cache layer instead of
    transformers' ``DynamicSlidingWindowLayer``, before they first store anything.

    That layer keeps the last ``W - 1`` *slots*; with compensation holes among them it would drop real tokens a
    decode step must still see (:func:`real_token_window`). Decision: those layers cache their compressed prefill
    whole (it is already the short sequence) and the mask applies the window.
    """
    held = getattr(cache, "layers", None)
    for idx in layers:
        if held is not None and idx < len(held) and isinstance(held[idx], DynamicSlidingWindowLayer):
            if held[idx].is_initialized:
                raise RuntimeError(
                    f"Libra: sliding cache layer {idx} was filled before its compression point"
                )
            held[idx] = DynamicLayer()


def begin_prefill(
    config: LibraConfig,
    points: dict[int, float],
    text_config: object,
    visual: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    span: SpanOverride | None,
    units: UnitSource | None = None,
    rotary: torch.nn.Module | None = None,
    windows: tuple[int | None, ...] = (),
) -> ForwardState | None:
    """The state of a prefill/training forward, or None when no sample has a visual token to compress.

    This is the forward's one host read: per sample the visual, query and real token counts, whether the last
    position is real (left padding) and, with several units per sample, the last unit id known at the entry,
    from which every later shape follows (with units, a second read at the first compression fetches the
    tokens per unit, once the multimodal model has recorded its feature counts).

    Args:
        visual: ``[B, L]`` bool, the visual positions.
        valid: ``[B, L]`` bool, the 2-D padding mask.
        labels: ``[B, L]`` labels (training query rule) or None (inference: the last real token).
        span: a ``visual_span`` override holding explicit query positions, if any.
        units: where the compression units come from, or None (one per sample).
        rotary: the decoder's rotary embedding module (``positions="renumber"`` recomputes the phases).
        windows: each decoder layer's sliding window (``families.layer_windows``; empty: all full attention).
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
    entry_units = units.entry_units if units is not None else None
    last_unit = entry_units.masked_fill(~visual, -1).max(1).values if units is not None else n_query * 0
    counts = torch.stack([visual.sum(1), n_query, valid.sum(1), valid[:, -1].long(), last_unit])  # [5, B]
    n_visual, n_queries, n_valid, last_real, last_units = to_host(counts)
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
        unit_source=units,
        unit_bound=max(last_units) + 1,
        layout=HostLayout(tuple((n,) for n in n_visual), tuple(n_valid)),
        query_index=query_index,
        query_mask=query_mask,
        position_map=position_map,
        pad_left=all(last_real),
        prefill_length=length,
        rotary=rotary,
        windows=windows,
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
    units: torch.Tensor | None = None  # [B, L] compression unit of each visual token (None: one per sample)
    unit_source: UnitSource | None = (
        None  # where the units come from, until the first compression resolves them
    )
    unit_bound: int = 1  # the most units a sample has at the entry (host)
    layout: HostLayout | None = (
        None  # the host's per-sample (per-unit, once resolved) counts of the current stage
    )
    original: tuple[HostLayout, torch.Tensor] | None = (
        None  # layout and [B, U] unit counts at the first point
    )
    rotary: torch.nn.Module | None = None  # the decoder's rotary embedding (positions="renumber")
    position_base: torch.Tensor | None = None  # [B] position id of each sample's first real token (renumber)
    pad_left: bool = False
    decode_stages: list[CachedStage] | None = None  # set in decode steps
    importance: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L] alpha
    overrides: dict[str, object] = field(default_factory=dict)  # kwargs substituted into later layers
    # the same for the later layers with a sliding window (their own mask), when there are such layers
    sliding_overrides: dict[str, object] | None = None
    windows: tuple[int | None, ...] = ()  # per decoder layer: its sliding window, None for full attention
    # [B] visual-derived tokens (merged targets + every compensation token so far) at each stage
    kept_per_stage: list[torch.Tensor] = field(default_factory=list)
    compensation: torch.Tensor | int = 0  # [B] compensation tokens carried so far
    tokens_per_stage: list[torch.Tensor] = field(default_factory=list)  # [B] real tokens seen by each stage
    widths: list[int] = field(default_factory=list)  # padded sequence length of each stage (host)
    position_maps: list[torch.Tensor] = field(default_factory=list)  # [B, L_k] position map of each stage
    compressed: bool = False
    prefill_length: int = 0  # L of the uncompressed sequence
    # (stage start layer, sliding?) -> decode kwargs (mask, ...)
    decode_masks: dict[tuple[int, bool], dict] = field(default_factory=dict)

    # -- prefill / training -------------------------------------------------------------------------------
    def has_visual(self) -> bool:
        """Whether some sample still has visual tokens to compress (host-side: no device read)."""
        return self.layout is not None and any(self.layout.visual)

    def wants_importance(self, layer_idx: int | None) -> bool:
        return (
            self.decode_stages is None
            and self.config.importance_source == "layer"
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
            query, key, scaling, self.query_index, self.query_mask, self.valid, self.window(layer_idx)
        )

    def window(self, layer_idx: int) -> int | None:
        """Layer ``layer_idx``'s sliding window, None for full causal attention."""
        return self.windows[layer_idx] if layer_idx < len(self.windows) else None

    def layer_overrides(self, layer_idx: int) -> dict[str, object]:
        """The kwargs a prefill substitutes into layer ``layer_idx`` (after a compression point)."""
        if self.sliding_overrides is not None and self.window(layer_idx) is not None:
            return self.sliding_overrides
        return self.overrides

    def _mask(self, layer_idx: int, hidden, valid, cache, position_ids) -> torch.Tensor | None:
        """The 4-D mask (or the backend's form of it) of layer ``layer_idx`` over ``hidden``'s sequence: causal,
        with the 2-D padding mask ``valid`` ``[B, L_kv]`` and the layer's cache; within the last ``W`` real tokens
        on a sliding layer (:func:`real_token_window`)."""
        window = self.window(layer_idx)
        if window is not None and valid.shape[-1] <= window:  # no key can be W tokens back: plain causal
            window = None
        return create_causal_mask(  # the cache is positional: "past_key_values" up to 5.23, "cache" from 5.24
            self.text_config,
            hidden,
            valid,
            cache,
            position_ids=position_ids,
            and_mask_function=None if window is None else real_token_window(valid, window),
            layer_idx=layer_idx if cache is not None else None,
            # A materialised mask instead of sdpa's "is it plain causal?" check, which reads the mask back.
            allow_is_causal_skip=False,
        )

    def compress(
        self, layer_idx: int, hidden: torch.Tensor, layer_kwargs: dict, layer: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Compress the output of layer ``layer_idx - 1`` before ``layer`` (layer ``layer_idx``) runs; return the
        new hidden states."""
        point = layer_idx - 1
        stage = self.config.layers.index(point)
        fractions = self.config.kept_fractions
        if (self.points[point] == 0.0) if fractions is None else (fractions[stage] == 1.0):
            self._record_stage(self.kept_per_stage[-1], hidden.shape[1])  # nothing removed: layout untouched
            return hidden
        if self.unit_source is not None:
            self._resolve_units()
        if self.original is None:  # the counts every fraction of `keep_fractions` is taken of
            self.original = (self.layout, unit_counts(self.visual, self.units, self.layout.num_units))
        old_embeddings = self.overrides.get("position_embeddings", layer_kwargs["position_embeddings"])
        if self.config.importance_source == "next_layer":
            alpha = next_layer_importance(
                layer,
                hidden,
                old_embeddings,
                self.query_index,
                self.query_mask,
                self.valid,
                self.window(layer_idx),
            )
        else:
            alpha = self.importance.get(point)
        if alpha is None:
            raise RuntimeError(
                f"Libra: no importance was recorded at layer {point}: is the hybrid attention set?"
            )
        targets = (
            None
            if fractions is None
            else self.original[0].kept_of_original(fractions[stage], self.original[1])
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
            units=self.units,
            layout=self.layout,
            targets=targets,
        )
        bsz, new_len = plan.valid.shape
        position_ids = torch.arange(new_len, device=hidden.device).expand(bsz, new_len)
        cache = given_cache(layer_kwargs)
        if cache is not None:
            unwindow_cache(
                cache, [i for i in range(layer_idx, len(self.windows)) if self.windows[i] is not None]
            )
        # The first later layer of each kind (full / sliding) sizes that kind's mask against its cache layer.
        first_of: dict[bool, int] = {}
        for later in range(layer_idx, max(len(self.windows), layer_idx + 1)):
            first_of.setdefault(self.window(later) is not None, later)
        masks = {
            kind: self._mask(first, plan.hidden, plan.valid, cache, position_ids)
            for kind, first in first_of.items()
        }
        # Original ids only feed the rotary embeddings; the mask and the layers see a contiguous range
        # (transformers 5 reads gaps in position_ids as packed sequences).
        if self.config.position_rule == "renumber":
            embeddings = self._renumbered(plan, layer_kwargs)
        else:
            cos, sin = old_embeddings
            embeddings = (gather_positions(cos, plan.source), gather_positions(sin, plan.source))
        self.overrides = {
            "position_embeddings": embeddings,
            "attention_mask": masks.get(False),
            "position_ids": position_ids,
        }
        self.sliding_overrides = {**self.overrides, "attention_mask": masks[True]} if True in masks else None
        self.position_map = torch.where(plan.kept, self.position_map.gather(1, plan.source), -1)
        self.query_index = plan.dest.gather(1, self.query_index).clamp_min(0)
        self.visual, self.valid, self.occupied, self.layout = (
            plan.visual,
            plan.valid,
            plan.occupied,
            plan.layout,
        )
        self.units = plan.units if self.units is not None else None
        self.compensation = self.compensation + plan.has_compensation
        self._record_stage(plan.num_targets + self.compensation, new_len)
        self.compressed = True
        if cache is not None:
            stages = getattr(cache, CACHE_ATTR, None)
            if stages is None:
                stages = []
                setattr(cache, CACHE_ATTR, stages)
            removed = self.tokens_per_stage[0] - plan.valid.sum(1)
            stages.append(CachedStage(layer_idx, plan.valid, self.prefill_length, removed))
        return plan.hidden

    def _resolve_units(self) -> None:
        """Cut the visual tokens into their units (the feature counts are recorded by now) and read the tokens
        per unit: the forward's second and last host read."""
        source, self.unit_source = self.unit_source, None
        units, visual = source.resolve(self.visual)
        bound = self.unit_bound + source.extra_units()  # the most units a sample can have
        counts = to_host(unit_counts(visual, units, bound))  # [B, bound]
        used = max([1] + [max((u + 1 for u, n in enumerate(row) if n), default=0) for row in counts])
        self.units, self.visual = units, visual
        self.layout = HostLayout(tuple(tuple(row[:used]) for row in counts), self.layout.occupied)

    def _renumbered(self, plan: StagePlan, layer_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embeddings of the compressed sequence renumbered ``base, base + 1, ...`` per sample (padding and
        unused slots: 0), ``base`` being the position id of the sample's first real token in the full sequence
        (0 unless a left-padded forward was not given cumulative position ids), so that decode steps, lowered by
        what each stage removed, continue exactly after the prefill."""
        if self.position_base is None:  # the first point: the decoder's own position ids are still in place
            valid0 = self.position_maps[0] >= 0
            first = valid0.long().argmax(1)  # [B] index of the first real token
            original = layer_kwargs.get("position_ids")
            if original is None:
                self.position_base = first
            else:
                original = original.expand(valid0.shape[0], -1)
                self.position_base = original.gather(1, first[:, None]).squeeze(1)
        positions = self.position_base[:, None] + plan.valid.long().cumsum(1) - 1
        positions = positions.masked_fill(~plan.valid, 0)
        return self.rotary(plan.hidden, positions)

    def _record_stage(self, kept: torch.Tensor, width: int) -> None:
        self.kept_per_stage.append(kept)
        self.tokens_per_stage.append(self.valid.sum(1))
        self.widths.append(width)
        self.position_maps.append(self.position_map)

    # -- decode ------------------------------------------------------------------------------------------
    def decode_overrides(self, layer_idx: int, hidden: torch.Tensor, layer_kwargs: dict) -> dict | None:
        """The layer kwargs a decode step substitutes for layer ``layer_idx``, or None if no stage covers it.

        The stage's cache holds its compressed prefill followed by the decoded tokens, so its 2-D padding mask
        is the stage's prefill mask followed by the part of the step's mask after the uncompressed prefill. The
        mask itself may be None (flash-attention without padding): that is the stage's mask, not "no stage".
        With ``positions="renumber"`` the step's position is lowered by the tokens the stages removed, and its
        rotary embedding recomputed.
        """
        stage = None
        for candidate in self.decode_stages:
            if candidate.start_layer <= layer_idx:
                stage = candidate
        if stage is None:
            return None
        key = (stage.start_layer, self.window(layer_idx) is not None)  # each kind sized by its first layer
        if key not in self.decode_masks:
            cache = given_cache(layer_kwargs)
            if self.valid is not None:  # the step's full 2-D mask: [B, L + decoded so far]
                tail = self.valid[:, stage.prefill_length :]
            else:
                new = cache.get_seq_length(stage.start_layer) - stage.valid.shape[1] + hidden.shape[1]
                tail = torch.ones((stage.valid.shape[0], new), dtype=torch.bool, device=stage.valid.device)
            overrides = {
                "attention_mask": self._mask(
                    layer_idx,
                    hidden,
                    torch.cat([stage.valid, tail.to(stage.valid.device)], dim=1),
                    cache,
                    layer_kwargs.get("position_ids"),
                )
            }
            if self.config.position_rule == "renumber":
                overrides["position_embeddings"] = self.rotary(
                    hidden, self._decode_positions(stage, layer_kwargs)
                )
            self.decode_masks[key] = overrides
        return self.decode_masks[key]

    def _decode_positions(self, stage: CachedStage, layer_kwargs: dict) -> torch.Tensor:
        """``[B, q]`` position ids of a decode step in a renumbered stage: the step's own minus what was removed."""
        position_ids = layer_kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError(
                'Libra: positions="renumber" needs the decode step\'s position_ids at the decoder layers, and this '
                'model\'s decoder passes none; use positions="original" with it'
            )
        return position_ids - stage.removed[:, None].to(position_ids.device)
