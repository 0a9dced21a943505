"""Command-line pieces shared by ``scripts/generate.py`` and ``scripts/evaluate.py``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["add_model_arguments", "libra_argument", "load_from_args"]


def libra_argument(values: Sequence[str] | None) -> Any:
    """``--libra`` values -> ``load(libra=...)``: None (the export's), ``off``, a ``libra_config.json``
    path, or ``key=value`` overrides of the export's config with YAML-typed values
    (``ratio=0.8 layers=[1,2]``)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    overrides = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--libra: expected key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def add_model_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 32) -> None:
    """The export and how to run it."""
    parser.add_argument("export", help="export directory (scripts/export.py)")
    parser.add_argument(
        "--libra",
        action="append",
        metavar="off|FILE|KEY=VALUE",
        help="compression: off, a libra_config.json, or an override of the export's (repeatable: "
        "--libra ratio=0.8 --libra layers=[1]); default: as trained",
    )
    parser.add_argument(
        "--template", choices=("vicuna_v1", "chat_template"), help="chat template (default: as trained)"
    )
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda when available)")
    parser.add_argument("--dtype", help="weight dtype, e.g. bfloat16 (default: as saved)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, processor, template)`` for the arguments of :func:`add_model_arguments`."""
    import torch

    from libra_train.inference.loading import load, prompt_template

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(args.export, libra=libra_argument(args.libra), dtype=args.dtype, device=device)
    return model, processor, args.template or prompt_template(args.export)
