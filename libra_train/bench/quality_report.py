"""The quality experiment's outputs: ``quality.md`` (tables), ``quality.json`` (every field), ``quality.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from libra_train.bench.quality import FULL, METHODS, METHODS_BY_NAME, REFERENCE

FIELDS: dict[str, str] = {
    "phase": "free: the full-token model compressed at test time; aware: LoRA-adapted with the method active",
    "method": "full (no compression; in 'aware' the same LoRA adaptation with full tokens) or a METHODS name",
    "ratio": "fraction of the visual tokens removed at each compression point (null for full)",
    "points": "compression points (layer l: layers 0..l see all tokens, l+1.. the compressed ones)",
    "seeds": "the seeds measured (one full-token model, and one adaptation per method, per seed)",
    "accuracy": "over seeds: mean, se = sd / sqrt(n), [low, high] = mean +- t_{0.975, n-1} * se",
    "binomial": "all questions of all seeds pooled: proportion, sqrt(p (1 - p) / N), Wilson 95% interval",
    "by_type": "per question type (from the data): accuracy over seeds as above, and pooled correct / total",
    "visual_tokens": "mean visual tokens entering each stage (stage 0 = all; compensation tokens included)",
    "text_tokens": "mean non-visual prompt tokens (seen by every layer)",
    "flops_ratio": "LLM prefill FLOPs (libra_train.flops, paper formula) of the mean token counts / full tokens",
    "delta_vs_full": "paired over seeds: accuracy - accuracy of full in the same phase (t-interval; excludes_zero)",
    "delta_vs_libra": "paired over seeds: accuracy - accuracy of libra at the same phase and ratio",
    "delta_equal_budget": "paired over seeds: accuracy - accuracy of the Libra row at the same points, phase and "
    "ratio (libra-1pt for fastv's single point, libra for the others; null for those two)",
}
ABLATIONS = ("libra", "libra-1pt", "prune", "mean", "igm_pos", "igm_neg")


def question_types(rows: list[dict[str, Any]]) -> list[str]:
    """The question types of the rows: the demo's (colour, shape, count) in that order, then any other sorted."""
    from libra_train.data.demo import QUESTION_TYPES

    found = {t for r in rows for t in r["by_type"]}
    return [t for t in QUESTION_TYPES if t in found] + sorted(found - set(QUESTION_TYPES))


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _pm(interval: dict[str, Any] | None, signed: bool = False) -> str:
    """``71.2 ± 3.4`` (percentage points; the t half-width); ``71.2`` with one seed."""
    if interval is None:
        return "-"
    mean, half = interval["mean"], interval["half_width"]
    text = f"{'+' if signed and mean > 0 else ''}{_pct(mean)}"
    if half is not None:
        text += f" ± {_pct(half)}"
    return text + ("*" if interval.get("excludes_zero") else "")


