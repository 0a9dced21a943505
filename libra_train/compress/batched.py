"""Libra-Merging of a padded batch, vectorised (no Python loop over tokens or targets).

Each sample's visual tokens sit at the front of its row (``mask`` is a prefix mask), so interval boundaries
are plain integer arithmetic. Cost per sample: ``O(N_t * N * D)`` for the target/token similarity and the
same again for the merge, done as one batched matmul with a sparse ``[T+1, N]`` weight matrix (deterministic
on GPU, unlike atomic scatter-adds); selection and weights are computed without gradient.

Host synchronisation. Every tensor width here (``N``, ``T``, the longest interval, ``M``) is a function of the
per-sample visual counts alone. A caller that already holds those counts on the host (the plug-in reads them
once per forward) passes them as ``counts`` and nothing is read back from the device: the per-sample values
are computed twice, on the host for the shapes and on the device for the data, by the same formulas. Without
``counts`` they are read from ``mask`` (and the prefix mask is validated), as a standalone call expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from libra_train.compress.schedule import num_targets
from libra_train.compress.types import (
    DROPPED,
    BatchCompressionResult,
    check_methods,
    cosine_matrix,
    importance_temperature,
    to_host,
)

_NEG_INF = float("-inf")
COMPENSATING_MERGES = ("igm", "igm_neg")  # the merges that can emit an information compensation token


def _num_targets(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[B]`` ``max(1, round(n * (1 - ratio)))`` per sample (0 where ``n == 0``), Python's rounding.

    float64 products round exactly as Python floats do and ``torch.round`` is half-to-even like ``round``.
    """
    n_t = torch.round(n.double() * (1.0 - ratio)).long().clamp_min(1)
    return torch.where(n > 0, n_t, torch.zeros_like(n_t))


