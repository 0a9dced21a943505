"""The two similarity decisions of the batched algorithm, exact, with the bulk of the work in float32.

The spec's decisions are made on float32 cosines computed in float64 and rounded (:func:`cosine_matrix`): the
float64 product makes ``S[i, j]`` and ``S[j, i]``, or two identical targets, round to the same float32, so the
exact tie rules (earliest target wins, ``s_max > theta`` is strict) hold. On GPUs whose float64 throughput is
1/64 of float32 (L40S, RTX) the full ``[T, N]`` float64 GEMM, and Turbo's ``[N, N]`` one, cost ~20 ms per
forward at LLaVA-7B shape. This module makes the same decisions from a float32 GEMM and recomputes in float64
only what the float32 numbers cannot decide.

- :func:`target_match`: per token, the most similar real target (ties to the earliest) and whether that
  similarity exceeds theta (igm's positive set).
- :func:`redundancy`: Turbo's ``r_j``, the highest similarity of token ``j`` to any *other* real token, as the
  exact float32 value (it feeds ``r_j - lam * alpha_j / max(alpha)`` and a top-k, so the value must match).

Precision policy (:data:`PRECISIONS`; a ``precision=`` argument, or :func:`use_precision` for a whole block):

- ``"float64"``: the full float64 product, as :func:`cosine_matrix` (the readable reference, single.py).
- ``"refine"``: the estimate ``E = fl32(a) @ fl32(b)^T`` of the float64-normalised vectors ``a``, ``b``, then
  float64 only where a decision lies within the error bound ``delta`` of ``E`` (below):
  a token column is *ambiguous* when its top-2 estimates are within ``2 * delta`` (the argmax could be another
  target, or a tie that the earliest-target rule decides) or its top estimate is within ``delta`` of theta;
  ambiguous columns are recomputed exactly against all targets. For :func:`redundancy`, a row whose top-2 gap
  exceeds ``2 * delta`` has a certain partner ``p`` and gets ``fl32(a_j . a_p)`` from one float64 dot product;
  ambiguous rows get a full float64 row. Outside the ambiguous set the float32 decision provably equals the
  float64 one; inside it the float64 one is computed. The float64 work is ``O(B * K * T * D)`` (``K`` = the most
  ambiguous columns of a sample; the recompute is one ``[B, T, K]`` batched product, so its kernel count does not
  depend on the data) plus ``O(B * N * D)`` for the normalisation and Turbo's partner dots, instead of
  ``O(B * T * N * D)``. One value is read to the host per call, ``K``, to size the recompute (skipped when
  ``K == 0``); nothing else. The matmul precision settings enter the bound (TF32 or bf16 inputs make it ~2^-9 or
  ~2^-6, and many more columns ambiguous): ``python -m libra_train.bench.similarity`` prints the shares.
- ``"auto"`` (the default): ``"float64"`` where float64 matmuls are cheap (the CPU, and P100/V100/A100/H100/
  H200/B200, where they run at half the float32 rate: the full product then costs less than refine's host
  read, which a GPU pays as a stall of its launch queue), ``"refine"`` on every other device (L40S, L4, A10,
  RTX, T4: float64 at 1/32 to 1/64 of float32).

Why ``delta`` bounds ``|E - R|``, with ``R = fl32(a . b computed in float64)`` the reference's float32 value
(N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, eq. (3.5): for any order of
summation, FMA or blocked/split-K GEMMs included, ``|fl(x . y) - x . y| <= gamma_n |x| . |y|`` with
``gamma_n = n u / (1 - n u)``):

1. ``a``, ``b`` are float64 unit vectors (or zero), so ``||a||, ||b|| <= 1 + (D + 2) u64`` and, by Cauchy-Schwarz,
   ``|a| . |b| <= (1 + (D + 2) u64)^2 =: c``.
2. Each component cast to float32 (and, under TF32 or bf16 matmul precision, to the tensor-core input format,
   which may truncate) has relative error ``v <= u32 + w (1 + u32)``, ``w`` = 0 (IEEE), ``2^-10`` (TF32) or
   ``2^-7`` (bf16). So ``|fl32(a) . fl32(b) - a . b| <= ((1 + v)^2 - 1) c``.
3. The float32 accumulation adds ``gamma_D(u32) (1 + v)^2 c`` (Higham (3.5)); values below float32's normal
   range (flushed to zero on some GPUs) add at most ``D * 2^-125``.
4. The reference's float64 product is within ``gamma_D(u64) c`` of ``a . b``, and its rounding to float32 adds at
   most ``u32`` (``|R| <= 1`` up to ``c``).

``delta`` is the sum, times ``1 + 2^-10`` so that the float32 arithmetic of the ambiguity test itself (a
difference, a scalar cast to float32) cannot hide a case: about ``(D + 3) * 2^-24`` for IEEE float32, i.e.
``2.4e-4`` at ``D = 4096``. Given ``|E - R| <= delta`` everywhere: a top-2 gap ``> 2 delta`` means the estimated
argmax has ``R`` strictly above every other target (no tie either), and ``|E_max - theta| > delta`` puts
``R_max`` on the same side of theta. ``R`` itself is equal in both paths except where a float64 value sits
within float64 rounding error of a float32 rounding boundary (then the reference's own GEMM could round either
way, see :func:`cosine_matrix`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from libra_train.compress.types import cosine_matrix, to_host

PRECISIONS = ("auto", "float64", "refine")

_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53  # unit roundoff of float64
_NEG_INF = float("-inf")
_precision: contextvars.ContextVar[str] = contextvars.ContextVar("libra_similarity_precision", default="auto")


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[None]:
    """Make ``precision`` the default of :func:`target_match` and :func:`redundancy` inside the block.

    The batched compression reads this default, so a test (or a user) can force ``"refine"`` on CPU, or
    ``"float64"`` on a GPU, for everything the block runs.
    """
    _check(precision)
    token = _precision.set(precision)
    try:
        yield
    finally:
        _precision.reset(token)


# CUDA compute capabilities whose float64 matmul runs at half the float32 rate (P100, V100, A100/A30,
# H100/H200, B200): there the full float64 product costs less than the host read refine needs. Every other
# part (T4, A10/A40, L4/L40S, RTX; B300, which cut float64) runs float64 at 1/32 to 1/64 of float32.
_FAST_FLOAT64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


def float64_is_fast(device: torch.device) -> bool:
    """Whether a float64 matmul on ``device`` is cheap: the CPU, and the CUDA parts listed above."""
    if device.type == "cpu":
        return True
    if device.type == "cuda" and torch.version.hip is None:
        return torch.cuda.get_device_capability(device) in _FAST_FLOAT64_CAPABILITIES
    return False  # unknown (ROCm, MPS, XPU, ...): refine, which is exact everywhere


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``"float64"`` or ``"refine"``: ``precision`` (default: the :func:`use_precision` setting) on ``device``."""
    precision = _precision.get() if precision is None else precision
    _check(precision)
    if precision == "auto":
        return "float64" if float64_is_fast(device) else "refine"
    return precision


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"similarity precision {precision!r} is not one of {PRECISIONS}: 'float64' computes every cosine in "
            "float64, 'refine' computes them in float32 and only the undecided ones in float64, 'auto' picks "
            "float64 where float64 matmuls are fast (CPU, A100, H100, ...) and refine elsewhere"
        )


