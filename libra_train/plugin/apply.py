"""``apply_libra`` / ``remove_libra``: Libra-Merging on an unmodified transformers model.

Mechanism (no forked modeling file, no new parameter, so state_dict keys, peft LoRA targets and ZeRO-3
partitioning are unchanged):

- the language model's attention implementation becomes ``libra_<backend>`` (see ``attention.py``);
- the model's ``forward`` is wrapped on the instance (as accelerate's hooks do, so that peft, which calls
  ``self.model.forward`` directly, and DeepSpeed both go through it): the wrapper finds the visual span and
  the query tokens, holds the per-forward state, and turns ``labels`` into a loss through the position map;
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
from libra_train.plugin.persist import clear_merge_config, record_merge_config, recorded_merge_config
from libra_train.plugin.state import CACHE_ATTR, ForwardState, current_span, given_cache, query_positions

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


class LibraForward:
    """The instance-level ``forward`` of a model with Libra applied (a callable object, not a closure, so that
    ``copy.deepcopy(model)`` rebinds it to the copy's runtime and the copy's own forward)."""

    def __init__(self, runtime: LibraRuntime, forward) -> None:
        self.runtime = runtime
        self.__wrapped__ = forward  # inspect.signature (used by generate) sees the model's own signature
        functools.update_wrapper(self, forward, updated=())

    def __call__(self, *args, **kwargs):
        return self.runtime.run(self.__wrapped__, args, kwargs)


class LibraRuntime:
    """Everything ``apply_libra`` attached to one model, and the state of the forward in flight."""

    def __init__(self, model: nn.Module, config: LibraConfig) -> None:
        self.config = config
        self.decoder = find_decoder(model)
        self.layers = self.decoder.layers
        config.check_num_layers(len(self.layers))
        self.points = dict(zip(config.layers, config.ratios))
        self.image_token_ids = _image_token_ids(model)
        self.forward: ForwardState | None = None
        # Filled after each compressing forward, for logging and benchmarks: per stage, [B] counts.
        self.last_visual_tokens: list[torch.Tensor] | None = None  # visual tokens (stage 0: all of them)
        self.last_tokens: list[torch.Tensor] | None = None  # real tokens each stage's layers see
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
        model.forward = LibraForward(self, model.forward)
        setattr(model, RUNTIME_ATTR, self)

    def detach(self, model: nn.Module) -> None:
        for idx, hook_id in zip(range(min(self.points) + 1, len(self.layers)), self._hook_ids):
            self.layers[idx]._forward_pre_hooks.pop(hook_id, None)
            self.layers[idx]._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for idx in self.points:
            del self.layers[idx].self_attn._libra_runtime
        for key, cfg in self._attn_configs.items():
            cfg._attn_implementation = self._original_attn[key]
        del model.forward  # the instance attribute: the class's forward is back
        delattr(model, RUNTIME_ATTR)

    # -- the forward -----------------------------------------------------------------------------------------
    def run(self, forward, args: tuple, kwargs: dict):
        """One call of the wrapped ``forward``: arguments bound by name, so positional ones count too."""
        bound = inspect.signature(forward).bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) if "kwargs" in inspect.signature(forward).parameters else {})
        state = self._begin(call)
        if state is None:
            self.last_visual_tokens = self.last_tokens = None
            return forward(*args, **kwargs)
        if state.decode_stages is not None:
            self.forward = state
            try:
                return forward(**call)
            finally:
                self.forward = None
        labels = call.pop("labels", None)
        return_dict = call.pop("return_dict", None)
        self.forward = state
        try:
            out = forward(**call, return_dict=True)
        finally:
            self.forward = None
        self.last_visual_tokens = state.kept_per_stage
        self.last_tokens = state.tokens_per_stage
        if labels is not None:  # replace(), not out["loss"] = ...: the loss must stay the first tuple entry
            loss = libra_causal_lm_loss(
                out.logits, labels, state.position_map, num_items_in_batch=call.get("num_items_in_batch")
            )
            out = dataclasses.replace(out, loss=loss)
        out["libra_position_map"] = state.position_map
        out["libra_attention_mask"] = state.valid
        return out if return_dict is not False else out.to_tuple()

    def _begin(self, kwargs: dict) -> ForwardState | None:
        if not self.config.enabled:
            return None
        input_ids = kwargs.get("input_ids")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                "Libra needs a 2-D padding mask (attention_mask [B, L]); got a prepared 4-D mask"
            )
        cache = given_cache(kwargs)
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
        if span is not None and span.mask is not None:
            visual = span.mask.bool()
        elif input_ids is not None and self.image_token_ids:
            visual = torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device))
        else:
            return None
        if not bool(visual.any()):
            return None
        bsz, length = visual.shape
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
        if span is not None and span.query_index is not None:
            query_index = span.query_index.to(visual.device)
            query_mask = torch.ones_like(query_index, dtype=torch.bool)
        else:
            query_index, query_mask = query_positions(kwargs.get("labels"), valid, visual, self.config.query)
        visual = visual & valid & query_mask.any(1, keepdim=True)  # no query after the image: not compressed
        if not bool(visual.any()):
            return None
        positions = torch.arange(length, device=visual.device)
        return ForwardState(
            config=self.config,
            points=self.points,
            text_config=self.decoder.config,
            visual=visual,
            valid=valid,
            query_index=query_index,
            query_mask=query_mask,
            position_map=torch.where(valid, positions, -1),
            pad_left=bool(valid[:, -1].all()),
            prefill_length=length,
            kept_per_stage=[visual.sum(1)],
            tokens_per_stage=[valid.sum(1)],
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
        if (idx - 1) in self.points and bool(state.visual.any()):
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
    LibraRuntime(model, config).attach(model)
    record_merge_config(model, config)  # every save that writes config.json carries it (plugin/persist.py)
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