def _first_k_by_score(score: torch.Tensor, k: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k[b]`` highest scores (ties earliest), sorted by index: ``([B, width], [B, width])``."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width, device=score.device) < k[:, None]
    big = score.shape[1]
    index = torch.sort(torch.where(valid, order, big), dim=1).values
    return index.masked_fill(~valid, 0), valid


def _select_interval(alpha: torch.Tensor, n: torch.Tensor, n_t: torch.Tensor, width: int, span: int):
    """Position-driven target identification: argmax of alpha in each of ``n_t`` contiguous intervals.

    ``span`` is the longest interval of the batch, ``max ceil(n / n_t)`` (consecutive ``floor(i * n / n_t)``
    differ by at most that).
    """
    device = alpha.device
    i = torch.arange(width, device=device)  # [T]
    valid = i < n_t[:, None]  # [B, T]
    safe_t = n_t.clamp_min(1)[:, None]
    start = (i * n[:, None]) // safe_t  # [B, T]: floor(i * N / N_t)
    end = ((i + 1) * n[:, None]) // safe_t
    offsets = torch.arange(max(span, 1), device=device)
    index = start[..., None] + offsets  # [B, T, W]
    inside = (index < end[..., None]) & valid[..., None]
    a = alpha.gather(1, index.clamp_max(alpha.shape[1] - 1).flatten(1)).view(index.shape)
    a = a.masked_fill(~inside, _NEG_INF)
    target = start + a.argmax(-1)  # argmax: first maximum, i.e. the earliest on ties
    return target.masked_fill(~valid, 0), valid


def _select(x, alpha, mask, n, n_t, width, span, select, lam):
    if select == "interval":
        return _select_interval(alpha, n, n_t, width, span)
    if select == "topk":
        return _first_k_by_score(alpha.masked_fill(~mask, _NEG_INF), n_t, width)
    # turbo: redundancy = highest similarity to another visual token; the least mergeable are targets
    sim = cosine_matrix(x, x)  # [B, N, N]
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(eye | ~mask[:, None, :], _NEG_INF)
    redundancy = sim.max(-1).values
    peak = alpha.masked_fill(~mask, 0).max(-1, keepdim=True).values.clamp_min(torch.finfo(torch.float32).tiny)
    mergeability = redundancy - lam * alpha / peak
    return _first_k_by_score((-mergeability).masked_fill(~mask, _NEG_INF), n_t, width)


def _group_softmax(logits: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Softmax of ``logits [B, N]`` within each group id of ``group [B, N]`` (ids in ``0..num_groups-1``)."""
    shape = (logits.shape[0], num_groups)
    peak = torch.full(shape, _NEG_INF, device=logits.device).scatter_reduce(
        1, group, logits, reduce="amax", include_self=True
    )
    e = torch.exp(logits - peak.gather(1, group))
    total = torch.zeros(shape, device=logits.device).scatter_add(1, group, e)
    return e / total.gather(1, group)


def _identity(x: torch.Tensor, mask: torch.Tensor) -> BatchCompressionResult:
    b, n, _ = x.shape
    index = torch.arange(n, device=x.device).expand(b, n)
    count = mask.sum(1)
    return BatchCompressionResult(
        tokens=x.masked_fill(~mask[..., None], 0.0),  # padding rows are zeros, as in the general path
        token_mask=mask,
        target_index=index.masked_fill(~mask, 0),
        target_mask=mask,
        num_targets=count,
        has_compensation=torch.zeros(b, dtype=torch.bool, device=x.device),
        assignment=index.masked_fill(~mask, DROPPED),
        weights=mask.float(),
        input_mask=mask,
    )


def compress_visual_tokens_batched(
    x: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    *,
    select: str = "interval",
    merge: str = "igm",
    theta: float = 0.7,
    lam: float = 1.0,
    counts: Sequence[int] | None = None,
) -> BatchCompressionResult:
    """Compress a padded batch of visual spans; per sample equal to :func:`compress_visual_tokens`.

    Args:
        x: ``[B, N, D]`` visual hidden states, sample ``b``'s tokens first (``mask[b]`` is a prefix).
        alpha: ``[B, N]`` importance; padding entries are ignored.
        mask: ``[B, N]`` bool, True for real visual tokens (``N_b = mask[b].sum()``, may be 0).
        ratio, select, merge, theta, lam: as in :func:`compress_visual_tokens`.
        counts: the host's copy of ``mask.sum(1)``, if the caller has one: then nothing is read from the
            device, the mask is trusted to be a prefix mask, and the output width ``M`` is ``T + 1`` for merges
            that can make a compensation token (the slot is reserved whether or not one is made). Without it,
            ``M`` is the batch's real maximum.

    Returns:
        A :class:`BatchCompressionResult`.
    """
    check_methods(select, merge, ratio)
    bsz, n_max, _ = x.shape
    device = x.device
    n = mask.sum(1)  # [B]
    reserve = counts is not None
    if counts is None:
        if not torch.equal(mask, torch.arange(n_max, device=device) < n[:, None]):
            raise ValueError("mask must be a prefix mask: each sample's visual tokens first, padding after")
        counts = to_host(n)
    kept = [num_targets(c, ratio) for c in counts]  # host copy of n_t
    if all(
        k >= c for k, c in zip(kept, counts)
    ):  # nothing to remove anywhere (ratio 0, single tokens, empty)
        return _identity(x, mask)
    n_t = _num_targets(n, ratio)  # [B], equal to `kept`

    width = max(kept)  # T
    span = max(-(-c // k) for c, k in zip(counts, kept) if k)  # the longest interval, ceil(n / n_t)
    with torch.no_grad():
        xd, alpha = x.detach(), alpha.detach().float().masked_fill(~mask, 0.0)
        target, tmask = _select(xd, alpha, mask, n, n_t, width, span, select, lam)  # [B, T]
        # Padded target slots scatter into an extra column n_max (dropped), so they never overwrite token 0.
        slot = torch.arange(width, device=device).expand(bsz, width)
        where = target.masked_fill(~tmask, n_max)
        is_target = torch.zeros((bsz, n_max + 1), dtype=torch.bool, device=device).scatter(1, where, True)
        is_target = is_target[:, :n_max]  # [B, N]
        own = torch.zeros((bsz, n_max + 1), dtype=torch.long, device=device).scatter(1, where, slot)[
            :, :n_max
        ]

        sim = cosine_matrix(xd.gather(1, target[..., None].expand(-1, -1, x.shape[2])), xd)  # [B, T, N]
        sim = sim.masked_fill(~tmask[..., None], _NEG_INF)
        best = sim.argmax(1)  # [B, N] i*(j): first maximum = earliest target
        positive = sim.max(1).values > theta  # [B, N] s_max(j) > theta

        comp = n_t[:, None].expand(bsz, n_max)  # compensation group id of each sample = N_t
        if merge in ("mean", "igm_pos"):
            group = best
        elif merge == "igm":
            group = torch.where(positive, best, comp)
        elif merge == "igm_neg":
            group = comp
        else:  # prune
            group = torch.full_like(best, DROPPED)
        group = torch.where(is_target, own, group).masked_fill(~mask, DROPPED)  # [B, N]

        # Group ids 0..T are real (T = the largest compensation id); dropped tokens go to scratch group T+1.
        scratch = torch.where(group == DROPPED, width + 1, group)
        if merge == "mean":
            size = torch.zeros((bsz, width + 2), device=device).scatter_add(1, scratch, mask.float())
            weights = 1.0 / size.gather(1, scratch)
        elif merge == "prune":
            weights = torch.ones((bsz, n_max), device=device)
        else:
            logits = alpha / importance_temperature(alpha, mask)[:, None]
            weights = _group_softmax(logits, scratch, width + 2)
        weights = weights.masked_fill(group == DROPPED, 0.0)
        has_comp = (group == n_t[:, None]).any(1)

    num_out = n_t + has_comp.long()
    m = width + (merge in COMPENSATING_MERGES) if reserve else int(num_out.max())
    if merge == "prune":  # an exact index select, no arithmetic
        tokens = x.gather(1, target[..., None].expand(-1, -1, x.shape[2]))
        tokens = tokens * tmask[..., None].to(x.dtype)
    else:
        # Dense weight matrix W[b, g, j] = weight of token j in group g; tokens = W @ x (float32 accumulate).
        w = torch.zeros((bsz, width + 2, n_max), device=device).scatter(
            1, scratch[:, None, :], weights[:, None]
        )
        # Padding rows are zeroed: their weight is 0, but 0 * inf/NaN would still poison the product.
        tokens = (w[:, :m] @ x.float().masked_fill(~mask[..., None], 0.0)).to(x.dtype)
    return BatchCompressionResult(
        tokens=tokens[:, :m],
        token_mask=torch.arange(m, device=device) < num_out[:, None],
        target_index=target,
        target_mask=tmask,
        num_targets=n_t,
        has_compensation=has_comp,
        assignment=group,
        weights=weights,
        input_mask=mask,
    )