def _row_label(row: dict[str, Any]) -> str:
    return row["method"] if row["ratio"] is None else f"{row['method']} R={row['ratio']:g}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header, then one table per phase."""
    meta, rows = report["meta"], report["rows"]
    types = question_types(rows)
    lines = [
        f"# Accuracy at an equal token budget: {meta['recipe']}",
        "",
        f"`{meta['command']}`",
        "",
        f"- Seeds {meta['seeds']}; held-out set: {meta['eval_data']}"
        + (f" (first {meta['eval_limit']} questions)" if meta.get("eval_limit") else "")
        + "; compression-aware: LoRA (`"
        + meta["lora_recipe"]
        + f"`) at R={meta['aware_ratio']:g}.",
        "- Accuracy in %, mean over seeds ± the half-width of its 95% t-interval (n seeds, n-1 degrees of "
        "freedom); `SE` = sd / sqrt(n); `binomial` = the Wilson 95% half-width of all questions pooled "
        "(the noise of the finite question set alone).",
        "- Δ columns: paired over seeds (same model, same questions), percentage points ± 95% t half-width; "
        "`*` = the interval excludes 0. `Δ same points`: against the Libra row that removes as many tokens at "
        "the same points (the equal-budget pair: `libra-1pt` for `fastv`, `libra` for the rest).",
        f"- Machine {meta['machine']}; load average before / after: {meta['load_before']} / {meta['load_after']}.",
    ]
    if meta.get("skipped_methods"):
        lines.append(
            f"- Not measured (unknown to the installed LibraConfig): {', '.join(meta['skipped_methods'])}."
        )
    titles = {"free": "Training-free (the full-token model, compressed at test time)",
              "aware": "Compression-aware (LoRA-adapted with the method active, evaluated at that budget)"}  # fmt: skip
    for phase, title in titles.items():
        phase_rows = [r for r in rows if r["phase"] == phase]
        if not phase_rows:
            continue
        lines += ["", f"## {title}", ""]
        head = ["method", "points", "visual tokens per stage", "FLOPs", "accuracy", "SE", "binomial",
                "Δ vs full", f"Δ vs {REFERENCE}", "Δ same points", *types]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in phase_rows:
            acc = r["accuracy"]
            cells = [
                _row_label(r),
                "{" + ",".join(map(str, r["points"])) + "}" if r["points"] else "-",
                "/".join(f"{v:.1f}" for v in r["visual_tokens"]),
                f"{r['flops_ratio']:.3f}",
                _pm(acc),
                _pct(acc["se"]),
                f"± {_pct(r['binomial']['half_width'])}",
                _pm(r["delta_vs_full"], signed=True),
                _pm(r["delta_vs_libra"], signed=True),
                _pm(r.get("delta_equal_budget"), signed=True),
                *(_pm(r["by_type"][t]["accuracy"]) if t in r["by_type"] else "-" for t in types),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    measured = {r["method"] for r in rows}
    lines += ["", "Methods (`early`: FastV's single point; `quarters`: Libra's points):", ""]
    lines += [f"- `{m.name}`: {m.about} ({m.points})." for m in METHODS if m.name in measured]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Accuracy vs FLOPs ratio per method with 95% t error bars: main methods (training-free lines, aware
    markers) on the left, Libra's ablations on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    colours = {m.name: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = (
        (axes[0], [m.name for m in METHODS if m.aware], "main methods (lines: training-free; hollow: aware)"),
        (axes[1], list(ABLATIONS), "Libra ablations (training-free)"),
    )

    def err(row):
        half = row["accuracy"]["half_width"]
        return 0.0 if half is None else 100 * half

    values = [100 * r["accuracy"]["mean"] for r in rows] or [0.0]
    spread = [err(r) for r in rows] or [0.0]
    low = max(0.0, min(values) - max(spread) - 3)
    high = max(min(100.0, max(values) + max(spread) + 3), low + 10)
    for ax, names, title in panels:
        for phase, style in (("free", {}), ("aware", {"mfc": "none", "ms": 10, "mew": 2})):
            full = next((r for r in rows if r["phase"] == phase and r["method"] == FULL), None)
            if full is not None and (phase == "free" or ax is axes[0]):
                y = 100 * full["accuracy"]["mean"]
                ax.errorbar([1.0], [y], yerr=[err(full)], color="black", marker="s", capsize=4,
                            label=f"full tokens ({'aware: LoRA, full' if phase == 'aware' else 'training-free'})",
                            **style)  # fmt: skip
                if phase == "free":
                    ax.axhline(y, color="black", lw=0.8, ls=":")
            if phase == "aware" and ax is not axes[0]:
                continue
            for name in names:
                sel = sorted((r for r in rows if r["phase"] == phase and r["method"] == name),
                             key=lambda r: r["flops_ratio"])  # fmt: skip
                if not sel:
                    continue
                ax.errorbar(
                    [r["flops_ratio"] for r in sel], [100 * r["accuracy"]["mean"] for r in sel],
                    yerr=[err(r) for r in sel], color=colours.get(name, "grey"), marker="o", capsize=3,
                    ls="-" if phase == "free" else "none", label=name if phase == "free" else f"{name} (aware)",
                    **style,
                )  # fmt: skip
        ax.set_ylim(low, high)
        ax.set_xlabel("LLM prefill FLOPs / full tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("held-out accuracy (%), mean ± 95% t-interval over seeds")
    ratios = ", ".join(f"{r:g}" for r in report["meta"]["ratios"])
    fig.suptitle(f"{report['meta']['recipe']}: seeds {report['meta']['seeds']}, R = {ratios}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path) -> None:
    """``quality.json`` (with the meaning of every row field), ``quality.md`` and ``quality.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted({r["method"] for r in report["rows"]} - set(METHODS_BY_NAME) - {FULL})
    if unknown:
        raise ValueError(f"rows of methods {unknown} that METHODS does not list")
    (out / "quality.json").write_text(json.dumps({**report, "fields": FIELDS}, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report))
    plot(report, out / "quality.png")
