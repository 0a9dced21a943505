"""Forward+backward time of the language model with Libra / FastV versus full tokens, next to the FLOPs model.

Times the decoder stack only (a ``LlamaModel`` fed ``inputs_embeds``: no vision tower, no LM head), which is
exactly what the paper's FLOPs formula counts, so ``efficiency = measured speed-up / FLOPs-ideal speed-up``
isolates the overhead of hybrid attention + merging + re-padding. The FLOPs-ideal schedule is the token count
each layer really computed on in the timed run (text tokens, compensation tokens and reserved compensation slots
included: ``libra_runtime(model).last_widths``).

    python -m libra_train.bench.llm_step                       # LLaVA-1.5-shaped, 8 layers, hidden 1024
    python -m libra_train.bench.llm_step --layers 8 --hidden 512 --intermediate 1376 --repeats 3

The full comparison (training step with optimizer, checkpointing, inference, memory, report files) is
``scripts/bench.py`` (libra_train.bench.cli); this module is the quick decoder-only forward+backward probe.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaModel

from libra_train.bench.compare import fastv_point, schedule_from_run
from libra_train.bench.timing import Timing, measure
from libra_train.flops import LLMShape, schedule_flops
from libra_train.flops import libra_points as quarter_points  # the end of each of the first three quarters
from libra_train.plugin import LibraConfig, apply_libra, libra_runtime, remove_libra, visual_span


@dataclass
class StepResult:
    method: str
    points: list[int]
    ratio: float
    tokens_per_stage: list[int]
    step: Timing
    flops_ratio: float  # FLOPs of the schedule / FLOPs of full tokens
    speedup: float = 1.0  # full step time / this step time
    ideal_speedup: float = 1.0  # 1 / flops_ratio
    efficiency: float = 1.0  # speedup / ideal_speedup


def build_model(layers: int, hidden: int, intermediate: int, heads: int, dtype: torch.dtype) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return LlamaModel._from_config(config, attn_implementation="sdpa", dtype=dtype).train()


def make_batch(batch: int, n_prefix: int, n_visual: int, n_text: int, hidden: int, dtype, device):
    """LLaVA layout: system prefix, image, instruction + answer; the query is the token before the answer."""
    length = n_prefix + n_visual + n_text
    embeds = torch.randn(batch, length, hidden, dtype=dtype, device=device)
    visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    visual[:, n_prefix : n_prefix + n_visual] = True
    query = torch.full((batch,), length - n_text // 2 - 1, device=device)  # answer = last half of the text
    return embeds, visual, query


def run(args: argparse.Namespace) -> list[StepResult]:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = build_model(args.layers, args.hidden, args.intermediate, args.heads, dtype).to(device)
    shape = LLMShape(args.layers, args.hidden, args.intermediate)
    embeds, visual, query = make_batch(
        args.batch, args.prefix, args.visual, args.text, args.hidden, dtype, device
    )
    methods = {
        "full": None,
        "fastv": LibraConfig(method="fastv", layers=[args.fastv_point], ratio=args.ratio),
        # FastV's pruning at Libra's points and ratio: the same targets per stage, so Libra's merge and
        # compensation token are the only difference (the equal-budget comparison).
        "fastv-q": LibraConfig(method="fastv", layers=quarter_points(args.layers), ratio=args.ratio),
        "libra": LibraConfig(method="libra", layers=quarter_points(args.layers), ratio=args.ratio),
    }
    results: list[StepResult] = []
    for name in args.methods.split(","):
        config = methods[name]
        if config is not None:
            apply_libra(model, config)

        def step():
            model.zero_grad(set_to_none=True)
            with visual_span(visual, query_index=query):
                hidden = model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            hidden.float().pow(2).mean().backward()

        timing = measure(step, warmup=args.warmup, repeats=args.repeats, device=device)
        if config is None:
            points, tokens = [], [embeds.shape[1]]
        else:
            points = config.layers
            tokens = list(libra_runtime(model).last_widths)  # the padded widths the layers computed on
            remove_libra(model)
        flops = schedule_flops(schedule_from_run(args.layers, points, tokens), shape)
        full = schedule_flops([embeds.shape[1]] * args.layers, shape)
        results.append(StepResult(name, points, args.ratio if config else 0.0, tokens, timing, flops / full))
    base = next((r.step.median for r in results if r.method == "full"), None)
    for r in results:
        if base is not None:
            r.speedup = base / r.step.median
            r.ideal_speedup = 1.0 / r.flops_ratio
            r.efficiency = r.speedup / r.ideal_speedup
    return results


def markdown(results: list[StepResult]) -> str:
    lines = [
        "| method | points | R | tokens per stage | fwd+bwd (median) | spread | FLOPs ratio | speed-up | ideal | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.points or '-'} | {r.ratio:g} | {'/'.join(map(str, r.tokens_per_stage))} "
            f"| {r.step.median * 1e3:.0f} ms | {r.step.spread:.1%} | {r.flops_ratio:.3f} | {r.speedup:.2f}x "
            f"| {r.ideal_speedup:.2f}x | {r.efficiency:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)  # 11008 / 4, LLaVA-1.5-7B's ratio
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=35)  # vicuna_v1 system prompt + "USER:"
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--text", type=int, default=93)  # instruction + answer: 35 + 576 + 93 = 704 tokens
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--fastv-point", type=int, help="FastV's point (default: bench.compare.fastv_point)")
    parser.add_argument("--methods", default="full,fastv,fastv-q,libra", help="from full,fastv,fastv-q,libra")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.fastv_point is None:
        args.fastv_point = fastv_point(args.layers)
    results = run(args)
    print(
        f"LLM part, {args.layers} layers, d={args.hidden}, m={args.intermediate}, batch {args.batch}, "
        f"{args.prefix}+{args.visual}+{args.text} tokens, {args.dtype} on {args.device}"
    )
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
