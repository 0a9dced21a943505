"""The benchmark's outputs: ``bench.md`` (Markdown tables), ``bench.json`` (every field), ``bench.png`` (plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Every field of a result row in bench.json (the ``train_ckpt_*`` fields repeat the ``train_*`` ones with
# gradient checkpointing on). Times are milliseconds; ``*_ms`` is the median of the repeats.
FIELDS: dict[str, str] = {
    "method": "full | fastv | fastv-q | libra",
    "label": "method and ratio, e.g. 'libra R=0.5'",
    "ratio": "fraction of the visual tokens removed at each point (0 for full)",
    "points": "compression points (layer l: layers 0..l see the full sequence)",
    "select": "target selection of the plug-in (interval | topk), null for full",
    "merge": "merge of the plug-in (igm | prune), null for full",
    "visual_tokens_per_stage": "training forward: visual tokens (merged + compensation) entering each stage",
    "tokens_per_stage": "training forward: all tokens each stage's layers see (batch max)",
    "schedule": "training forward: tokens seen by each layer (from tokens_per_stage and points)",
    "flops": "libra_train.flops.schedule_flops(schedule) per sample (decoder layers, forward)",
    "flops_full": "the same for the uncompressed training sequence",
    "flops_ratio": "flops / flops_full",
    "ideal_speedup": "1 / flops_ratio: the FLOPs-ideal training speed-up",
    "prefill_visual_tokens_per_stage": "prefill: visual tokens entering each stage",
    "prefill_tokens_per_stage": "prefill: all tokens each stage's layers see",
    "prefill_schedule": "prefill: tokens seen by each layer",
    "prefill_flops": "schedule_flops(prefill_schedule)",
    "prefill_flops_full": "the same for the uncompressed prompt",
    "prefill_flops_ratio": "prefill_flops / prefill_flops_full",
    "prefill_ideal_speedup": "1 / prefill_flops_ratio",
    "train_step_ms": "training step (forward + backward + optimizer step), median",
    "train_step_ms_min": "fastest repeat",
    "train_step_ms_max": "slowest repeat",
    "train_step_spread": "(max - min) / median",
    "train_fwd_bwd_ms": "forward + backward part of the step, median",
    "train_optimizer_ms": "optimizer part of the step, median",
    "train_samples_per_s": "batch / train_step_ms",
    "train_tokens_per_s": "batch * uncompressed sequence length / train_step_ms",
    "train_peak_mib": "peak memory during the timed steps (see meta.memory)",
    "train_saved_for_backward_mib": "activations autograd saves for backward in one training forward, parameters "
    "excluded (device-independent)",
    "train_start_mib": "memory resident/allocated when the timed steps began (weights, optimizer state)",
    "train_speedup": "train_step_ms of full / this one",
    "train_efficiency": "train_speedup / ideal_speedup",
    "train_fwd_bwd_speedup": "train_fwd_bwd_ms of full / this one",
    "train_fwd_bwd_efficiency": "train_fwd_bwd_speedup / ideal_speedup",
    "generate_ms": "prefill + decode, median",
    "generate_ms_min": "fastest repeat",
    "generate_ms_max": "slowest repeat",
    "generate_spread": "(max - min) / median",
    "prefill_ms": "prefill latency (prompt forward with KV cache, last logits), median",
    "prefill_ms_min": "fastest repeat",
    "prefill_ms_max": "slowest repeat",
    "prefill_spread": "(max - min) / median",
    "decode_ms": "decode_tokens cached single-token steps, median",
    "decode_ms_min": "fastest repeat",
    "decode_ms_max": "slowest repeat",
    "decode_spread": "(max - min) / median",
    "decode_tokens_per_s": "batch * decode_tokens / decode_ms",
    "inference_peak_mib": "peak memory during the timed generations",
    "inference_start_mib": "memory when the timed generations began",
    "prefill_speedup": "prefill_ms of full / this one",
    "prefill_efficiency": "prefill_speedup / prefill_ideal_speedup",
    "decode_speedup": "decode_ms of full / this one",
}
for _key in [k for k in FIELDS if k.startswith("train_")]:
    FIELDS[_key.replace("train_", "train_ckpt_", 1)] = FIELDS[_key] + " (gradient checkpointing on)"


def _num(value: Any, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _stages(values: list[int]) -> str:
    return "/".join(map(str, values))


def header(meta: dict[str, Any]) -> str:
    s = meta["shape"]
    load = meta.get("load_before"), meta.get("load_after")
    load_text = (
        f"; load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load[0])}, "
        f"after {'/'.join(f'{x:.2f}' for x in load[1])}"
        if all(load)
        else ""
    )
    return "\n".join(
        [
            f"## Benchmark `{meta['model']}`: {s['note']}",
            "",
            f"- LLM: {s['num_layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, "
            f"{s['heads']} heads ({s['kv_heads']} KV), vocab {s['vocab']}; {meta['scope']}.",
            f"- Tokens per sample: {s['n_system']} system + {s['n_visual']} visual + {s['n_question']} question "
            f"+ {s['n_answer']} answer = {meta['train_length']} (training), prompt {meta['prompt_length']} "
            f"(inference, then {s['decode_tokens']} decode steps); batch {s['batch']}.",
            f"- Device: {meta['device_name']} ({meta['device']}), {meta['dtype']}, attention "
            f"{meta['attn_implementation']}, optimizer {meta['optimizer']}; torch {meta['torch']}, "
            f"transformers {meta['transformers']}{load_text}.",
            f"- Timing: {meta['warmup']} warm-up call(s) discarded, median of {meta['repeats']} repeats "
            f"(min-max spread shown), device synchronised before each clock read. Memory: {meta['memory']}.",
            f"- Points: fastv {{{meta['fastv_point']}}}, libra and fastv-q {meta['libra_points']}. "
            "FLOPs: `libra_train.flops` for the per-layer schedule the run saw (decoder layers only); "
            "efficiency = measured speed-up / FLOPs-ideal speed-up.",
        ]
    )


def _saved(row: dict[str, Any], prefix: str, rows: list[dict[str, Any]]) -> str:
    """Activation MiB saved for backward, and its fraction of the full-token row's (older JSON lacks it)."""
    key = f"{prefix}_saved_for_backward_mib"
    if key not in row:
        return "-"
    base = next((r.get(key) for r in rows if r["method"] == "full"), None)
    return f"{row[key]:.1f} MiB" + (f" ({row[key] / base:.2f})" if base else "")


