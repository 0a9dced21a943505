#!/usr/bin/env python
"""Generate answers from an exported model, with the compression it was trained with.

    python scripts/generate.py exports/demo --image a.png --prompt "what shape is at row 1 column 2 ?"
    python scripts/generate.py DIR --image a.png --image b.png --prompt "how many red shapes are there ?"
    python scripts/generate.py exports/demo --image a.png --prompt "..." --sample --temperature 0.7 --seed 1
    python scripts/generate.py exports/demo --image a.png --prompt "..." --libra ratio=0.8   # or: --libra off

Several images and prompts run as one left-padded batch (greedy or sampled, KV cache on): one prompt is asked
about every image, one image gets every prompt, or N images pair with N prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def pair(images: list[str], prompts: list[str]) -> list[tuple[str | None, str]]:
    """Broadcast one image over the prompts or one prompt over the images; else pair them in order."""
    if not images:
        return [(None, p) for p in prompts]
    if len(prompts) == 1:
        return [(image, prompts[0]) for image in images]
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    if len(images) != len(prompts):
        raise ValueError(
            f"{len(images)} images and {len(prompts)} prompts: give one of either, or as many of each"
        )
    return list(zip(images, prompts))


def main(argv: Sequence[str] | None = None) -> int:
    from libra_train.inference.cli import add_model_arguments, load_from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for a batch)")
    parser.add_argument("--prompt", action="append", required=True, help="question (repeat for a batch)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (for --sample)")
    args = parser.parse_args(argv)

    import torch

    from libra_train.data.records import DataError
    from libra_train.infer import Query, generate

    try:
        pairs = pair(args.image, args.prompt)
        model, processor, template = load_from_args(args)
        torch.manual_seed(args.seed)
        outputs = generate(
            model,
            processor,
            [Query.single(prompt, image) for image, prompt in pairs],
            template=template,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_p=args.top_p,
        )
    except (FileNotFoundError, ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, ((image, prompt), out) in enumerate(zip(pairs, outputs), 1):
        tokens = " -> ".join(map(str, out.visual_tokens)) or "none (text only)"
        print(f"[{i}] image: {image or '-'}\n    prompt: {prompt}\n    answer: {out.text}")
        print(f"    visual tokens per stage: {tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