# Relative error of a float32 GEMM input inside the kernel, per torch fp32_precision value: IEEE none, TF32 and
# bf16 at most one unit of their last mantissa bit (tensor cores may truncate instead of rounding).
INPUT_ROUNDOFF = {"ieee": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-7}
_LEGACY = {"highest": "ieee", "high": "tf32", "medium": "bf16"}  # torch.get_float32_matmul_precision()


def matmul_input_roundoff(device: torch.device) -> float:
    """``w`` of the error bound: what the current settings let a float32 matmul on ``device`` do to its inputs.

    Read from the backend's ``fp32_precision`` (``torch.backends.cuda.matmul`` on CUDA, ``mkldnn.matmul`` on
    CPU, both elsewhere), which inherits ``torch.backends.fp32_precision`` and, when neither is set, the legacy
    ``torch.get_float32_matmul_precision()`` (which raises once the two APIs are mixed: then assume bf16). A
    value it does not know counts as bf16: a larger bound only costs float64 columns, never a decision.
    """
    if device.type == "cuda":
        backends = [torch.backends.cuda.matmul]
    elif device.type == "cpu":
        backends = [torch.backends.mkldnn.matmul]
    else:
        backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    flags = [getattr(b, "fp32_precision", "none") for b in backends]
    flags = [getattr(torch.backends, "fp32_precision", "none") if f == "none" else f for f in flags]
    if "none" in flags:
        try:
            legacy = _LEGACY.get(torch.get_float32_matmul_precision(), "bf16")
        except RuntimeError:
            legacy = "bf16"
        flags = [legacy if f == "none" else f for f in flags]
    return max(INPUT_ROUNDOFF.get(f, INPUT_ROUNDOFF["bf16"]) for f in flags)


