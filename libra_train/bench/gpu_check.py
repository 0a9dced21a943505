"""One command for a CUDA machine: the plug-in on the real kernels, its host syncs, and the LLaVA-7B benchmark.

    bash scripts/gpu_check.sh                                  # everything, under 10 minutes on one H100/H200
    python -m libra_train.bench.gpu_check --skip-bench         # the checks alone (about a minute)

What it does (CI never runs it; the CPU suite covers the same paths with a stand-in for the flash kernels):

1. Environment: torch, CUDA device, transformers, flash-attn (or why it is not there).
2. Equivalence on CUDA, for each dtype (float32, bfloat16) and backend (eager, sdpa, flash_attention_2;
   flash-attn's kernels take fp16/bf16 only), on the demo's tiny LLaVA widened to 8 layers: the unmodified
   model against eager; Libra {1, 3, 5} and FastV {2} against eager in the same dtype (position maps agree,
   logits, loss and gradients close), the hybrid importance against the eager attention row, and greedy
   generation with left padding (identical ids). float32 must agree exactly in its decisions; bfloat16 is
   reported (different kernels round differently, which can move an importance tie).
3. Host syncs on CUDA (``torch.cuda.set_sync_debug_mode``, counted per warning) and with the CPU-side
   ``SyncCounter``, for a training forward, its backward and a decode step, with and without the plug-in.
4. ``scripts/bench.py --model llava15-7b --device cuda`` for full, fastv-q and libra at R = 0.5 and 0.8 with
   gradient checkpointing (training step, prefill, decode, memory), files into ``OUT/bench``.

Everything is written to ``OUT`` (default ``docs/results/gpu-<device name>``): ``checks.md``, ``checks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from libra_train.bench.syncs import SyncCounter
from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig, apply_libra, libra_runtime

CONFIGS = {
    "libra": LibraConfig(layers=[1, 3, 5], ratio=0.5),
    "fastv": LibraConfig(method="fastv", layers=[2], ratio=0.5),
}


def environment() -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        info["flash_attn"] = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        info["flash_attn"] = None
    return info


def _model(attn: str, dtype: torch.dtype, device: torch.device):
    model, _ = build_tiny_llava(text_layers=8, text_hidden=256, intermediate=512, heads=8, kv_heads=4, seed=0)
    model = model.to(device, dtype)
    decoder = model.model.language_model
    for config in {id(m.config): m.config for m in decoder.modules() if hasattr(m, "config")}.values():
        config._attn_implementation = attn
    return model


def _batch(model, device: torch.device, side: str = "left", labels: bool = True) -> dict[str, torch.Tensor]:
    """Two image samples of different lengths and a text-only one, padded on ``side``."""
    config = model.config
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    vocab, image, pad = config.text_config.vocab_size, config.image_token_id, config.text_config.pad_token_id
    g = torch.Generator().manual_seed(0)
    rows, answers = [], []
    for prefix, suffix, has_image in ((3, 12, True), (4, 9, False), (2, 7, True)):
        ids = torch.randint(0, vocab, (prefix + n_visual * has_image + suffix,), generator=g)
        ids = torch.where((ids == image) | (ids == pad), (ids + 2) % vocab, ids)
        if has_image:
            ids[prefix : prefix + n_visual] = image
        rows.append(ids)
        answers.append(len(ids) - 4)
    length = max(len(r) for r in rows)
    input_ids = torch.full((3, length), pad)
    mask = torch.zeros(3, length, dtype=torch.long)
    label = torch.full((3, length), -100)
    for b, (ids, start) in enumerate(zip(rows, answers)):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[b, where], mask[b, where] = ids, 1
        label[b, where][start:] = ids[start:]
    size = config.vision_config.image_size
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(2, 3, size, size, generator=g),
    }
    if labels:
        batch["labels"] = label
    return {k: v.to(device) for k, v in batch.items()}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def equivalence(dtype: torch.dtype, attn: str, device: torch.device) -> list[dict[str, Any]]:
    """Rows: the unmodified model and each method, ``attn`` against eager in ``dtype``."""
    rows = []
    reference, model = _model("eager", dtype, device), _model(attn, dtype, device)
    with torch.no_grad():
        batch = _batch(model, device, labels=False)
        real = batch["attention_mask"].bool()
        diff = (model(**batch).logits - reference(**batch).logits)[real].abs().max().item()
    rows.append({"dtype": str(dtype), "attn": attn, "method": "off", "max_logit_diff": diff})
    for name, config in CONFIGS.items():
        ref = apply_libra(copy.deepcopy(reference), config)
        got = apply_libra(copy.deepcopy(model), config)
        batch = _batch(model, device)
        out_ref, out = ref(**batch), got(**batch)
        maps_equal = torch.equal(out.libra_position_map, out_ref.libra_position_map)
        row = {"dtype": str(dtype), "attn": attn, "method": name, "position_maps_equal": maps_equal}
        if maps_equal:
            real = out.libra_attention_mask
            row["max_logit_diff"] = (out.logits - out_ref.logits)[real].abs().max().item()
        row["loss_diff"] = abs(out.loss.item() - out_ref.loss.item())
        out.loss.backward()
        out_ref.loss.backward()
        g, g_ref = _grads(got), _grads(ref)  # one relative norm over all gradients (some are ~0 by symmetry)
        diff = sum(((g[k] - g_ref[k]) ** 2).sum() for k in g_ref) ** 0.5
        row["rel_grad_diff"] = (diff / sum((v**2).sum() for v in g_ref.values()) ** 0.5).item()
        with torch.no_grad():
            prompt = _batch(model, device, labels=False)
            kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
            row["generation_equal"] = torch.equal(
                got.generate(**prompt, **kwargs), ref.generate(**prompt, **kwargs)
            )
        row["visual_tokens"] = [t.tolist() for t in libra_runtime(got).last_visual_tokens or []]
        rows.append(row)
    return rows


def importance_row(dtype: torch.dtype, attn: str, device: torch.device) -> dict[str, Any]:
    """The hybrid importance at the first point against the eager attention probabilities of that layer."""
    from libra_train.plugin.state import ForwardState

    point = 1
    model = apply_libra(_model(attn, dtype, device), LibraConfig(layers=[point], ratio=0.5))
    eager = _model("eager", dtype, device)
    batch = _batch(model, device, labels=False)
    recorded: dict[str, torch.Tensor] = {}
    original = ForwardState.record_importance

    def record(self, layer_idx, query, key, scaling):
        original(self, layer_idx, query, key, scaling)
        recorded["alpha"], recorded["query"] = self.importance[layer_idx], self.query_index

    ForwardState.record_importance = record
    try:
        with torch.no_grad():
            model(**batch)
            attn_rows = eager(**batch, output_attentions=True).attentions[point]  # [B, H, L, L]
    finally:
        ForwardState.record_importance = original
    query = recorded["query"][:, 0]  # inference: one query, the last real token
    rows = attn_rows.float().mean(1)[torch.arange(len(query), device=device), query]  # [B, L]
    return {
        "dtype": str(dtype),
        "attn": attn,
        "max_alpha_diff": (recorded["alpha"] - rows).abs().max().item(),
    }


@contextlib.contextmanager
def cuda_syncs():
    """Count CUDA synchronisations (``torch.cuda.set_sync_debug_mode("warn")`` warnings) inside the block."""
    box = {"count": 0}
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    box["count"] = sum("synchroniz" in str(w.message) for w in caught)


def sync_rows(attn: str, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for label, config in (("unmodified", None), ("libra", CONFIGS["libra"])):
        model = _model(attn, torch.bfloat16, device).train()
        if config is not None:
            apply_libra(model, config)
        batch = _batch(model, device)
        model(**batch).loss.backward()  # warm-up: lazy initialisation is not the steady state
        with cuda_syncs() as fwd, SyncCounter() as counted:
            out = model(**batch)
        with cuda_syncs() as bwd:
            out.loss.backward()
        model.eval()
        prompt = _batch(model, device, labels=False)
        with torch.no_grad():
            first = model(**prompt, use_cache=True)
            step = {
                "input_ids": first.logits[:, -1].argmax(-1, keepdim=True),
                "attention_mask": torch.cat([prompt["attention_mask"], prompt["attention_mask"][:, -1:]], 1),
                "past_key_values": first.past_key_values,
                "use_cache": True,
            }
            with cuda_syncs() as decode:
                model(**step)
        rows.append(
            {"attn": attn, "model": label, "forward": fwd["count"], "forward_counted": counted.total,
             "backward": bwd["count"], "decode_step": decode["count"]}
        )  # fmt: skip
    return rows


def markdown(env: dict, equal: list[dict], alphas: list[dict], syncs: list[dict]) -> str:
    def table(rows: list[dict]) -> list[str]:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    parts = [
        "# GPU check",
        "",
        f"Environment: `{json.dumps(env)}`",
        "",
        "## Equivalence against eager (same dtype)",
        "",
    ]
    parts += table(equal) + ["", "## Hybrid importance against the eager attention row", ""] + table(alphas)
    parts += ["", "## Host synchronisations (CUDA sync debug mode; `forward_counted`: SyncCounter)", ""]
    return "\n".join(parts + table(syncs)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default docs/results/gpu-<device>)")
    parser.add_argument("--skip-bench", action="store_true", help="only the checks, not the 7B benchmark")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA device (the CPU suite covers the same paths)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = environment()
    name = re.sub(r"[^a-z0-9]+", "-", env["cuda"].lower()).strip("-")
    out = args.out or Path("docs/results") / f"gpu-{name}"
    out.mkdir(parents=True, exist_ok=True)
    backends = ["sdpa"] + (["flash_attention_2"] if env["flash_attn"] else [])
    if not env["flash_attn"]:
        print(
            "note: flash-attn is not installed: flash_attention_2 is skipped (scripts/gpu_check.sh)",
            file=sys.stderr,
        )
    equal, alphas = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for attn in backends:
            if attn.startswith("flash") and dtype == torch.float32:
                continue  # the kernels take fp16/bf16 only
            equal += equivalence(dtype, attn, device)
            alphas.append(importance_row(dtype, attn, device))
    syncs = [row for attn in backends for row in sync_rows(attn, device)]
    text = markdown(env, equal, alphas, syncs)
    print(text)
    (out / "checks.md").write_text(text)
    (out / "checks.json").write_text(
        json.dumps({"env": env, "equivalence": equal, "importance": alphas, "syncs": syncs}, indent=2)
    )
    failed = [
        r
        for r in equal
        if r["dtype"] == "torch.float32" and r["method"] != "off" and not r["position_maps_equal"]
    ]
    if not args.skip_bench:
        from libra_train.bench.cli import main as bench

        attn = "flash_attention_2" if env["flash_attn"] else "sdpa"
        bench(
            ["--model", "llava15-7b", "--device", "cuda", "--methods", "full,fastv-q,libra", "--ratios", "0.5,0.8",
             "--train-modes", "train_ckpt", "--attn", attn, "--out", str(out / "bench")]
        )  # fmt: skip
    if failed:
        print(f"FAILED: float32 decisions differ from eager in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
