"""Libra-Merging of one sample, written to read like the spec (shared/DESIGN.md section 1).

This is the reference the batched form is tested against; it favours clarity over speed (Python loops over
intervals, non-targets and groups).
"""

from __future__ import annotations

import torch

from libra_train.compress.schedule import num_targets
from libra_train.compress.types import (
    DROPPED,
    CompressionResult,
    check_methods,
    cosine_matrix,
    importance_temperature,
)


def _first_k_by_score(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ties to the earliest index, returned sorted."""
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def select_targets(
    x: torch.Tensor, alpha: torch.Tensor, n_targets: int, select: str, lam: float = 1.0
) -> torch.Tensor:
    """Target indices ``[N_t]`` (sorted) of one sample.

    Args:
        x: ``[N, D]`` visual hidden states (used by ``turbo`` only).
        alpha: ``[N]`` importance.
        n_targets: ``N_t``.
        select: ``interval`` (position-driven target identification: the most important token of each of
            ``N_t`` contiguous intervals, ties earliest), ``topk`` (global top ``N_t`` by alpha, ties earliest:
            FastV) or ``turbo`` (the ``N - N_t`` most mergeable tokens are non-targets, mergeability
            ``r_j - lam * alpha_j / max(alpha)`` with ``r_j`` the highest cosine similarity of token ``j`` to
            any other visual token; the targets are the ``N_t`` least mergeable, ties to the earliest).
        lam: ``turbo``'s importance weight.
    """
    n = alpha.shape[0]
    if select == "interval":
        index = []
        for i in range(n_targets):
            start, end = i * n // n_targets, (i + 1) * n // n_targets
            index.append(start + int(torch.argmax(alpha[start:end])))  # argmax: first maximum
        return torch.tensor(index, dtype=torch.long, device=alpha.device)
    if select == "topk":
        return _first_k_by_score(alpha.float(), n_targets)
    # turbo
    sim = cosine_matrix(x, x)
    sim.fill_diagonal_(float("-inf"))
    redundancy = sim.max(dim=1).values
    peak = alpha.float().max().clamp_min(torch.finfo(torch.float32).tiny)
    mergeability = redundancy - lam * alpha.float() / peak
    return _first_k_by_score(-mergeability, n_targets)


def _softmax_weights(alpha: torch.Tensor, members: list[int], tau: torch.Tensor) -> torch.Tensor:
    return torch.softmax(alpha[members].float() / tau, dim=0)


def compress_visual_tokens(
    x: torch.Tensor,
    alpha: torch.Tensor,
    ratio: float,
    *,
    select: str = "interval",
    merge: str = "igm",
    theta: float = 0.7,
    lam: float = 1.0,
) -> CompressionResult:
    """Compress one sample's visual span.

    Args:
        x: ``[N, D]`` visual hidden states; merging is differentiable in ``x``.
        alpha: ``[N]`` importance (attention of the query token(s) on each visual token); no gradient.
        ratio: fraction of visual tokens removed, in ``[0, 1)``; ``N_t = max(1, round(N * (1 - ratio)))``.
        select: ``interval`` | ``topk`` | ``turbo`` (see :func:`select_targets`).
        merge: ``igm`` (importance-informed grouped merging: similar non-targets join their most similar
            target, dissimilar ones form one compensation token), ``prune`` (drop non-targets), ``mean`` (every
            non-target joins its most similar target; plain averages), ``igm_pos`` (every non-target joins its
            group, no compensation token), ``igm_neg`` (targets unchanged; every non-target goes to the
            compensation token).
        theta: cosine threshold above which a non-target is positive (``igm``).
        lam: ``turbo``'s importance weight.

    Returns:
        A :class:`CompressionResult`.
    """
    check_methods(select, merge, ratio)
    n, _ = x.shape
    n_t = num_targets(n, ratio)
    alpha = alpha.detach()
    if n_t >= n:  # nothing to remove (ratio 0, or a single token): identity
        index = torch.arange(n, device=x.device)
        return CompressionResult(x, index, False, index.clone(), torch.ones(n, device=x.device))

    with torch.no_grad():
        targets = select_targets(x.detach(), alpha, n_t, select, lam)
        is_target = torch.zeros(n, dtype=torch.bool, device=x.device)
        is_target[targets] = True
        sim = cosine_matrix(x.detach()[targets], x.detach())  # [N_t, N]
        best = sim.argmax(dim=0)  # i*(j): first maximum = earliest target
        best_sim = sim.max(dim=0).values  # s_max(j)
        tau = importance_temperature(alpha)

        assignment = torch.full((n,), DROPPED, dtype=torch.long, device=x.device)
        assignment[targets] = torch.arange(n_t, device=x.device)
        non_targets = [j for j in range(n) if not is_target[j]]
        for j in non_targets:
            if merge in ("mean", "igm_pos") or (merge == "igm" and best_sim[j] > theta):
                assignment[j] = best[j]
            elif merge in ("igm", "igm_neg"):
                assignment[j] = n_t  # the compensation token
            # prune: stays dropped

    weights = torch.zeros(n, dtype=torch.float32, device=x.device)
    tokens = []
    for i in range(n_t + 1):
        members = (assignment == i).nonzero().flatten().tolist()
        if not members:  # only the compensation group can be empty
            continue
        if merge == "mean":
            w = torch.full((len(members),), 1.0 / len(members), device=x.device)
        elif merge == "prune":
            w = torch.ones(1, device=x.device)
        else:
            w = _softmax_weights(alpha, members, tau)
        weights[members] = w
        tokens.append((w[:, None] * x[members].float()).sum(0).to(x.dtype))
    return CompressionResult(
        tokens=torch.stack(tokens),
        target_index=targets,
        has_compensation=bool((assignment == n_t).any()),
        assignment=assignment,
        weights=weights,
    )