def error_bound(dim: int, input_roundoff: float = 0.0) -> float:
    """``delta >= |E - R|`` for cosines of ``dim``-channel vectors; see the module docstring, step by step.

    ``input_roundoff`` is ``w`` there (:func:`matmul_input_roundoff`): 0 for IEEE float32, ``2^-10`` TF32,
    ``2^-7`` bf16.
    """
    v = _U32 + input_roundoff * (1 + _U32)  # 2. relative error of one GEMM input component
    c = (1 + (dim + 2) * _U64) ** 2  # 1. bound on |a| . |b|
    gamma32 = dim * _U32 / (1 - dim * _U32)
    gamma64 = dim * _U64 / (1 - dim * _U64)
    estimate = ((1 + v) ** 2 - 1) * c + gamma32 * (1 + v) ** 2 * c + dim * 2.0**-125  # 2. + 3.
    reference = gamma64 * c + _U32  # 4.
    return (estimate + reference) * (1 + 2.0**-10)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Float64 unit rows (zero rows stay zero), exactly as :func:`cosine_matrix` normalises."""
    return F.normalize(x.double(), dim=-1, eps=1e-12)


def _top2(est: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top estimate and its gap to the second along ``dim`` (an infinite gap where there is no second)."""
    if est.shape[dim] < 2:
        top = est.max(dim).values
        return top, torch.full_like(top, float("inf"))
    values = est.topk(2, dim=dim).values
    first, second = values.unbind(dim)
    return first, first - second


# ---------------------------------------------------------------------------------------------------------------
# Target matching (igm, mean, igm_pos).