def training_table(rows: list[dict[str, Any]]) -> str:
    ckpt = any("train_ckpt_step_ms" in r for r in rows)
    head = (
        "| method | points | visual tokens per stage | FLOPs ratio | step (median) | spread | samples/s | tokens/s "
        "| speed-up | ideal | efficiency (step / fwd+bwd) | peak MiB | saved for backward"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|---"
    if ckpt:
        head += " | step, ckpt on | speed-up, ckpt on | peak MiB, ckpt on"
        rule += "|---|---|---"
    lines = [head + " |", rule + "|"]
    for r in rows:
        if "train_step_ms" not in r:
            continue
        line = (
            f"| {r['label']} | {r['points'] or '-'} | {_stages(r['visual_tokens_per_stage'])} "
            f"| {r['flops_ratio']:.3f} | {r['train_step_ms']:.1f} ms | {r['train_step_spread']:.1%} "
            f"| {r['train_samples_per_s']:.2f} | {r['train_tokens_per_s']:.0f} "
            f"| {_num(r['train_speedup'], '.2f', 'x')} | {r['ideal_speedup']:.2f}x "
            f"| {_num(r['train_efficiency'], '.1%')} / {_num(r['train_fwd_bwd_efficiency'], '.1%')} "
            f"| {r['train_peak_mib']:.0f} | {_saved(r, 'train', rows)}"
        )
        if ckpt:
            line += (
                f" | {r['train_ckpt_step_ms']:.1f} ms | {_num(r['train_ckpt_speedup'], '.2f', 'x')} "
                f"| {r['train_ckpt_peak_mib']:.0f}"
            )
        lines.append(line + " |")
    return "\n".join(lines)


def inference_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | prefill tokens per stage | FLOPs ratio | prefill (median) | spread | speed-up | ideal "
        "| efficiency | decode tokens/s | decode speed-up | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_stages(r['prefill_tokens_per_stage'])} | {r['prefill_flops_ratio']:.3f} "
            f"| {r['prefill_ms']:.1f} ms | {r['prefill_spread']:.1%} | {_num(r['prefill_speedup'], '.2f', 'x')} "
            f"| {r['prefill_ideal_speedup']:.2f}x | {_num(r['prefill_efficiency'], '.1%')} "
            f"| {r['decode_tokens_per_s']:.1f} | {_num(r['decode_speedup'], '.2f', 'x')} "
            f"| {r['inference_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    parts = [header(meta), ""]
    if any("train_step_ms" in r for r in rows):
        parts += ["### Training step (forward + backward + optimizer)", "", training_table(rows), ""]
    parts += ["### Inference (prefill, then cached greedy decode)", "", inference_table(rows), ""]
    return "\n".join(parts)


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "fields": FIELDS, "results": rows}, indent=2) + "\n")


def plot(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Left: training step and prefill time per method (min-max bars). Right: measured time ratio to full
    beside the FLOPs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    names = {"train_step": "train step", "train_ckpt_step": "train step, ckpt on", "prefill": "prefill"}
    series = [(key, name) for key, name in names.items() if f"{key}_ms" in rows[0]]
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 4.5))
    width = 0.8 / len(series)
    for i, (key, name) in enumerate(series):
        med = np.array([r[f"{key}_ms"] for r in rows])
        err = np.array([[m - r[f"{key}_ms_min"], r[f"{key}_ms_max"] - m] for m, r in zip(med, rows)]).T
        ax_time.bar(x + (i - (len(series) - 1) / 2) * width, med, width, yerr=err, capsize=3, label=name)
    ax_time.set_ylabel("milliseconds (median, min-max)")
    ax_time.set_title("time per call")
    base = next((r for r in rows if r["method"] == "full"), None)
    ratio_key = "train_step_ms" if "train_step_ms" in rows[0] else "prefill_ms"
    flops_key = "flops_ratio" if ratio_key == "train_step_ms" else "prefill_flops_ratio"
    ax_ratio.bar(x - 0.2, [r[flops_key] for r in rows], 0.4, label="FLOPs ratio (analytic)")
    if base is not None:
        ax_ratio.bar(
            x + 0.2, [r[ratio_key] / base[ratio_key] for r in rows], 0.4, label="measured time ratio"
        )
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set_title(f"{ratio_key.removesuffix('_ms').replace('_', ' ')}: fraction of full tokens")
    for ax in (ax_time, ax_ratio):
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['model']} on {meta['device_name']} ({meta['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
