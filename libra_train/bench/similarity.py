"""Cost of the similarity decisions, float64 versus refine, and how much refine leaves to float64.

At LLaVA-7B shape (B=16 samples, N=576 visual tokens, T=288 targets at R=0.5, D=4096) it times
:func:`libra_train.compress.similarity.target_match` (igm's ``[T, N]`` cosines) and ``redundancy`` (Turbo's
``[N, N]``) in both precisions, and counts the share of ambiguous columns (rows for Turbo) that refine recomputes
in float64 (the non-target columns, which are what the batched compression asks for), with the error bound of IEEE float32 and, for comparison, the larger ones of TF32 and bf16 matmuls.

    python -m libra_train.bench.similarity                      # LLaVA-7B shape, CPU
    python -m libra_train.bench.similarity --device cuda --repeats 10

Data: i.i.d. Gaussian tokens, and synthetic LLM-like hidden states (a shared mean direction, a smooth low-rank
image part, two massive channels, noise; cosines crowd in a narrow band, as real hidden states' do). On CPU
float64 is not slow; the number that carries to a GPU with 1/64-rate float64 is the float64 share of the work,
``K / N`` (``K`` = the most ambiguous columns of a sample, which sizes the recompute) instead of 1.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from libra_train.bench.timing import measure
from libra_train.compress import similarity

BOUNDS = similarity.INPUT_ROUNDOFF  # matmul input format -> the roundoff w of similarity.error_bound


def make_tokens(kind: str, b: int, n: int, d: int, device, seed: int = 0) -> torch.Tensor:
    """``[B, N, D]`` float32 tokens: ``gaussian`` or ``llm`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = torch.randn(b, n, d, generator=g)
    else:
        side = int(n**0.5)  # a smooth image: low-rank features that vary slowly over the patch grid
        z = torch.randn(b, 16, side, side, generator=g)
        z = torch.nn.functional.avg_pool2d(z, 5, stride=1, padding=2, count_include_pad=False).flatten(2)
        z = torch.nn.functional.pad(z, (0, n - side * side)).transpose(1, 2)  # [B, N, 16]
        x = torch.randn(d, generator=g) + 2 * z @ torch.randn(16, d, generator=g)
        x = x + torch.randn(b, n, d, generator=g)
        x[..., :2] *= 30  # massive activations
    return x.to(device)


def interval_targets(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets [B, T, D], others [B, N])``: one token of each interval of two, as interval selection at
    R=0.5 picks, and the non-target mask (the columns the batched compression matches).
    """
    g = torch.Generator().manual_seed(1)
    index = (2 * torch.arange(t) + torch.randint(0, 2, (x.shape[0], t), generator=g)).to(x.device)
    others = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, index, False)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2])), others


def ambiguous_share(x, targets, others, theta) -> dict[str, tuple[float, float, float, float]]:
    """Per bound: share of ambiguous non-target columns, its ``K / N``, share of ambiguous Turbo rows, ``K / N``."""
    a, b = similarity._normalize(targets), similarity._normalize(x)
    tmask = torch.ones(targets.shape[:2], dtype=torch.bool, device=x.device)
    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    n, d = x.shape[1], x.shape[2]
    out = {}
    for name, w in BOUNDS.items():
        delta = similarity.error_bound(d, w)
        cols = similarity._match_estimate(a, b, tmask, theta, others, delta)[2]
        rows = similarity._redundancy_estimate(b, mask, delta)[1]
        share = cols.sum() / others.sum(), cols.sum(1).max() / n, rows.float().mean(), rows.sum(1).max() / n
        out[name] = tuple(float(v) for v in share)
    return out


def run(kind: str, b: int, n: int, d: int, theta: float, repeats: int, device: str) -> None:
    """Time both precisions on one kind of data, check that they agree, print the ambiguous shares."""
    x = make_tokens(kind, b, n, d, device)
    targets, others = interval_targets(x, n // 2)
    tmask = torch.ones(targets.shape[:2], dtype=torch.bool, device=x.device)
    mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
    calls = {
        "target_match": partial(similarity.target_match, targets, x, tmask, theta, token_mask=others),
        "redundancy": partial(similarity.redundancy, x, mask),
    }
    for precision in ("float64", "refine"):
        times = [f"{name} {measure(partial(fn, precision=precision), warmup=1, repeats=repeats, device=device)}"
                 for name, fn in calls.items()]  # fmt: skip
        print(f"  {kind:8s} {precision:7s}  " + "   ".join(times))
    (want_best, want_pos), (got_best, got_pos) = (
        calls["target_match"](precision=p) for p in ("float64", "refine")
    )
    same = torch.equal(want_best[others], got_best[others]) and torch.equal(want_pos[others], got_pos[others])
    same &= torch.equal(calls["redundancy"](precision="float64"), calls["redundancy"](precision="refine"))
    print(f"  {kind:8s} refine decisions == float64: {same}")
    for name, (cols, k_cols, rows, k_rows) in ambiguous_share(x, targets, others, theta).items():
        print(
            f"  {kind:8s} bound {name:4s} (delta {similarity.error_bound(d, BOUNDS[name]):.2e}): "
            f"ambiguous columns {cols:.2%} (float64 share K/N {k_cols:.2%}), "
            f"Turbo rows {rows:.2%} (K/N {k_rows:.2%})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--theta", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(
        f"B={args.batch} N={args.tokens} T={args.tokens // 2} D={args.dim} theta={args.theta} device={args.device}"
    )
    with torch.no_grad():
        for kind in ("gaussian", "llm"):
            run(kind, args.batch, args.tokens, args.dim, args.theta, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
