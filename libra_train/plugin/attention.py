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
    window: int | None = None,
) -> torch.Tensor:
    """Attention probabilities of selected query rows, averaged over heads and rows: ``[B, L_k]`` float32.

    Softmax over all keys the query may see (causal, sliding-window and padding masks applied), not renormalised
    over any span; heads are averaged, then the valid query rows of each sample.

    Args:
        query: ``[B, H, L_q, d]`` after rotary embedding (prefill: query ``i`` sits at key index ``i``).
        key: ``[B, H_kv, L_k, d]`` before ``repeat_kv`` (GQA: query head ``h`` reads key head ``h // (H / H_kv)``).
        scaling: the attention's softmax scale.
        query_index: ``[B, Q]`` rows to compute.
        query_mask: ``[B, Q]`` bool, False for padding entries of ``query_index``.
        key_valid: ``[B, L_k]`` bool, the 2-D padding mask.
        window: the layer's sliding window: a query sees itself and the ``window - 1`` real tokens before it
            (before compression, keys ``i - window < j <= i``), None: full causal.
    """
    bsz, heads, _, dim = query.shape
    rows = query.gather(2, query_index[:, None, :, None].expand(bsz, heads, query_index.shape[1], dim))
    return row_attention(rows, key, scaling, query_index, query_mask, key_valid, window)


@torch.no_grad()
def row_attention(
    rows: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    query_mask: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """:func:`query_attention` of query rows already gathered: ``rows [B, H, Q, d]`` sit at ``query_index``."""
    bsz, heads, n_q, dim = rows.shape
    kv_heads, length = key.shape[1], key.shape[2]
    rows = rows.float().reshape(bsz, kv_heads, (heads // kv_heads) * n_q, dim)  # [B, H_kv, G*Q, d]
    scores = (rows @ key.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*Q, L_k]
    scores = scores.view(bsz, heads, n_q, length)
    keys = torch.arange(length, device=key.device)
    allowed = (keys <= query_index[..., None]) & key_valid[:, None, :]  # [B, Q, L_k] causal and padding
    # A sliding window counts real tokens, as every later sliding layer does (state.real_token_window).
    if window is not None and length > window:
        rank = key_valid.long().cumsum(-1)  # [B, L_k]
        allowed = allowed & (rank[:, None, :] > rank.gather(1, query_index)[..., None] - window)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)  # [B, Q, L_k]
    weight = query_mask.float()
    return (probs * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1.0)[:, None]


def gather_positions(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Gather rotary ``cos``/``sin`` along the sequence: ``[B|1, L, d]`` or M-RoPE ``[k, B|1, L, d]``."""
    seq_dim = t.ndim - 2
    bsz, new_len = source.shape
    shape = list(t.shape)
    shape[seq_dim - 1] = bsz
    t = t.expand(shape)
    index = source.view(*([1] * (t.ndim - 3)), bsz, new_len, 1).expand(*shape[:seq_dim], new_len, shape[-1])
    return t.gather(seq_dim, index)


@torch.no_grad()
def next_layer_importance(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    query_mask: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """PyramidDrop's importance: the attention row the next layer would compute, before it runs: ``[B, L]``.

    ``layer``'s own ``input_layernorm``, ``q_proj`` / ``k_proj`` (and per-head ``q_norm`` / ``k_norm`` where the
    attention has them, as Qwen3's applies them before the rotary), its modeling module's
    ``apply_rotary_pos_emb`` at the current ``position_embeddings``, then :func:`row_attention`. Only the query
    rows are projected to queries (each row is the same per-token computation as in the full projection).

    Args:
        layer: the decoder layer about to run (its ``self_attn`` has ``q_proj``, ``k_proj``, ``head_dim``,
            ``scaling``).
        hidden: ``[B, L, D]`` its input (the previous layer's output).
        position_embeddings: ``(cos, sin)`` ``[B|1, L, d]`` the layer would get.
        query_index, query_mask, key_valid, window: as in :func:`query_attention` (``window``: ``layer``'s).
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)  # [B, L, D]
    bsz, length, _ = x.shape
    head_dim, n_q = attn.head_dim, query_index.shape[1]
    rows = x.gather(1, query_index[..., None].expand(bsz, n_q, x.shape[-1]))  # [B, Q, D]
    query = attn.q_proj(rows).view(bsz, n_q, -1, head_dim)  # [B, Q, H, d]
    key = attn.k_proj(x).view(bsz, length, -1, head_dim)  # [B, L, H_kv, d]
    if getattr(attn, "q_norm", None) is not None:
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # [B, H, Q, d], [B, H_kv, L, d]
    rotate = inspect.getmodule(type(attn)).apply_rotary_pos_emb
    cos, sin = position_embeddings
    query, _ = rotate(query, query, gather_positions(cos, query_index), gather_positions(sin, query_index))
    key, _ = rotate(key, key, cos, sin)
    return row_attention(query, key, attn.scaling, query_index, query_mask, key_valid, window)


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
