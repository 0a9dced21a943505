"""Analytic FLOPs of the LLM part of an LVLM for a token schedule (the paper's model).

Per decoder layer that sees ``n`` tokens (``d`` hidden size, ``m`` FFN intermediate size)::

    FLOPs(n) = 4*n*d^2 + 2*n^2*d + 3*n*d*m

References: FastV (Chen et al., 2024, arXiv:2403.06764, FLOPs estimation in the experiments)
counts ``4nd^2 + 2n^2d`` for attention (Q/K/V/O projections, scores and weighted sum) plus the
FFN; the Libra-Merging paper's Table 1 numbers are reproduced with ``3ndm`` for LLaMA's SwiGLU
FFN (gate, up and down projections), which is the term used here. One multiply-add counts as one
FLOP; norms, softmax, the LM head and the vision tower are not counted. The total is the sum over
layers with the count each layer sees (``token_schedule``).

CLI: ``python -m libra_train.flops --preset llava15-7b [--n-visual 576] [--n-text 0] [--all]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from libra_train.compress.schedule import token_schedule, visual_schedule

__all__ = [
    "PRESETS",
    "LLMShape",
    "Method",
    "flops_table",
    "layer_flops",
    "libra_points",
    "main",
    "paper_methods",
    "pdrop_method",
    "schedule_flops",
]


@dataclass(frozen=True)
class LLMShape:
    """Dimensions of a decoder-only LLM that enter the FLOPs model."""

    num_layers: int
    hidden: int
    intermediate: int


PRESETS: dict[str, LLMShape] = {
    "llava15-7b": LLMShape(32, 4096, 11008),  # Vicuna-7B
    "llava15-13b": LLMShape(40, 5120, 13824),  # Vicuna-13B
    "llava-next-8b": LLMShape(32, 4096, 14336),  # Llama-3-8B
}


def layer_flops(n: int, shape: LLMShape) -> int:
    """FLOPs of one decoder layer that sees ``n`` tokens: ``4nd^2 + 2n^2d + 3ndm``."""
    d, m = shape.hidden, shape.intermediate
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def schedule_flops(schedule: Sequence[int], shape: LLMShape) -> int:
    """FLOPs of the LLM for ``schedule[i]`` tokens at layer ``i`` (one entry per layer).

    Raises:
        ValueError: When the schedule does not have one entry per layer.
    """
    if len(schedule) != shape.num_layers:
        raise ValueError(f"schedule has {len(schedule)} entries for {shape.num_layers} layers")
    return sum(layer_flops(n, shape) for n in schedule)


def libra_points(num_layers: int) -> list[int]:
    """The paper's Libra points: the last layer of each of the first three quarters of depth.

    ``[7, 15, 23]`` for 32 layers, ``[9, 19, 29]`` for 40.
    """
    q = num_layers // 4
    return [q * k - 1 for k in (1, 2, 3)]


@dataclass(frozen=True)
class Method:
    """One row of the FLOPs table: compression points, one ratio for all (or PyramidDrop's kept fractions of the
    original count, ``keep_fractions``), compensation counted."""

    name: str
    points: tuple[int, ...] = ()
    ratio: float = 0.0
    compensation: bool = False
    keep_fractions: tuple[float, ...] | None = None

    def schedule(self, shape: LLMShape, n_visual: int, n_text: int = 0) -> list[int]:
        """Tokens seen by each layer of ``shape`` (see ``token_schedule``)."""
        return token_schedule(
            shape.num_layers,
            n_visual,
            self.points,
            self.ratio,
            n_text=n_text,
            compensation=self.compensation,
            keep_fractions=self.keep_fractions,
        )

    def visual_stages(self, n_visual: int) -> list[int]:
        """Visual tokens of each stage (see ``visual_schedule``)."""
        return visual_schedule(
            n_visual,
            [self.ratio] * len(self.points),
            compensation=self.compensation,
            keep_fractions=self.keep_fractions,
        )


def pdrop_method(num_layers: int) -> Method:
    """PyramidDrop as its scripts run it (``layer_list=[8, 16, 24]`` of 32 layers, i.e. points {7, 15, 23}, and
    ``image_token_ratio_list=[0.5, 0.25, 0.125]``: ``int(N0 * 0.5**k)`` of the original count at stage k), with
    the points scaled to the depth as Libra's are; its ranking's extra q/k projection of one layer per point is
    not counted (the paper's model counts decoder layers only)."""
    points = tuple(libra_points(num_layers))
    return Method("PDrop", points, 0.5, keep_fractions=tuple(0.5**k for k in range(1, len(points) + 1)))


def paper_methods(num_layers: int) -> list[Method]:
    """Rows of the paper's Table 1 (vanilla, FastV K=3 R=50%, Libra R=50/67/80%), plus Libra with
    its compensation tokens counted (one per point, the upper bound) and PyramidDrop (lambda 0.5).

    The paper's Table 1 does *not* count compensation tokens: with N=576 and no text, rounding to
    two decimals, counting them gives 1.79 / 1.42 instead of 1.78 / 1.41 (7B) and 3.49 / 2.76
    instead of 3.47 / 2.74 (13B). So the ``compensation=False`` rows are the paper's convention
    and the ``compensation=True`` rows are what running Libra costs at most.
    """
    rows = [Method("vanilla"), Method("FastV", (3,), 0.5)]
    for ratio in (0.5, 2 / 3, 0.8):
        for comp in (False, True):
            rows.append(Method("Libra", tuple(libra_points(num_layers)), ratio, comp))
    rows.append(pdrop_method(num_layers))
    return rows


def _ratio_str(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"  # 2/3 -> "67%"


def flops_table(shape: LLMShape, n_visual: int = 576, n_text: int = 0) -> str:
    """Markdown table of ``paper_methods`` for one LLM: tokens per stage, TFLOPs, ratio to vanilla."""
    lines = [
        "| method | points | ratio | comp. token | visual tokens per stage | TFLOPs | vs vanilla |",
        "|---|---|---|---|---|---|---|",
    ]
    vanilla = schedule_flops([n_visual + n_text] * shape.num_layers, shape)
    for m in paper_methods(shape.num_layers):
        flops = schedule_flops(m.schedule(shape, n_visual, n_text), shape)
        stages = m.visual_stages(n_visual)
        points = "{" + ",".join(map(str, m.points)) + "}" if m.points else "-"
        ratio = _ratio_str(m.ratio) if m.points else "-"
        if m.keep_fractions is not None:
            ratio = "λ=" + f"{m.ratio:g}"
        comp = ("counted" if m.compensation else "not counted") if m.name == "Libra" else "-"
        lines.append(
            f"| {m.name} | {points} | {ratio} | {comp} | {'/'.join(map(str, stages))} "
            f"| {flops / 1e12:.2f} | {flops / vanilla:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the FLOPs table for one preset (or all of them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava15-7b")
    parser.add_argument("--all", action="store_true", help="print a table for every preset")
    parser.add_argument("--n-visual", type=int, default=576, help="visual tokens entering the LLM")
    parser.add_argument("--n-text", type=int, default=0, help="text tokens, seen by every layer")
    args = parser.parse_args(argv)
    names = list(PRESETS) if args.all else [args.preset]
    for i, name in enumerate(names):
        shape = PRESETS[name]
        if i:
            print()
        print(
            f"### {name}: {shape.num_layers} layers, d={shape.hidden}, m={shape.intermediate}, "
            f"N={args.n_visual} visual + {args.n_text} text tokens"
        )
        print()
        print(flops_table(shape, args.n_visual, args.n_text))
    print()
    print(
        "comp. token: 'not counted' is the paper's Table 1 convention (it reproduces its numbers); "
        "'counted' adds one compensation token per point (carried to later layers), the most Libra adds."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
