"""The README card of an export: merge config, training recipe, visual tokens per layer and the FLOPs ratio.

Token counts come from ``libra_train.compress.schedule.token_schedule`` and FLOPs from ``libra_train.flops``
(the paper's per-layer formula, LLM only). For the merges that add an information compensation token
(``igm``, ``igm_neg``) one per point is counted: the most a sample can carry (a point whose tokens are all
positive adds none).
"""

from __future__ import annotations

import json
from typing import Any

from libra_train.inference.loading import CONFIG_KEY, RECIPE_FILE
from libra_train.plugin.config import CONFIG_NAME, LibraConfig

__all__ = ["model_card"]


def _tokens_section(model_config: Any, cfg: LibraConfig, n_visual: int | None) -> list[str]:
    from libra_train.compress.schedule import token_schedule
    from libra_train.flops import LLMShape, schedule_flops

    text = model_config.get_text_config()
    shape = LLMShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size)
    n_visual = n_visual or getattr(model_config, "image_seq_length", None)
    if not n_visual:
        return [
            "The visual token count depends on the image for this model; pass `--n-visual N` for a table."
        ]
    points, ratios = (cfg.layers, cfg.ratios) if cfg.enabled else ([], [])
    comp = cfg.merge_method in ("igm", "igm_neg")  # the merges that add a compensation token
    fractions = cfg.kept_fractions if cfg.enabled else None  # PyramidDrop's keep rule, if set
    schedule = token_schedule(
        shape.num_layers, n_visual, points, ratios, compensation=comp, keep_fractions=fractions
    )
    full = schedule_flops([n_visual] * shape.num_layers, shape)
    lines = [
        f"Visual tokens each LLM layer sees for one image of N = {n_visual} tokens "
        f"({'one compensation token per point counted, the most there can be' if comp else 'no compensation'}"
        ";"
        " text tokens not counted):",
        "",
        "| layers | visual tokens |",
        "|---|---|",
    ]
    start = 0
    for i in range(1, shape.num_layers + 1):
        if i == shape.num_layers or schedule[i] != schedule[start]:
            lines.append(f"| {start}-{i - 1} | {schedule[start]} |")
            start = i
    ratio = schedule_flops(schedule, shape) / full
    lines += [
        "",
        f"LLM FLOPs (`libra_train.flops`, {shape.num_layers} layers, d={shape.hidden}, "
        f"m={shape.intermediate}): "
        f"{schedule_flops(schedule, shape) / 1e9:.3g} GFLOPs vs {full / 1e9:.3g} with all tokens, "
        f"ratio **{ratio:.3f}**.",
    ]
    return lines


def model_card(
    name: str,
    cfg: LibraConfig,
    model_config: Any,
    *,
    recipe: dict | None,
    lora: str,
    n_visual: int | None = None,
) -> str:
    """The export's ``README.md``: merge config, training recipe, visual tokens per layer and FLOPs ratio."""
    recipe_name = (recipe or {}).get("recipe_name", "unknown (the checkpoint holds no recipe)")
    state = "on" if cfg.enabled else "off (trained with all visual tokens; recorded for reference)"
    lines = [
        f"# {name}",
        "",
        f"Exported by libra-train from a checkpoint of the recipe **{recipe_name}** "
        f"(`{RECIPE_FILE}`). Model type `{model_config.model_type}`; LoRA: {lora}.",
        "",
        "```python",
        "from libra_train.infer import load",
        f'model, processor = load("{name}")                # compression as trained',
        f'model, processor = load("{name}", libra="off")   # all visual tokens',
        "```",
        "",
        "Plain `from_pretrained` loads the weights without compression.",
        "",
        f'## Merge config ({CONFIG_NAME}, also `config.json["{CONFIG_KEY}"]`)',
        "",
        f"Compression: {state}; method `{cfg.method}` (select `{cfg.select_method}`, "
        f"merge `{cfg.merge_method}`), "
        f"points {cfg.layers}, "
        + (f"kept fractions {cfg.kept_fractions}" if cfg.kept_fractions else f"ratio {cfg.ratio}")
        + f", theta {cfg.theta}.",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(cfg.to_dict().items())),
        "",
        "## Visual tokens per layer",
        "",
        *_tokens_section(model_config, cfg, n_visual),
    ]
    return "\n".join(lines) + "\n"
