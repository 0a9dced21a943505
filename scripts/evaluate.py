#!/usr/bin/env python
"""Short-answer accuracy, latency and peak memory of an export, optionally beside the model uncompressed.

    python scripts/evaluate.py exports/demo --data demo_data/val.json --image-folder demo_data/images
    python scripts/evaluate.py exports/demo --data qa.jsonl --compare full --batch-size 16 --limit 100

``--data``: LLaVA / HF-messages conversations (every answer is one question) or JSON lines of
``{"question", "answer", "image"}``. Answers are matched with ``libra_train.infer.is_correct``, built on the
training loop's ``normalize_answer`` (first word, lower case, no punctuation), and multi-turn samples are
scored on their first answer as there (``--all-turns``: every answer).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def describe(cfg) -> str:
    """The table row name of a merge config."""
    if not cfg.enabled:
        return "export config (compression disabled)"
    return f"{cfg.method} points {cfg.layers} ratio {cfg.ratio}"


def main(argv: Sequence[str] | None = None) -> int:
    from libra_train.inference.cli import add_model_arguments, load_from_args
    from libra_train.training.evaluate import MAX_NEW_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, max_new_tokens=MAX_NEW_TOKENS)
    parser.add_argument("--data", required=True, help="QA file (.json or .jsonl)")
    parser.add_argument(
        "--image-folder", help="folder the image paths are relative to (default: the data file's)"
    )
    parser.add_argument(
        "--compare", choices=("full",), help="also evaluate the same model without compression"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--all-turns", action="store_true", help="score every answer of multi-turn samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from libra_train.data.records import DataError
    from libra_train.infer import evaluate, format_table, load_qa
    from libra_train.inference.generation import find_runtime
    from libra_train.plugin import remove_libra

    image_folder = args.image_folder or str(Path(args.data).parent)
    try:
        examples = load_qa(args.data, limit=args.limit, all_turns=args.all_turns)
        model, processor, template = load_from_args(args)
        runtime = find_runtime(model)
        options = dict(
            template=template,
            image_folder=image_folder,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
        )
        label = "compression off" if runtime is None else describe(runtime.config)
        results = [evaluate(model, processor, examples, label=label, **options)]
        if args.compare == "full" and runtime is not None:
            remove_libra(model)  # the same weights, all visual tokens
            results.append(
                evaluate(model, processor, examples, label="full (same model, no compression)", **options)
            )
    except (FileNotFoundError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{args.export} on {args.data}: {len(examples)} questions, template {template}\n")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
