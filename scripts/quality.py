#!/usr/bin/env python
"""Accuracy at an equal token budget: full tokens vs FastV / fastv-q / Turbo / PyramidDrop / Libra (+ ablations),
training-free and compression-aware, over seeds, with error bars.

    python scripts/quality.py --lock /tmp/libra-bench.lock     # the full run: demo144, 3 seeds (hours on 2 cores)
    python scripts/quality.py --smoke --out /tmp/q --work /tmp/q/work   # CI: 1 seed, 3 steps, fastv + libra
    python scripts/quality.py --recipe llava15_full --lora-recipe llava15_libra_lora \\
        --set model.path=ckpt/llava-1.5-7b data.train=... --set-lora data.train=... \\
        --eval-data qa.jsonl --image-folder images --seeds 0 --out docs/results/quality/llava15

Resumable: every evaluated cell is written to ``<out>/cells/seed<S>/`` when it finishes and a rerun skips the
cells that are there with the same model, data and merge config; finished training runs in ``--work`` are
reused. A method the installed LibraConfig does not know yet (``pdrop``) is skipped with a note: rerun the same
command once it exists and only its cells are measured. Outputs: ``<out>/quality.md``, ``quality.json``,
``quality.png``. What is measured and how the intervals are computed: ``libra_train.bench.quality_run``,
``libra_train.bench.stats``, docs/benchmarks.md ("Quality at equal budget").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SMOKE_DATA = ["data.demo.n_train=48", "data.demo.n_val=16", "train.eval_steps=null", "train.save_steps=null"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv: list[str] | None):
    from libra_train.bench.quality import METHODS
    from libra_train.bench.quality_run import QualityOptions

    default = QualityOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=default.recipe, help="full-token recipe trained per seed")
    p.add_argument("--lora-recipe", default=default.lora_recipe, help="compression-aware LoRA recipe")
    p.add_argument("--seeds", type=_ints, default=default.seeds, help="comma-separated (default 0,1,2)")
    p.add_argument(
        "--methods", help=f"comma-separated, from {','.join(m.name for m in METHODS)} (default all)"
    )
    p.add_argument("--ratios", type=_floats, help="training-free ratios (default 0.5,0.67,0.8)")
    p.add_argument("--aware-ratio", type=float, default=default.aware_ratio, help="compression-aware ratio")
    p.add_argument("--no-aware", action="store_true", help="training-free cells only")
    p.add_argument("--aware-methods", help="methods to adapt compression-aware (default: every main method)")
    p.add_argument("--out", type=Path, help="cells + report (default docs/results/quality/<recipe>)")
    p.add_argument("--work", type=Path, help="training runs and exports (default outputs/quality/<recipe>)")
    p.add_argument("--eval-data", type=Path, help="held-out QA file (default: each seed's demo val.json)")
    p.add_argument("--image-folder", type=Path, help="images of --eval-data (default: images/ beside it)")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N questions only")
    p.add_argument("--max-steps", type=int, help="cap the full-token training runs")
    p.add_argument("--lora-max-steps", type=int, help="cap the LoRA adaptations")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="key=value for the full-token runs")
    p.add_argument("--set-lora", dest="lora_overrides", nargs="*", default=[], help="key=value for LoRA runs")
    p.add_argument("--lock", help="machine-wide lock held by each training run / evaluation (flock file)")
    p.add_argument("--batch-size", type=int, default=default.batch_size, help="questions per generate call")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the cells in --out")
    p.add_argument("--smoke", action="store_true",
                   help="CI: demo recipes, 1 seed, 3 steps, 16 questions, fastv + libra at R=0.5,0.8, only "
                        "libra (+ full tokens) adapted")  # fmt: skip
    args = p.parse_args(argv)
    if args.smoke:
        args.recipe, args.lora_recipe, args.seeds = "demo_full", "demo_libra_lora", [0]
        args.methods, args.ratios = args.methods or "fastv,libra", args.ratios or [0.5, 0.8]
        args.aware_methods = args.aware_methods or "libra"
        args.max_steps = args.lora_max_steps = 3
        args.eval_limit = 16
        args.overrides = [*SMOKE_DATA, *args.overrides]
        args.lora_overrides = [*SMOKE_DATA, *args.lora_overrides]
    name = args.recipe.removesuffix("_full")
    return QualityOptions(
        recipe=args.recipe,
        lora_recipe=args.lora_recipe,
        seeds=args.seeds,
        methods=args.methods.split(",") if args.methods else default.methods,
        ratios=args.ratios or default.ratios,
        aware_ratio=args.aware_ratio,
        aware=not args.no_aware,
        aware_methods=args.aware_methods.split(",") if args.aware_methods else None,
        out=args.out or Path("docs/results/quality") / (name + ("-smoke" if args.smoke else "")),
        work=args.work or Path("outputs/quality") / (name + ("-smoke" if args.smoke else "")),
        eval_data=args.eval_data,
        image_folder=args.image_folder,
        eval_limit=args.eval_limit,
        max_steps=args.max_steps,
        lora_max_steps=args.lora_max_steps,
        overrides=args.overrides,
        lora_overrides=args.lora_overrides,
        lock=args.lock,
        batch_size=args.batch_size,
        report_only=args.report_only,
    )


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported; the training subprocesses inherit them. One intra-op thread: the tiny models run
    # fastest so, and a second thread waiting for a core of a shared machine stalls every step (README).
    for key, value in (
        ("WANDB_MODE", "offline"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("OMP_NUM_THREADS", "1"),
    ):
        os.environ.setdefault(key, value)
    try:
        opts = parse(argv)
        from libra_train.bench.quality_run import run

        report = run(opts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print((opts.out / "quality.md").read_text())
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
