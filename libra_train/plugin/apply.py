"""``apply_libra`` / ``remove_libra``: Libra-Merging on an unmodified transformers model.

Mechanism (no forked modeling file, no new parameter, so state_dict keys, peft LoRA targets and ZeRO-3
partitioning are unchanged):

- the language model's attention implementation becomes ``libra_<backend>`` (see ``attention.py``);
- the ``forward`` of every module a caller can enter is wrapped on the instance (as accelerate's hooks do, so
  that peft, which calls ``self.model.forward`` directly, and DeepSpeed both go through it): the outer model,
  the inner multimodal model (``LlavaModel``, ``Qwen2VLModel``: what TRL's fused LM head calls) and the text
  decoder. Whichever is entered first finds the visual span and the query tokens and holds the per-forward
  state (the others pass through); the outer one also turns ``labels`` into a loss through the position map.
  So no path into the language model runs uncompressed by accident: a decoder called with ``inputs_embeds``,
  whose visual positions nothing can tell, raises instead;
- a forward pre-hook on every decoder layer after the first compression point compresses the hidden states
  (at the layer right after a point) and substitutes the compressed mask, rotary embeddings and position ids
  (the decoder loop passes the full-length ones to every layer).

transformers >= 5.23 checkpoints a layer's ``forward``, not ``__call__``, so the pre-hooks stay outside
gradient checkpointing and run once per forward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
from torch import nn

from libra_train.plugin.attention import PREFIX, register_hybrid_attention
from libra_train.plugin.config import LibraConfig
from libra_train.plugin.families import (
    check_supported,
    layer_windows,
    spatial_merge,
    video_frame_tokens,
    visual_token_kinds,
)
from libra_train.plugin.loss import libra_causal_lm_loss
from libra_train.plugin.persist import clear_merge_config, record_merge_config, recorded_merge_config
from libra_train.plugin.state import (
    CACHE_ATTR,
    ForwardState,
    begin_prefill,
    current_labels,
    current_span,
    given_cache,
)
from libra_train.plugin.units import (
    RECORDING_FAMILIES,
    TEXT,
    FeatureRecorder,
    UnitSource,
    default_unit,
)

RUNTIME_ATTR = "_libra_runtime"


def find_decoder(model: nn.Module) -> nn.Module:
    """The text decoder (module with ``.layers`` of decoder layers) of a causal LM or VLM, peft-wrapped or not."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(module, "config"):
            attn = getattr(layers[0], "self_attn", None)
            if attn is not None and isinstance(getattr(attn, "layer_idx", None), int):
                return module
    raise ValueError(
        f"{type(model).__name__}: no decoder with `.layers[i].self_attn.layer_idx` found; "
        "apply_libra supports LLaVA, LLaVA-NeXT, Qwen2-VL and Llama-family decoder-only models"
    )


def entry_path(model: nn.Module, decoder: nn.Module) -> list[tuple[nn.Module, str]]:
    """The modules a forward can enter, outermost first, each with its role: ``outer`` (the model given to
    ``apply_libra``), ``inner`` (a multimodal model between it and the decoder, e.g. ``LlavaModel``) and
    ``decoder`` (the text decoder itself; also the role of a model that *is* its decoder)."""
    name = next(n for n, m in model.named_modules() if m is decoder)
    parts = name.split(".") if name else []
    chain = [model]
    for part in parts:
        chain.append(getattr(chain[-1], part))
    roles = ["outer"] + ["inner"] * (len(chain) - 2) + ["decoder"] if len(chain) > 1 else ["decoder"]
    return list(zip(chain, roles))


