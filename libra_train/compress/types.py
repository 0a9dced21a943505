"""Result types and small shared pieces of the compression algorithm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELECT_METHODS = ("interval", "topk", "turbo")
MERGE_METHODS = ("igm", "prune", "mean", "igm_pos", "igm_neg")

# Group id of a token that is dropped (prune) or is padding, in ``assignment``.
DROPPED = -1


@dataclass
class CompressionResult:
    """Compression of one sample's visual span.

    Attributes:
        tokens: ``[N_t (+1), D]`` merged targets in original order, then the compensation token if any.
        target_index: ``[N_t]`` sorted indices into ``0..N-1`` of the targets.
        has_compensation: whether ``tokens`` ends with an information compensation token.
        assignment: ``[N]`` group of every input token: ``i`` in ``0..N_t-1`` for target ``i``'s group,
            ``N_t`` for the compensation token, ``-1`` for a dropped token.
        weights: ``[N]`` weight of every token inside its group (0 for dropped tokens); each group sums to 1.
    """

    tokens: torch.Tensor
    target_index: torch.Tensor
    has_compensation: bool
    assignment: torch.Tensor
    weights: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int(self.target_index.numel())


@dataclass
class BatchCompressionResult:
    """Compression of a padded batch of visual spans; sample ``b`` reads like a :class:`CompressionResult`.

    Attributes:
        tokens: ``[B, M, D]``; sample ``b`` holds its ``num_targets[b]`` merged targets, then its compensation
            token if ``has_compensation[b]``, then padding (zeros).
        token_mask: ``[B, M]`` True for real output tokens.
        target_index: ``[B, T]`` sorted target indices, padded with 0 where ``target_mask`` is False.
        target_mask: ``[B, T]`` True for real targets.
        num_targets: ``[B]`` targets per sample (0 for a sample without visual tokens).
        has_compensation: ``[B]`` bool.
        assignment: ``[B, N]`` as in :class:`CompressionResult` (``num_targets[b]`` is the compensation group,
            ``-1`` dropped or padding).
        weights: ``[B, N]`` float32.
        input_mask: ``[B, N]`` the input's prefix mask of real visual tokens.
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    target_index: torch.Tensor
    target_mask: torch.Tensor
    num_targets: torch.Tensor
    has_compensation: torch.Tensor
    assignment: torch.Tensor
    weights: torch.Tensor
    input_mask: torch.Tensor

    @property
    def num_tokens(self) -> torch.Tensor:
        """``[B]`` output tokens per sample (targets + compensation)."""
        return self.num_targets + self.has_compensation.long()

    def sample(self, b: int) -> CompressionResult:
        """The result of sample ``b`` in single-sample form (for tests and inspection)."""
        n_out = int(self.num_tokens[b])
        n_t = int(self.num_targets[b])
        n = int(self.input_mask[b].sum())
        return CompressionResult(
            tokens=self.tokens[b, :n_out],
            target_index=self.target_index[b, :n_t],
            has_compensation=bool(self.has_compensation[b]),
            assignment=self.assignment[b, :n],
            weights=self.weights[b, :n],
        )


def to_host(t: torch.Tensor) -> list:
    """``t.tolist()`` through an explicit copy to host memory: the one way this package reads device values.

    On a GPU this is one synchronisation, as ``tolist`` would be; on a CPU-only run the explicit copy is what
    ``libra_train.bench.syncs.SyncCounter`` sees (a bare ``tolist`` of a CPU tensor dispatches nothing), so the
    sync budget counted on CPU is the one a GPU pays.
    """
    return t.to("cpu", copy=True).tolist()


def check_methods(select: str, merge: str, ratio: float) -> None:
    """Raise ``ValueError`` for an unknown method or a ratio outside ``[0, 1)``."""
    if select not in SELECT_METHODS:
        raise ValueError(f"select={select!r} is not one of {SELECT_METHODS}")
    if merge not in MERGE_METHODS:
        raise ValueError(f"merge={merge!r} is not one of {MERGE_METHODS}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} must be in [0, 1): it is the fraction of visual tokens removed")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[..., P, Q]`` between rows of ``a [..., P, D]`` and ``b [..., Q, D]``, as float32.

    A zero vector has similarity 0 with everything. Both the single-sample and the batched forms use this one
    function so that their decisions (argmax, threshold) are made on the same numbers.

    Computed in float64 and rounded to float32: a GEMM's rounding depends on where a row sits in the blocked
    product, so in float32 ``S[i, j]`` and ``S[j, i]``, or two identical targets, can differ in the last bit
    and break the spec's exact-tie rules (earliest wins). The float64 differences vanish in the rounding to
    float32 (barring a value on a float32 rounding boundary). The cost, ``O(P * Q * D)`` once per point, is
    small next to a layer.
    """
    a = F.normalize(a.double(), dim=-1, eps=1e-12)
    b = F.normalize(b.double(), dim=-1, eps=1e-12)
    return (a @ b.transpose(-1, -2)).float()


def importance_temperature(alpha: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``tau = mean(alpha)`` over the visual tokens (``[...]``), kept strictly positive.

    All-zero importance (a query that does not see the image) would give ``alpha / tau = 0 / 0``; clamping tau
    makes every logit 0, i.e. plain averaging, instead of NaN.
    """
    alpha = alpha.float()
    tau = alpha.mean(-1) if mask is None else (alpha * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return tau.clamp_min(torch.finfo(torch.float32).tiny)
