"""A pure-torch stand-in for the ``flash_attn`` 2.x functions transformers calls, so its flash path runs on CPU.

transformers' ``flash_attention_2`` backend (``integrations/flash_attention.py`` ->
``modeling_flash_attention_utils._flash_attention_forward``) imports ``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_with_kvcache`` and ``flash_attn.bert_padding.{pad_input, unpad_input}``,
unpads padded batches to the varlen form with int32 ``cu_seqlens`` and calls the kernels. This module provides
those functions with FA2's semantics, written from its documented API:

- layout ``[batch, seqlen, heads, head_dim]`` (varlen: ``[total_tokens, heads, head_dim]``);
- GQA/MQA: query head ``h`` reads key/value head ``h // (heads / kv_heads)``;
- ``causal=True`` is aligned to the *bottom right* of the score matrix (flash-attn >= 2.1): query ``i`` of
  ``L_q`` sees key ``j`` of ``L_k`` iff ``j <= i + L_k - L_q`` (so one decode query sees every cached key);
- ``window_size=(left, right)`` (-1 = unbounded), ``softcap`` (``tanh`` capping), ``softmax_scale``
  (default ``head_dim ** -0.5``); ``cu_seqlens`` must be int32, as the CUDA kernels require.

:func:`install` puts the module into ``sys.modules`` (as ``flash_attn`` and ``flash_attn.bert_padding``) and makes
transformers' availability check say yes; it is for tests only (``tests/plugin/test_backends.py``). Real
flash-attn is checked on a GPU by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

CALLS = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}


def _attend(q, k, v, scale, causal, window, softcap):
    """One sequence: q ``[L_q, H, d]``, k/v ``[L_k, H_kv, d]`` -> ``[L_q, H, d]`` (fp32 math)."""
    lq, heads, dim = q.shape
    lk, kv_heads = k.shape[0], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [H, L_q, L_k]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # bottom-right alignment
    j = torch.arange(lk, device=q.device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing gives 0, as FA2 does
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, deterministic=False, return_attn_probs=False,
):  # fmt: skip
    if dropout_p:
        raise NotImplementedError("stand-in: dropout")
    if alibi_slopes is not None:
        raise NotImplementedError("stand-in: alibi")
    CALLS["flash_attn_func"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack(
        [_attend(q[b], k[b], v[b], scale, causal, window_size, softcap) for b in range(q.shape[0])]
    )


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        raise RuntimeError("cu_seqlens_q must have dtype int32")  # the CUDA kernels' own check
    if dropout_p or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("stand-in: dropout / alibi / paged kv")
    CALLS["flash_attn_varlen_func"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(bq) - 1):
        qs, ks = slice(bq[s], bq[s + 1]), slice(bk[s], bk[s + 1])
        if bq[s + 1] > bq[s]:
            out[qs] = _attend(q[qs], k[ks], v[ks], scale, causal, window_size, softcap)
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("stand-in: flash_attn_with_kvcache (paged attention) is not provided")


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """``[B, L, ...]`` + ``[B, L]`` mask -> ``(tokens, indices, cu_seqlens int32, max_seqlen, seqused)``."""
    mask = attention_mask.bool() if unused_mask is None else (attention_mask.bool() | unused_mask.bool())
    seqlens = mask.sum(-1, dtype=torch.int32)
    used = attention_mask.bool().sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(seqlens.max()), used


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of :func:`unpad_input`: ``[total, ...]`` -> ``[batch, seqlen, ...]`` with zeros at padding."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def install(monkeypatch) -> None:
    """Make ``import flash_attn`` give this stand-in and transformers believe flash-attn 2 is installed."""
    import transformers.modeling_flash_attention_utils as fa_utils

    package = types.ModuleType("flash_attn")
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        setattr(package, name, globals()[name])
    package.__version__ = "2.8.3"
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = pad_input, unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # import again, from the stand-in
    for key in CALLS:
        CALLS[key] = 0
