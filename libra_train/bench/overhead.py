"""What the plug-in costs a forward that it does not compress: disabled, or a text-only batch.

The tiny model's forward takes a millisecond or two, so a 0.05 ms overhead is a few percent of it: the two
models are timed in alternating rounds (plain, patched, plain, ...) so that drift of the machine hits both, and
the overhead is the median over rounds of (patched - plain) per forward. Same weights, same inputs.

    python -m libra_train.bench.overhead                # the demo's tiny LLaVA (36 visual tokens), 1 thread
    python -m libra_train.bench.overhead --rounds 40 --calls 200
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig, apply_libra


def per_call_seconds(model, inputs: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(**inputs)
    return (time.perf_counter() - start) / calls


def overhead(plain, patched, inputs: dict, rounds: int, calls: int) -> tuple[float, float]:
    """``(median plain seconds per forward, median patched - plain seconds per forward)``."""
    with torch.no_grad():
        per_call_seconds(plain, inputs, calls)  # warm-up
        per_call_seconds(patched, inputs, calls)
        base, extra = [], []
        for _ in range(rounds):
            a = per_call_seconds(plain, inputs, calls)
            b = per_call_seconds(patched, inputs, calls)
            base.append(a)
            extra.append(b - a)
    return statistics.median(base), statistics.median(extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    plain, _ = build_tiny_llava()
    config = plain.config
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    ids = torch.randint(0, vocab, (2, n_visual + 24), generator=g)
    ids = torch.where(ids == config.image_token_id, (ids + 1) % vocab, ids)  # text: no image token
    image = ids.clone()
    image[:, 3 : 3 + n_visual] = config.image_token_id
    pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size, generator=g)
    cases = {
        "disabled (enabled=False), image batch": (
            LibraConfig(layers=[1], enabled=False),
            {"input_ids": image, "pixel_values": pixels},
        ),
        "enabled, text-only batch (nothing to compress)": (LibraConfig(layers=[1]), {"input_ids": ids}),
    }
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.calls} forwards"
    )
    print("| case | plain forward | plug-in overhead per forward |")
    print("|---|---|---|")
    for name, (config, inputs) in cases.items():
        patched = apply_libra(copy.deepcopy(plain), config)
        base, extra = overhead(plain, patched, inputs, args.rounds, args.calls)
        print(f"| {name} | {base * 1e3:.3f} ms | {extra * 1e3:+.4f} ms |")


if __name__ == "__main__":
    main()