class LibraEntry:
    """The instance-level ``forward`` of one entry module while Libra is applied.

    A callable object, not a closure, so that ``copy.deepcopy(model)`` rebinds it to the copy's runtime and the
    copy's own forward. The signature is read once here: binding positional arguments by name costs a dict
    comprehension per call, not an ``inspect.signature``.
    """

    def __init__(self, runtime: LibraRuntime, forward, role: str) -> None:
        self.runtime = runtime
        self.role = role
        self.__wrapped__ = forward  # inspect.signature (used by generate) sees the model's own signature
        functools.update_wrapper(self, forward, updated=())
        params = inspect.signature(forward).parameters
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional = [n for n, p in params.items() if p.kind in positional]
        var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.takes_labels = "labels" in params
        self.takes_return_dict = "return_dict" in params or var_kwargs

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (positional ones included)."""
        if not args:
            return dict(kwargs)
        if len(args) > len(self.positional):
            raise TypeError(f"forward() takes {len(self.positional)} positional arguments, got {len(args)}")
        call = dict(zip(self.positional, args))
        twice = sorted(set(call) & set(kwargs))
        if twice:
            raise TypeError(f"forward() got multiple values for argument(s) {twice}")
        call.update(kwargs)
        return call

    @property
    def module(self) -> nn.Module:
        return self.__wrapped__.__self__

    def __call__(self, *args, **kwargs):
        return self.runtime.enter(self, args, kwargs)


STATIC_CACHE_ERROR = (
    "Libra-Merging needs a dynamic KV cache: after a compression point the layers cache fewer keys than the "
    'layers before it, which a static cache cannot hold. Generate without cache_implementation="static" '
    "(and without a StaticCache / compile-friendly cache), i.e. with the default DynamicCache."
)


class LibraRuntime:
    """Everything ``apply_libra`` attached to one model, and the state of the forward in flight."""

    def __init__(self, model: nn.Module, config: LibraConfig) -> None:
        self.decoder = find_decoder(model)
        self.layers = self.decoder.layers
        config.check_num_layers(len(self.layers))
        if (
            config.unit is None
        ):  # the family's default, resolved on a copy (one config may serve several models)
            config = dataclasses.replace(config, unit=default_unit(model))
        self.config = config  # what this model applies; saved with its checkpoints and exports
        check_supported(model, config, self.decoder.config)
        self.points = dict(zip(config.layers, config.ratios))
        self.windows = layer_windows(self.decoder.config, len(self.layers))  # per layer: window or None
        self.family = getattr(getattr(model, "config", None), "model_type", None)
        self.token_kinds = visual_token_kinds(model)  # placeholder id -> IMAGE / VIDEO
        self.merge = spatial_merge(model)
        self.frame_tokens = video_frame_tokens(model)
        self.entries = entry_path(model, self.decoder)
        self.recorders = self._feature_methods() if config.unit != "sample" else []
        self.forward: ForwardState | None = None
        self._active = False  # an entry's forward is running (entries below it pass through)
        self._warned_no_labels = False
        # Filled after each compressing forward, for logging and benchmarks (per stage; stage 0: before the
        # first point): [B] visual-derived tokens, [B] real tokens each stage's layers see, the padded widths.
        self.last_visual_tokens: list[torch.Tensor] | None = None
        self.last_tokens: list[torch.Tensor] | None = None
        self.last_widths: list[int] | None = None
        self.last_position_map: torch.Tensor | None = None
        self._hook_ids: list[int] = []
        self._attn_configs = {id(layer.self_attn.config): layer.self_attn.config for layer in self.layers}
        self._attn_configs[id(self.decoder.config)] = self.decoder.config
        self._original_attn = {key: cfg._attn_implementation for key, cfg in self._attn_configs.items()}

    # -- attach / detach -------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        for key, cfg in self._attn_configs.items():
            cfg._attn_implementation = register_hybrid_attention(self._original_attn[key] or "eager")
        for idx in self.points:
            self.layers[idx].self_attn._libra_runtime = self
        # Hook ids, not RemovableHandles: a handle keeps a weak reference to the original module's hook dict,
        # so after copy.deepcopy(model) removing through it would unhook the original, not the copy.
        self._hook_ids = []
        for idx in range(min(self.points) + 1, len(self.layers)):
            hook = functools.partial(self._layer_pre_hook, idx)
            self._hook_ids.append(self.layers[idx].register_forward_pre_hook(hook, with_kwargs=True).id)
        for module, role in self.entries:
            module.forward = LibraEntry(self, module.forward, role)
        for module, name, what in self.recorders:
            setattr(module, name, FeatureRecorder(self, getattr(module, name), what))
        setattr(model, RUNTIME_ATTR, self)

    def detach(self, model: nn.Module) -> None:
        for idx, hook_id in zip(range(min(self.points) + 1, len(self.layers)), self._hook_ids):
            self.layers[idx]._forward_pre_hooks.pop(hook_id, None)
            self.layers[idx]._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for idx in self.points:
            del self.layers[idx].self_attn._libra_runtime
        for key, cfg in self._attn_configs.items():
            cfg._attn_implementation = self._original_attn[key]
        for module, _ in self.entries:
            del module.forward  # the instance attribute: the class's forward is back
        for module, name, _ in self.recorders:
            delattr(module, name)
        delattr(model, RUNTIME_ATTR)

    def _feature_methods(self) -> list[tuple[nn.Module, str, str]]:
        """``(module, method, what)`` of the feature methods whose counts cut the units: on the innermost entry
        that has them (the multimodal model whose forward calls ``self.get_image_features``; the outer model's
        own method only delegates to it)."""
        if self.family not in RECORDING_FAMILIES:
            return []
        for module, role in reversed(self.entries):
            if role != "decoder" and callable(getattr(module, "get_image_features", None)):
                names = [("get_image_features", "image"), ("get_video_features", "video")]
                return [(module, n, w) for n, w in names if callable(getattr(module, n, None))]
        return []

    # -- the forward -----------------------------------------------------------------------------------------
    def enter(self, entry: LibraEntry, args: tuple, kwargs: dict):
        """A call of an entry's ``forward``: the outermost one in flight runs the plug-in, the others pass."""
        if self._active or not self.config.enabled:
            return entry.__wrapped__(*args, **kwargs)
        self._active = True
        try:
            return self._run(entry, args, kwargs)
        finally:
            self._active = False

    def _run(self, entry: LibraEntry, args: tuple, kwargs: dict):
        forward = entry.__wrapped__
        call = entry.bind(args, kwargs)
        state = self._begin(entry, call)
        if state is None:
            self.last_visual_tokens = self.last_tokens = self.last_widths = self.last_position_map = None
            return forward(*args, **kwargs)
        if state.decode_stages is not None:
            self.forward = state
            try:
                return forward(**call)
            finally:
                self.forward = None
        labels = call.pop("labels", None) if entry.takes_labels else None
        return_dict = call.pop("return_dict", None)
        if entry.takes_return_dict:
            call["return_dict"] = True
        self.forward = state
        try:
            out = forward(**call)
        finally:
            self.forward = None
        self.last_visual_tokens = state.kept_per_stage
        self.last_tokens = state.tokens_per_stage
        self.last_widths = state.widths
        self.last_position_map = state.position_map
        if labels is not None:  # replace(), not out["loss"] = ...: the loss must stay the first tuple entry
            loss = libra_causal_lm_loss(
                out.logits, labels, state.position_map, num_items_in_batch=call.get("num_items_in_batch")
            )
            out = dataclasses.replace(out, loss=loss)
        out["libra_position_map"] = state.position_map
        out["libra_attention_mask"] = state.valid
        out["libra_position_maps"] = tuple(state.position_maps)
        if getattr(out, "hidden_states", None) is not None:  # one map per returned hidden state
            out["libra_hidden_position_maps"] = self._hidden_state_maps(state, len(out.hidden_states))
        return out.to_tuple() if return_dict is False and entry.takes_return_dict else out

    def _hidden_state_maps(self, state: ForwardState, count: int) -> tuple[torch.Tensor, ...]:
        """The position map of each of ``count`` returned hidden states: entry 0 is the embedding output, entry
        ``i`` the output of layer ``i - 1``, which runs in the stage after every point below it."""
        stage_of_layer = [sum(p < j for p in self.points) for j in range(len(self.layers))]
        stages = [0] + [stage_of_layer[min(i - 1, len(self.layers) - 1)] for i in range(1, count)]
        return tuple(state.position_maps[min(s, len(state.position_maps) - 1)] for s in stages)

    def _token_kinds(
        self, entry: LibraEntry, call: dict, span
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(visual [B, L] bool, kind [B, L] long | None)`` of this call's positions (kind: ``TEXT`` / ``IMAGE`` /
        ``VIDEO``, None when only a ``visual_span`` mask tells them), or None when it has none the plug-in sees."""
        if span is not None and span.mask is not None:
            return span.mask.bool(), None
        if not self.token_kinds:
            return None
        input_ids = call.get("input_ids")
        if input_ids is not None:
            kind = torch.zeros_like(input_ids)
            for token, token_kind in self.token_kinds.items():  # scalar compares: no host tensor per forward
                kind = kind.masked_fill(input_ids == token, token_kind)
            return kind != TEXT, kind
        embeds = call.get("inputs_embeds")
        if embeds is None:
            return None
        if entry.role == "decoder":
            raise ValueError(
                f"Libra: {type(entry.module).__name__} (the language model of a vision-language model) was called "
                "with inputs_embeds, so the plug-in cannot tell which positions are visual. Call the multimodal "
                "model (or its outer *ForConditionalGeneration) with input_ids, or name the visual positions with "
                "`with libra_train.visual_span(mask): ...` (an all-False mask for a text-only call)."
            )
        # Before the multimodal model scatters the image features in, the placeholders hold the image tokens'
        # own embeddings: transformers' get_placeholder_mask finds them the same way.
        table = entry.module.get_input_embeddings().weight
        kind = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        for token, token_kind in self.token_kinds.items():
            kind = kind.masked_fill((embeds == table[token].to(embeds.dtype)).all(-1), token_kind)
        return kind != TEXT, kind

    def _begin(self, entry: LibraEntry, call: dict) -> ForwardState | None:
        attention_mask = call.get("attention_mask")
        cache = given_cache(call)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(STATIC_CACHE_ERROR)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                "Libra needs a 2-D padding mask (attention_mask [B, L]); got a prepared 4-D mask"
            )
        stages = getattr(cache, CACHE_ATTR, None) if cache is not None else None
        if stages and cache.get_seq_length() > 0:  # a decode step after a compressing prefill
            return ForwardState(
                config=self.config,
                points=self.points,
                text_config=self.decoder.config,
                visual=None,
                valid=None if attention_mask is None else attention_mask.bool(),
                query_index=None,
                query_mask=None,
                position_map=None,
                decode_stages=stages,
                rotary=getattr(self.decoder, "rotary_emb", None),
                windows=self.windows,
            )
        span = current_span()
        found = self._token_kinds(entry, call, span)
        if found is None:
            return None
        visual, kind = found
        units = self._unit_source(call, visual, kind, span)
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
        labels = call.get("labels") if entry.takes_labels else None
        if labels is None:
            labels = current_labels()
        if labels is None and entry.module.training and (span is None or span.query_index is None):
            self._warn_no_labels(entry)
        rotary = getattr(self.decoder, "rotary_emb", None)
        return begin_prefill(
            self.config,
            self.points,
            self.decoder.config,
            visual,
            valid,
            labels,
            span,
            units,
            rotary,
            self.windows,
        )

    def _unit_source(
        self, call: dict, visual: torch.Tensor, kind: torch.Tensor | None, span
    ) -> UnitSource | None:
        """Where this forward's compression units come from, or None for one unit per sample."""
        if span is not None and span.units is not None:
            return UnitSource(self.family, self.config.unit, span.units.to(visual.device), explicit=True)
        if self.config.unit == "sample":
            return None
        return UnitSource.at_entry(
            self.family,
            self.config.unit,
            visual,
            kind,
            call,
            merge=self.merge,
            frame_tokens=self.frame_tokens,
        )

    def _warn_no_labels(self, entry: LibraEntry) -> None:
        if not self._warned_no_labels:
            self._warned_no_labels = True
            warnings.warn(
                f"Libra: a training-mode forward of {type(entry.module).__name__} without labels: the importance is "
                "the attention of the last token (the inference rule), not of the tokens before the answers. Pass "
                "labels to the outer model, or wrap the call in `with libra_train.plugin.libra_labels(labels):`. The "
                "output is the compressed sequence (libra_position_map maps it to the input): a trainer that scores "
                "it against full-length labels must map them, as libra_train.integrations.trl.LibraSFTTrainer does "
                "for TRL's SFTTrainer (whose fused LM head calls the inner model directly).",
                stacklevel=4,
            )

    def _layer_pre_hook(self, idx: int, layer: nn.Module, args: tuple, kwargs: dict):
        state = self.forward
        if state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.decode_stages is not None:
            overrides = state.decode_overrides(idx, hidden, kwargs)
            if overrides is None:
                return None
            kwargs.update(overrides)
            return args, kwargs
        if (idx - 1) in self.points and state.has_visual():
            hidden = state.compress(idx, hidden, kwargs, layer)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        if not state.overrides:
            return None
        kwargs.update(state.layer_overrides(idx))
        return args, kwargs


