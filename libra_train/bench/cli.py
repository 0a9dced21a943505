"""``python scripts/bench.py``: full tokens vs FastV vs Libra, training and inference, on one machine in one run.

    python scripts/bench.py --model tiny --repeats 1 --warmup 0                      # seconds (CI)
    python scripts/bench.py --model llava15-7b-cpu --ratios 0.5 --out outputs/bench/cpu  # minutes on a CPU
    python scripts/bench.py --model llava15-7b --device cuda --methods full,fastv,fastv-q,libra

Writes ``DIR/bench.md`` (also printed), ``DIR/bench.json`` (every field, see libra_train.bench.report.FIELDS)
and ``DIR/bench.png``. What is measured and how: libra_train.bench.compare. Only the language model is run
(the vision tower costs the same for every method).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

from libra_train.bench.compare import (
    METHODS,
    TRAIN_MODES,
    Options,
    add_relative_fields,
    measure_method,
    method_specs,
    run_meta,
)
from libra_train.bench.report import markdown, plot, write_json
from libra_train.bench.shapes import GPU_ONLY, SHAPES, build_llm, make_inputs


def _ratios(text: str) -> list[float]:
    """``0.5,0.67,0.8`` or fractions such as ``2/3``."""
    try:
        return [float(Fraction(part.strip())) for part in text.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers, got {text!r}") from None


def _names(choices: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what}: {bad or text!r} not in {', '.join(choices)}")
        return names

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="tiny", help="benchmark shape")
    p.add_argument(
        "--methods",
        type=_names(METHODS, "--methods"),
        default=["full", "fastv", "libra"],
        help=f"comma-separated, from {','.join(METHODS)} (default full,fastv,libra)",
    )
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=[0.5, 0.67, 0.8],
        help="fractions removed per point, one row per method and ratio (default 0.5,0.67,0.8)",
    )
    p.add_argument("--out", type=Path, help="output folder (default outputs/bench/<model>)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="discarded calls before each measurement")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--attn",
        default="auto",
        help="attention backend: auto (flash_attention_2 if installed on "
        "CUDA, else sdpa) | sdpa | eager | flash_attention_2",
    )
    p.add_argument("--layers", type=int, help="override the shape's number of layers")
    p.add_argument("--batch", type=int, help="override the shape's batch size")
    p.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="adamw (LLaVA's; 2 states per weight) or sgd (no state, for tight memory)",
    )
    p.add_argument(
        "--train-modes",
        type=_names(tuple(TRAIN_MODES), "--train-modes"),
        default=list(TRAIN_MODES),
        help="train (checkpointing off), train_ckpt (on), or both",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.model in GPU_ONLY and device.type != "cuda":
        print(f"error: {args.model} is a GPU shape (tens of GB); on CPU use llava15-7b-cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from libra_train.models import pick_attn_implementation

    shape = SHAPES[args.model].with_overrides(layers=args.layers, batch=args.batch)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    attn = pick_attn_implementation(args.attn)  # auto: flash_attention_2 on CUDA when installed, else sdpa
    try:
        specs = method_specs(args.methods, args.ratios, shape.num_layers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    opts = Options(device, args.warmup, args.repeats, args.optimizer, tuple(args.train_modes))
    out = args.out or Path("outputs") / "bench" / shape.name
    out.mkdir(parents=True, exist_ok=True)

    meta = run_meta(shape, opts, dtype, attn)
    model = build_llm(shape, dtype, device, attn)
    inputs = make_inputs(shape, dtype, device)
    rows = []
    for spec in specs:
        print(f"[bench] {spec.label} ...", file=sys.stderr, flush=True)
        rows.append(measure_method(model, spec, inputs, shape, opts))
    add_relative_fields(rows, opts)
    if hasattr(os, "getloadavg"):
        meta["load_after"] = list(os.getloadavg())

    text = markdown(meta, rows)
    print(text)
    (out / "bench.md").write_text(text)
    write_json(out / "bench.json", meta, rows)
    plot(out / "bench.png", meta, rows)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
