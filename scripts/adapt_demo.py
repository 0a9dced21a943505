#!/usr/bin/env python
"""Compression-aware adaptation on the CPU demo: does LoRA recover what a strong budget costs training-free?

    python scripts/adapt_demo.py                         # the whole experiment (demo recipes, R=0.8)
    python scripts/adapt_demo.py --max-steps 5 --eval-limit 32 --work /tmp/adapt   # a smoke run
    python scripts/adapt_demo.py --reuse                 # keep the checkpoints/exports already in --work

Steps (each a documented entry point; nothing here touches the model's internals):

1. ``train.py recipe=demo_full``: the tiny LLaVA learns the demo task with all its visual tokens; exported with
   ``libra_train.export.export_checkpoint`` (a plain transformers directory).
2. Training-free: the export loaded with Libra at ``--ratio`` (``libra_train.infer.load(export,
   libra={"enabled": True, "ratio": R})``, the demo's point, layer 1) and evaluated; also with full tokens.
3. ``train.py recipe=demo_libra_lora model.path=<export> libra.ratio=R``: LoRA adapters on the LLM (+ the
   projector) trained *from the step-1 weights* with Libra active, on the same (regenerated) data; the vision
   tower frozen, as in ``llava15_libra_lora``. Its full-token twin (``recipe=demo_full_lora``) is trained too,
   for the throughput and accuracy comparison.
4. The adapted checkpoint exported (LoRA merged) and evaluated with the compression it was trained with.

Accuracy is short-answer generation accuracy on the demo's held-out set (``libra_train.infer.evaluate``, the
matching the training loop uses; uniform guessing scores 24.3%, the most frequent answer per question type
41.0%). Throughput is what ``train.py`` reports: input tokens (before compression) per second of training
steps, evaluation excluded. One process, one machine; the numbers of a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from libra_train.bench.runs import evaluate_export, export_run, train_run


def train(overrides: list[str], log: Path, reuse: bool, out_dir: Path) -> dict:
    """``train.py`` in a subprocess (`libra_train.bench.runs.train_run`); steps, seconds, tokens/s."""
    return train_run(overrides, out_dir, log, reuse=reuse, tag="adapt")


def accuracy(export_dir: Path, data: Path, libra, limit: int | None, label: str) -> dict:
    """Generation accuracy of ``export_dir`` on ``data`` with the merge config ``libra`` (see infer.load)."""
    result = evaluate_export(export_dir, data, libra, limit=limit, label=label)
    print(f"[adapt] {label}: {result.accuracy:.1%} ({result.correct}/{result.total})", flush=True)
    return {"label": label, "accuracy": result.accuracy, "correct": result.correct, "total": result.total,
            "visual_tokens": result.visual_tokens}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("outputs/adapt_demo"), help="runs and exports go here")
    p.add_argument("--ratio", type=float, default=0.8, help="Libra's budget: fraction removed at layer 1")
    p.add_argument("--lora-epochs", type=float, help="epochs of the LoRA adaptation (default: the recipe's)")
    p.add_argument("--lora-lr", type=float, help="LoRA (and projector) learning rate (default: the recipe's)")
    p.add_argument("--lora-r", type=int, help="LoRA rank, alpha = 2r (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="cap every training run (smoke runs)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out questions only")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs/exports found in --work")
    args = p.parse_args(argv)
    work = args.work.resolve()
    cap = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    quiet = ["logging.progress=false", "logging.wandb=false"]

    # 1. full-token training from scratch
    full = train(["recipe=demo_full", *quiet, *cap], work / "logs/full.log", args.reuse, work / "full")
    data = work / "full" / "demo_data"
    full_export = export_run(work / "full", work / "exports/full", args.reuse)

    # 2. training-free: the full-token model with and without Libra at the budget
    libra = {"enabled": True, "method": "libra", "ratio": args.ratio}
    results = [
        accuracy(full_export, data / "val.json", "off", args.eval_limit, "full-token model, full tokens"),
        accuracy(full_export, data / "val.json", libra, args.eval_limit,
                 f"full-token model, Libra R={args.ratio:g} (training-free)"),
    ]  # fmt: skip

    # 3. LoRA adaptation from the full-token weights, with Libra at the budget and (twin) with full tokens
    lora = [f"model.path={full_export}", f"libra.ratio={args.ratio}", *quiet, *cap]
    if args.lora_r:
        lora += [f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}"]
    if args.lora_epochs:
        lora.append(f"train.epochs={args.lora_epochs}")
    if args.lora_lr:
        lora.append(f"train.lr={args.lora_lr}")
    adapted = train(
        ["recipe=demo_libra_lora", *lora], work / "logs/lora_libra.log", args.reuse, work / "lora_libra"
    )
    twin = train(
        ["recipe=demo_full_lora", *lora], work / "logs/lora_full.log", args.reuse, work / "lora_full"
    )

    # 4. the adapted model with the compression it was trained with
    adapted_export = export_run(work / "lora_libra", work / "exports/lora_libra", args.reuse)
    results.append(
        accuracy(adapted_export, data / "val.json", None, args.eval_limit,
                 f"LoRA-adapted with Libra R={args.ratio:g}, Libra R={args.ratio:g}")
    )  # fmt: skip
    twin_export = export_run(work / "lora_full", work / "exports/lora_full", args.reuse)
    results.append(
        accuracy(twin_export, data / "val.json", "off", args.eval_limit, "LoRA-adapted with full tokens, full tokens")
    )  # fmt: skip

    runs = {"full": full, "lora_libra": adapted, "lora_full": twin}
    (work / "adapt_results.json").write_text(
        json.dumps({"accuracy": results, "training": runs}, indent=2) + "\n"
    )
    print()
    print("| model / evaluation | accuracy |")
    print("|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['accuracy']:.1%} ({r['correct']}/{r['total']}) |")
    print()
    print("| training run | steps | train s | tokens/s |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['steps']} | {r['train_seconds']} | {r['tokens_per_s']} |")
    if adapted["tokens_per_s"] and twin["tokens_per_s"]:
        print(f"\nLoRA throughput, Libra R={args.ratio:g} vs full tokens: "
              f"{adapted['tokens_per_s'] / twin['tokens_per_s']:.2f}x")  # fmt: skip
    print(f"results: {work / 'adapt_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