def apply_libra(model: nn.Module, config: LibraConfig | None = None) -> nn.Module:
    """Apply Libra-Merging to ``model`` in place and return it.

    Args:
        model: a transformers LLaVA / LLaVA-NeXT / Qwen2-VL model, or a Llama-family causal LM (then give the
            visual positions with :func:`libra_train.visual_span`). Apply before wrapping with peft.
        config: the merge config (default: the one recorded on ``model.config.libra_merging``, e.g. by a saved
            model loaded with plain ``from_pretrained``, else ``LibraConfig()``, the paper's 32-layer setting).

    Returns:
        The same model. Its outputs gain ``libra_position_map`` (``[B, L']`` original position of each output
        position, -1 for compensation tokens and padding) and ``libra_attention_mask`` when a forward compressed;
        ``labels`` give the loss through that map.
    """
    config = config if config is not None else recorded_merge_config(model) or LibraConfig()
    if getattr(model, RUNTIME_ATTR, None) is not None:
        warnings.warn("apply_libra: Libra is already applied to this model; nothing changed", stacklevel=2)
        return model
    for cfg in {id(m.config): m.config for m in [find_decoder(model)]}.values():
        if str(cfg._attn_implementation or "").startswith(PREFIX):
            raise ValueError(
                "the model's attention is already a Libra wrapper (copied from a patched model?)"
            )
    runtime = LibraRuntime(model, config)
    runtime.attach(model)
    record_merge_config(model, runtime.config)  # what it applies (unit resolved); every save carries it
    return model


def remove_libra(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_libra` exactly (hooks, forward wrapper, attention implementation)."""
    owner = next((m for m in model.modules() if RUNTIME_ATTR in vars(m)), None)
    if owner is None:
        warnings.warn("remove_libra: Libra is not applied to this model; nothing changed", stacklevel=2)
        return model
    vars(owner)[RUNTIME_ATTR].detach(owner)
    clear_merge_config(owner)
    return model


def libra_runtime(model: nn.Module) -> LibraRuntime | None:
    """The runtime attached by :func:`apply_libra` (or None), e.g. to read ``last_visual_tokens``."""
    return getattr(model, RUNTIME_ATTR, None)
