"""What the plug-in costs a forward that it does not compress: disabled, or a text-only batch.

The tiny model's forward takes a millisecond or two, so a 0.05 ms overhead is a few percent of it: the two
models are timed in alternating rounds (plain, patched, plain, ...) so that drift of the machine hits both, and
each is summarised by its fastest round (the least disturbed one: on a shared machine the median mostly measures
the neighbours); the overhead is the difference of the two. Same weights, same inputs. The entry wrappers'
pass-through cost is also timed alone (calls of the wrappers around a forward that returns at once), which a
busy machine disturbs far less than a whole forward.

    python -m libra_train.bench.overhead                # the demo's tiny LLaVA (36 visual tokens), 1 thread
    python -m libra_train.bench.overhead --rounds 40 --calls 200
"""

from __future__ import annotations

import argparse
import copy
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
    """``(fastest plain seconds per forward, fastest patched - fastest plain)`` over alternating rounds."""
    with torch.no_grad():
        per_call_seconds(plain, inputs, calls)  # warm-up
        per_call_seconds(patched, inputs, calls)
        base, other = [], []
        for _ in range(rounds):
            base.append(per_call_seconds(plain, inputs, calls))
            other.append(per_call_seconds(patched, inputs, calls))
    return min(base), min(other) - min(base)


def entry_pass_through_seconds(patched, calls: int = 20000, rounds: int = 7) -> float:
    """Seconds per forward that the entry wrappers of ``patched`` add when they pass the call through: each
    wrapper of the entry path is called around a no-op forward, fastest of ``rounds``."""
    runtime = next(m._libra_runtime for m in patched.modules() if "_libra_runtime" in vars(m))
    entries = [module.forward for module, _ in runtime.entries]
    saved = [entry.__wrapped__ for entry in entries]
    try:
        for entry in entries:
            entry.__wrapped__ = lambda *args, **kwargs: None
        best = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                for entry in entries:
                    entry(input_ids=None, attention_mask=None)
            best.append((time.perf_counter() - start) / calls)
        return min(best)
    finally:
        for entry, forward in zip(entries, saved):
            entry.__wrapped__ = forward


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
    print("| case | plain forward (fastest round) | plug-in overhead per forward | entry wrappers alone |")
    print("|---|---|---|---|")
    for name, (config, inputs) in cases.items():
        patched = apply_libra(copy.deepcopy(plain), config)
        base, extra = overhead(plain, patched, inputs, args.rounds, args.calls)
        alone = entry_pass_through_seconds(patched) if not config.enabled else float("nan")
        print(f"| {name} | {base * 1e3:.3f} ms | {extra * 1e3:+.4f} ms | {alone * 1e3:.4f} ms |")


if __name__ == "__main__":
    main()
