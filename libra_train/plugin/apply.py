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
from libra_train.plugin.loss import libra_causal_lm_loss
from libra_train.plugin.state import (
    CACHE_ATTR,
    ForwardState,
    begin_prefill,
    current_labels,
    current_span,
    given_cache,
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


def _image_token_ids(model: nn.Module) -> list[int]:
    config = getattr(model, "config", None)
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


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
        self.config = config
        self.decoder = find_decoder(model)
        self.layers = self.decoder.layers
        config.check_num_layers(len(self.layers))
        self.points = dict(zip(config.layers, config.ratios))
        self.image_token_ids = _image_token_ids(model)
        self._token_ids: dict[torch.device, torch.Tensor] = {}  # built once per device, not per forward
        self.entries = entry_path(model, self.decoder)
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
        delattr(model, RUNTIME_ATTR)

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

    def _visual_positions(self, entry: LibraEntry, call: dict, span) -> torch.Tensor | None:
        """``[B, L]`` bool visual positions of this call, or None when it has none the plug-in can see."""
        if span is not None and span.mask is not None:
            return span.mask.bool()
        if not self.image_token_ids:
            return None
        input_ids = call.get("input_ids")
        if input_ids is not None:
            ids = self._token_ids.get(input_ids.device)
            if ids is None:
                ids = self._token_ids[input_ids.device] = torch.tensor(
                    self.image_token_ids, device=input_ids.device
                )
            return torch.isin(input_ids, ids)
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
        visual = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for token in self.image_token_ids:
            visual |= (embeds == table[token].to(embeds.dtype)).all(-1)
        return visual

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
            )
        span = current_span()
        visual = self._visual_positions(entry, call, span)
        if visual is None:
            return None
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
        labels = call.get("labels") if entry.takes_labels else None
        if labels is None:
            labels = current_labels()
        if labels is None and entry.module.training and (span is None or span.query_index is None):
            self._warn_no_labels(entry)
        return begin_prefill(self.config, self.points, self.decoder.config, visual, valid, labels, span)

    def _warn_no_labels(self, entry: LibraEntry) -> None:
        if not self._warned_no_labels:
            self._warned_no_labels = True
            warnings.warn(
                f"Libra: a training-mode forward of {type(entry.module).__name__} without labels: the importance is "
                "the attention of the last token (the inference rule), not of the tokens before the answers. Pass "
                "labels to the outer model, or wrap the call in `with libra_train.plugin.libra_labels(labels):`.",
                stacklevel=4,
            )

    def _layer_pre_hook(self, idx: int, layer: nn.Module, args: tuple, kwargs: dict):
        state = self.forward
        if state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.decode_stages is not None:
            mask = state.decode_mask(idx, hidden, kwargs)
            if mask is None:
                return None
            kwargs["attention_mask"] = mask
            return args, kwargs
        if (idx - 1) in self.points and state.has_visual():
            hidden = state.compress(idx, hidden, kwargs)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        if not state.overrides:
            return None
        kwargs.update(state.overrides)
        return args, kwargs


def apply_libra(model: nn.Module, config: LibraConfig | None = None) -> nn.Module:
    """Apply Libra-Merging to ``model`` in place and return it.

    Args:
        model: a transformers LLaVA / LLaVA-NeXT / Qwen2-VL model, or a Llama-family causal LM (then give the
            visual positions with :func:`libra_train.visual_span`). Apply before wrapping with peft.
        config: the merge config (default: ``LibraConfig()``, the paper's setting for 32-layer models).

    Returns:
        The same model. Its outputs gain ``libra_position_map`` (``[B, L']`` original position of each output
        position, -1 for compensation tokens and padding) and ``libra_attention_mask`` when a forward compressed;
        ``labels`` give the loss through that map.
    """
    config = config if config is not None else LibraConfig()
    if getattr(model, RUNTIME_ATTR, None) is not None:
        warnings.warn("apply_libra: Libra is already applied to this model; nothing changed", stacklevel=2)
        return model
    for cfg in {id(m.config): m.config for m in [find_decoder(model)]}.values():
        if str(cfg._attn_implementation or "").startswith(PREFIX):
            raise ValueError(
                "the model's attention is already a Libra wrapper (copied from a patched model?)"
            )
    LibraRuntime(model, config).attach(model)
    return model


def remove_libra(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_libra` exactly (hooks, forward wrapper, attention implementation)."""
    owner = next((m for m in model.modules() if RUNTIME_ATTR in vars(m)), None)
    if owner is None:
        warnings.warn("remove_libra: Libra is not applied to this model; nothing changed", stacklevel=2)
        return model
    vars(owner)[RUNTIME_ATTR].detach(owner)
    return model


def libra_runtime(model: nn.Module) -> LibraRuntime | None:
    """The runtime attached by :func:`apply_libra` (or None), e.g. to read ``last_visual_tokens``."""
    return getattr(model, RUNTIME_ATTR, None)
