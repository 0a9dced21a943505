#!/usr/bin/env python
"""Export a training checkpoint as a standalone model directory that carries its merge config.

    python scripts/export.py --checkpoint outputs/demo/checkpoint-190 --out exports/demo
    python scripts/export.py --checkpoint outputs/lora/checkpoint-500 --out exports/lora --merge-lora

See ``libra_train.export`` for what the directory holds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="output_dir/checkpoint-N, or a transformers model dir"
    )
    parser.add_argument("--out", required=True, help="export directory (must not exist or be empty)")
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out once the export is done"
    )
    parser.add_argument("--libra-config", help="libra_config.json to record, for a checkpoint without one")
    parser.add_argument("--n-visual", type=int, help="visual tokens per image for the card's table")
    parser.add_argument("--dtype", help="cast the weights, e.g. bfloat16 (default: as consolidated, fp32)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from libra_train.export import export_checkpoint

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            merge_lora=args.merge_lora,
            overwrite=args.overwrite,
            libra_config=args.libra_config,
            n_visual=args.n_visual,
            dtype=args.dtype,
        )
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    for file in sorted(Path(out).iterdir()):
        print(f"  {file.name:32s} {file.stat().st_size / 1e6:10.3f} MB")
    card = (Path(out) / "README.md").read_text().splitlines()
    print("\n".join(card[card.index("## Visual tokens per layer") + 2 :]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
