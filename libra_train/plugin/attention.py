"""Hybrid attention: the model's own backend computes the output; compression layers also get the query rows.

Flash-attention (and SDPA) never materialise attention probabilities, but Libra-Merging needs the attention
of the query token(s) on the visual tokens at each compression layer. We register, with transformers'
attention-function registry, a wrapper ``libra_<backend>`` around the backend in use. It calls the backend
unchanged and, only at compression layers of a forward that compresses, additionally computes the softmax of
the few query rows over all keys: ``O(queries x sequence)`` per compression layer. Other layers pay one
attribute lookup.

The same name is registered with ``AttentionMaskInterface`` (with the backend's mask function): without it
transformers hands a custom attention name ``attention_mask=None`` and padding would be silently ignored.

Backends. ``eager``, ``sdpa``, ``flex_attention`` and every backend transformers routes through its flash
integration (``flash_attention_2/3/4`` and hub kernels) work: the flash integration passes
``module.config._attn_implementation`` on to its kernel loader, which would read ``libra_flash_attention_2`` as
the name of a hub kernel, so the wrapper hands those backends a view of the module whose config reports the
backend's own name (:class:`_BackendView`). Paged attention (``paged|...``, continuous batching) keeps one KV
block table for all layers, which cannot hold the shorter caches after a compression point: refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "libra_"


@torch.no_grad()
def query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    query_mask: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of selected query rows, averaged over heads and rows: ``[B, L_k]`` float32.

    Softmax over all keys the query may see (causal and padding masks applied), not renormalised over any span;
    heads are averaged, then the valid query rows of each sample.

    Args:
        query: ``[B, H, L_q, d]`` after rotary embedding (prefill: query ``i`` sits at key index ``i``).
        key: ``[B, H_kv, L_k, d]`` before ``repeat_kv`` (GQA: query head ``h`` reads key head ``h // (H / H_kv)``).
        scaling: the attention's softmax scale.
        query_index: ``[B, Q]`` rows to compute.
        query_mask: ``[B, Q]`` bool, False for padding entries of ``query_index``.
        key_valid: ``[B, L_k]`` bool, the 2-D padding mask.
    """
    bsz, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    n_q = query_index.shape[1]
    rows = query.gather(2, query_index[:, None, :, None].expand(bsz, heads, n_q, dim))  # [B, H, Q, d]
    rows = rows.float().reshape(bsz, kv_heads, (heads // kv_heads) * n_q, dim)  # [B, H_kv, G*Q, d]
    scores = (rows @ key.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*Q, L_k]
    scores = scores.view(bsz, heads, n_q, length)
    causal = torch.arange(length, device=key.device) <= query_index[..., None]  # [B, Q, L_k]
    allowed = causal & key_valid[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)  # [B, Q, L_k]
    weight = query_mask.float()
    return (probs * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1.0)[:, None]


NAME_BLIND_BACKENDS = (
    "eager",
    "sdpa",
    "flex_attention",
)  # backends that never read config._attn_implementation


class _ConfigView:
    """A model config that reports another ``_attn_implementation`` and delegates everything else."""

    __slots__ = ("_config", "_attn_implementation")

    def __init__(self, config, name: str) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_attn_implementation", name)

    def __getattr__(self, attr):
        return getattr(self._config, attr)


class _BackendView:
    """An attention module as its backend must see it: ``module.config._attn_implementation`` is the backend's
    own name (not ``libra_<backend>``); every other attribute is the module's."""

    __slots__ = ("_module", "config")

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "config", _ConfigView(module.config, name))

    def __getattr__(self, attr):
        return getattr(self._module, attr)


def _backend(name: str, module: torch.nn.Module) -> Callable:
    if (
        name == "eager"
    ):  # eager is not in the registry: each modeling file has its own eager_attention_forward
        return inspect.getmodule(type(module)).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_wrapper(backend_name: str) -> Callable:
    sees_its_name = backend_name not in NAME_BLIND_BACKENDS

    def libra_attention(module, query, key, value, attention_mask, *args, **kwargs):
        target = _BackendView(module, backend_name) if sees_its_name else module
        out = _backend(backend_name, module)(target, query, key, value, attention_mask, *args, **kwargs)
        runtime = getattr(module, "_libra_runtime", None)
        state = None if runtime is None else runtime.forward
        if state is not None and state.wants_importance(module.layer_idx):
            scaling = kwargs.get("scaling") or module.scaling
            state.record_importance(module.layer_idx, query, key, scaling)
        return out

    libra_attention.__name__ = f"{PREFIX}{backend_name}"
    return libra_attention


def supported_backends() -> list[str]:
    """Attention implementations the hybrid attention can wrap in this process (hub kernels once loaded)."""
    names = {"eager", *ALL_ATTENTION_FUNCTIONS.keys()} & set(ALL_MASK_ATTENTION_FUNCTIONS.keys())
    return sorted(n for n in names if not n.startswith(PREFIX) and not n.startswith("paged"))


def register_hybrid_attention(backend_name: str) -> str:
    """Register ``libra_<backend>`` (attention and mask functions) and return the name."""
    if backend_name.startswith(PREFIX):
        raise ValueError(f"attention implementation {backend_name!r} is already a Libra wrapper")
    if backend_name.startswith("paged"):
        raise ValueError(
            f"Libra-Merging does not support attn_implementation={backend_name!r}: paged attention (continuous "
            "batching) keeps one block table for every layer, and layers after a compression point cache fewer "
            f"keys. Use one of {supported_backends()}."
        )
    known = backend_name == "eager" or backend_name in ALL_ATTENTION_FUNCTIONS
    if not known or backend_name not in ALL_MASK_ATTENTION_FUNCTIONS:
        what = (
            "is not a registered attention implementation" if not known else "has no registered mask function"
        )
        raise ValueError(
            f"Libra-Merging cannot wrap attn_implementation={backend_name!r}: it {what}. Supported here: "
            f"{supported_backends()}."
        )
    name = f"{PREFIX}{backend_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(backend_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[backend_name])
    return name