def target_match(
    targets: torch.Tensor,
    tokens: torch.Tensor,
    target_mask: torch.Tensor,
    theta: float,
    *,
    token_mask: torch.Tensor | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's most similar real target, and whether it is positive (similarity above theta).

    Args:
        targets: ``[B, T, D]`` target hidden states (any float dtype).
        tokens: ``[B, N, D]`` hidden states of the tokens to match.
        target_mask: ``[B, T]`` bool, True for real targets.
        theta: the positive threshold; compared as ``float32 cosine > theta`` (torch casts theta to float32).
        token_mask: ``[B, N]`` bool, the tokens whose answers matter (default all); refine does not spend
            float64 work on the others (padding), whose answers are then the float32 estimate's.
        precision: one of :data:`PRECISIONS`; default the :func:`use_precision` setting (``"auto"``).

    Returns:
        ``(best [B, N] long, positive [B, N] bool)``: ``best`` is the argmax of the float32 cosine over the
        real targets, ties to the earliest (0 where a sample has no target); ``positive`` is ``max > theta``.
    """
    if resolve_precision(precision, tokens.device) == "float64":
        sim = cosine_matrix(targets, tokens).masked_fill(~target_mask[..., None], _NEG_INF)  # [B, T, N]
        return sim.argmax(1), sim.max(1).values > theta
    a, b = _normalize(targets), _normalize(tokens)  # [B, T, D], [B, N, D]
    best, positive, ambiguous = _match_estimate(a, b, target_mask, theta, token_mask)
    if ambiguous.numel() == 0:
        return best, positive
    k = to_host(ambiguous.sum(1).amax())  # the one host read: the most ambiguous columns of a sample
    if k == 0:
        return best, positive
    # The k most ambiguous columns of every sample (all its ambiguous ones; the rest of the k are recomputed
    # too, which is exact and harmless), recomputed in float64 against all targets as the reference does.
    cols = ambiguous.float().topk(k, dim=1).indices  # [B, K]
    sub = b.gather(1, cols[..., None].expand(-1, -1, b.shape[2]))  # [B, K, D]
    exact = (a @ sub.transpose(1, 2)).float().masked_fill(~target_mask[..., None], _NEG_INF)  # [B, T, K]
    best = best.scatter(1, cols, exact.argmax(1))
    positive = positive.scatter(1, cols, exact.max(1).values > theta)
    return best, positive


def _match_estimate(a, b, target_mask, theta, token_mask, delta=None):
    """Float32 decisions of :func:`target_match` and which of them the error bound cannot certify, ``[B, N]``.

    ``a [B, T, D]`` and ``b [B, N, D]`` are the float64-normalised targets and tokens; ``delta`` defaults to
    :func:`error_bound` under the current settings (the benchmark passes others, to see how the ambiguous share
    grows with a coarser matmul).
    """
    delta = error_bound(a.shape[-1], matmul_input_roundoff(a.device)) if delta is None else delta
    est = (a.float() @ b.float().transpose(1, 2)).masked_fill(~target_mask[..., None], _NEG_INF)  # [B, T, N]
    if est.shape[1] == 0:  # no targets at all: nothing to match, nothing positive
        zeros = torch.zeros(b.shape[:2], dtype=torch.long, device=b.device)
        return zeros, zeros.bool(), zeros.bool()
    top, gap = _top2(est, 1)  # [B, N]
    # `top - theta` and `top > theta` cast theta to float32 (relative error <= u32), hence the theta margin.
    # A sample without targets has top = -inf and gap = NaN: certain (nothing positive, argmax 0 as the reference).
    ambiguous = (gap <= 2 * delta) | ((top - theta).abs() <= delta + _U32 * abs(theta))
    if token_mask is not None:
        ambiguous &= token_mask
    return est.argmax(1), top > theta, ambiguous


# ---------------------------------------------------------------------------------------------------------------
# Turbo's redundancy.


def redundancy(x: torch.Tensor, mask: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
    """Turbo's ``r_j``: the highest float32 cosine of token ``j`` to any other real token of its sample.

    Args:
        x: ``[B, N, D]`` hidden states.
        mask: ``[B, N]`` bool, True for real tokens.
        precision: one of :data:`PRECISIONS`; default the :func:`use_precision` setting (``"auto"``).

    Returns:
        ``[B, N]`` float32: ``-inf`` for a token without another real token, and for padding.
    """
    if x.shape[1] == 0:
        return torch.full(mask.shape, _NEG_INF, device=x.device)
    if resolve_precision(precision, x.device) == "float64":
        sim = cosine_matrix(x, x)  # [B, N, N]
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        sim = sim.masked_fill(eye | ~mask[:, None, :], _NEG_INF)
        return sim.max(-1).values.masked_fill(~mask, _NEG_INF)
    a = _normalize(x)  # [B, N, D]
    value, ambiguous = _redundancy_estimate(a, mask)
    if ambiguous.numel() == 0:
        return value
    k = to_host(ambiguous.sum(1).amax())  # the one host read
    if k == 0:
        return value
    rows = ambiguous.float().topk(k, dim=1).indices  # [B, K]
    sub = a.gather(1, rows[..., None].expand(-1, -1, a.shape[2]))  # [B, K, D]
    exact = (sub @ a.transpose(1, 2)).float()  # [B, K, N]
    itself = rows[..., None] == torch.arange(x.shape[1], device=x.device)  # [B, K, N]
    exact = exact.masked_fill(itself | ~mask[:, None, :], _NEG_INF)
    return value.scatter(1, rows, exact.max(-1).values).masked_fill(~mask, _NEG_INF)


def _redundancy_estimate(a, mask, delta=None):
    """Float32-certified ``r [B, N]`` and the rows the error bound cannot certify, ``[B, N]`` bool.

    Certified rows take their value from a float64 dot with their (certain) most similar other token.
    """
    n = a.shape[1]
    delta = error_bound(a.shape[-1], matmul_input_roundoff(a.device)) if delta is None else delta
    est = a.float() @ a.float().transpose(1, 2)  # [B, N, N]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    est = est.masked_fill(eye | ~mask[:, None, :], _NEG_INF)
    top, gap = _top2(est, 2)  # [B, N]
    partner = est.argmax(2)  # [B, N]
    dot = torch.linalg.vecdot(a, a.gather(1, partner[..., None].expand(-1, -1, a.shape[2]))).float()  # [B, N]
    value = torch.where(top == _NEG_INF, top, dot).masked_fill(~mask, _NEG_INF)  # no other real token: -inf
    return value, (gap <= 2 * delta) & mask
