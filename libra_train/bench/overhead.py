"""What the plug-in costs a forward that it does not compress: disabled, or a text-only batch.

Two measurements, because a whole forward of the tiny model (a few ms) varies by more than the overhead on a
shared machine:

* **Pieces alone** (the precise number): every piece of Python the plug-in puts on a disabled forward's path,
  timed around a forward / kernel that returns at once: the entry wrappers, the hybrid-attention wrapper of
  each layer (which only forwards to the real backend when nothing is recorded) and the forward pre-hook of each
  layer after the first point (the hook itself plus ``nn.Module``'s hook dispatch). Their sum is what the
  plug-in adds; the real kernels are the same calls either way.
* **Whole forward**: the same model instance with the plug-in applied and removed in alternating rounds (a
  ``copy.deepcopy`` of the model lays its weights out elsewhere in memory, which alone moved the time by ~1 ms
  here), each summarised by its fastest round; the same alternation of the unpatched model against itself
  gives the noise floor that the difference must be read against.

    python -m libra_train.bench.overhead                # the demo's tiny LLaVA (36 visual tokens), 1 thread
    python -m libra_train.bench.overhead --rounds 40 --calls 200
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig, apply_libra, remove_libra


def per_call_seconds(model, inputs: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(**inputs)
    return (time.perf_counter() - start) / calls


def fastest(fn: Callable[[], None], calls: int, rounds: int) -> float:
    """Fastest of ``rounds`` of ``calls`` calls of ``fn``, seconds per call."""
    best = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - start) / calls)
    return min(best)


def whole_forward(
    model, config: LibraConfig, inputs: dict, rounds: int, calls: int
) -> tuple[float, float, float]:
    """``(fastest plain s/forward, patched - plain, plain - plain)`` over alternating rounds on one instance."""
    plain, patched, again = [], [], []
    with torch.no_grad():
        per_call_seconds(model, inputs, calls)  # warm-up
        for _ in range(rounds):
            plain.append(per_call_seconds(model, inputs, calls))
            apply_libra(model, config)
            patched.append(per_call_seconds(model, inputs, calls))
            remove_libra(model)
            again.append(per_call_seconds(model, inputs, calls))
    return min(plain), min(patched) - min(plain), min(again) - min(plain)


def entry_seconds(runtime, calls: int, rounds: int) -> float:
    """Seconds per forward that the entry wrappers add when they pass the call through (each wrapper of the
    entry path called around a no-op forward)."""
    entries = [module.forward for module, _ in runtime.entries]
    saved = [entry.__wrapped__ for entry in entries]
    try:
        for entry in entries:
            entry.__wrapped__ = lambda *args, **kwargs: None

        def call() -> None:
            for entry in entries:
                entry(input_ids=None, attention_mask=None)

        return fastest(call, calls, rounds)
    finally:
        for entry, forward in zip(entries, saved):
            entry.__wrapped__ = forward


def attention_wrapper_seconds(runtime, calls: int, rounds: int) -> float:
    """Seconds per forward that the hybrid-attention wrappers add: each layer's ``libra_<backend>`` called around
    a backend that returns at once, minus that backend called directly."""
    layers = runtime.layers
    name = layers[0].self_attn.config._attn_implementation  # libra_<backend>
    backend = runtime._original_attn[id(layers[0].self_attn.config)] or "eager"
    if backend == "eager":
        return float("nan")  # eager is looked up in the modeling file, not the registry
    wrapper, saved = ALL_ATTENTION_FUNCTIONS[name], ALL_ATTENTION_FUNCTIONS[backend]
    q = k = v = torch.zeros(1, 1, 1, 1)

    def noop(*args, **kwargs):
        return None

    ALL_ATTENTION_FUNCTIONS.register(backend, noop)
    try:
        modules = [layer.self_attn for layer in layers]
        wrapped = fastest(lambda: [wrapper(m, q, k, v, None, dropout=0.0) for m in modules], calls, rounds)
        direct = fastest(lambda: [noop(m, q, k, v, None, dropout=0.0) for m in modules], calls, rounds)
    finally:
        ALL_ATTENTION_FUNCTIONS.register(backend, saved)
    return wrapped - direct


class _Noop(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


def layer_hook_seconds(runtime, calls: int, rounds: int) -> float:
    """Seconds per forward that the layers' forward pre-hooks add: a no-op module carrying each hooked layer's
    hook, called as the decoder calls its layers, minus the same module without hooks."""
    hooked = range(min(runtime.points) + 1, len(runtime.layers))
    plain, with_hooks = _Noop(), [_Noop() for _ in hooked]
    for module, idx in zip(with_hooks, hooked):
        module.register_forward_pre_hook(functools.partial(runtime._layer_pre_hook, idx), with_kwargs=True)
    x = torch.zeros(1)
    kwargs = {
        "attention_mask": None,
        "position_ids": None,
        "past_key_values": None,
        "position_embeddings": None,
    }
    hooks = fastest(lambda: [m(x, **kwargs) for m in with_hooks], calls, rounds)
    bare = fastest(lambda: [plain(x, **kwargs) for _ in with_hooks], calls, rounds)
    return hooks - bare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, _ = build_tiny_llava()
    config = model.config
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    ids = torch.randint(0, vocab, (2, n_visual + 24), generator=g)
    ids = torch.where(ids == config.image_token_id, (ids + 1) % vocab, ids)  # text: no image token
    image = ids.clone()
    image[:, 3 : 3 + n_visual] = config.image_token_id
    pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size, generator=g)
    disabled = LibraConfig(layers=[1], enabled=False)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {_loadavg()}")

    runtime = apply_libra(model, disabled)._libra_runtime
    pieces = {
        "entry wrappers": entry_seconds(runtime, 20000, 7),
        "attention wrappers": attention_wrapper_seconds(runtime, 20000, 7),
        "layer pre-hooks": layer_hook_seconds(runtime, 20000, 7),
    }
    remove_libra(model)
    n_layers, n_hooked = len(runtime.layers), len(runtime.layers) - min(runtime.points) - 1
    print(f"\nPieces alone, compression disabled ({n_layers} layers, {n_hooked} hooked), per forward:")
    print("| piece | overhead per forward |")
    print("|---|---|")
    for name, seconds in pieces.items():
        print(f"| {name} | {seconds * 1e3:.4f} ms |")
    print(f"| **sum** | **{sum(pieces.values()) * 1e3:.4f} ms** |")

    cases = {
        "disabled (enabled=False), image batch": (disabled, {"input_ids": image, "pixel_values": pixels}),
        "enabled, text-only batch (nothing to compress)": (LibraConfig(layers=[1]), {"input_ids": ids}),
    }
    print(f"\nWhole forward, {args.rounds} alternating rounds x {args.calls} forwards, fastest round:")
    print("| case | plain forward | plug-in overhead | noise floor (plain vs plain) |")
    print("|---|---|---|---|")
    for name, (libra, inputs) in cases.items():
        base, extra, noise = whole_forward(model, libra, inputs, args.rounds, args.calls)
        print(f"| {name} | {base * 1e3:.3f} ms | {extra * 1e3:+.4f} ms | {noise * 1e3:+.4f} ms |")


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
