"""The quality experiment of ``scripts/quality.py``: train, compress, evaluate, one resumable cell at a time.

Per seed ``s`` (model initialisation, data order and, for a demo recipe, the generated data: ``train.seed=s``
and ``data.demo.seed=s``, so each seed also asks its own held-out questions):

1. *Full-token model*: ``train.py recipe=<recipe> libra.enabled=false``, exported (`libra_train.bench.runs`).
2. *Training-free*: that model, loaded once, evaluated with full tokens and with every method at every ratio
   (the plug-in applied and removed in turn: the same weights for every row).
3. *Compression-aware*: for each main method (``aware`` in `METHODS`) ``train.py recipe=<lora_recipe>
   model.path=<export>`` with the method active at ``aware_ratio``, LoRA adapters trained from the full-token
   weights (``scripts/adapt_demo.py``'s experiment, per method), exported with the adapters merged and
   evaluated with the compression it was trained with; plus the same adaptation with full tokens (the row
   ``full``), so that every aware row has seen the same extra training.

Each evaluation is a cell (`libra_train.bench.quality.CellStore`) written when it finishes; finished training
runs are reused when launched with the same arguments, so an interrupted run resumes, and adding a method
later measures just its cells. With ``lock`` every CPU-heavy part (a training run, a seed's evaluations) holds
that machine-wide lock, so experiments that share a machine take turns instead of slowing each other down.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libra_train.bench.quality import (
    FULL,
    METHODS,
    CellStore,
    QualityMethod,
    aggregate,
    libra_kwargs,
    llm_shape,
    make_cell,
    recipe_overrides,
    select_methods,
    unsupported,
)
from libra_train.bench.quality_report import write_report
from libra_train.bench.runs import default_image_folder, export_run, machine_lock, train_run

QUIET = ["logging.progress=false", "logging.wandb=false"]


@dataclass
class QualityOptions:
    """What ``scripts/quality.py`` measures (its command line).

    Attributes:
        recipe: the full-token recipe trained from scratch per seed (run with ``libra.enabled=false``).
        lora_recipe: the compression-aware LoRA recipe (``model.path`` is set to the full-token export).
        seeds: one full-token model (and one adaptation per method) per seed.
        methods: names from `METHODS`.
        ratios: training-free ratios (fraction removed at each point).
        aware_ratio: the ratio the compression-aware adaptations train and evaluate at.
        aware: run the compression-aware phase.
        aware_methods: the methods adapted in it (None: every selected method marked ``aware`` in `METHODS`);
            the full-token adaptation always runs with them.
        out: where the cells and the report go (committed).
        work: training runs and exports (large; not committed).
        eval_data, image_folder: the held-out QA file (default: each seed's generated demo ``val.json``).
        eval_limit: evaluate the first N questions only.
        max_steps, lora_max_steps: cap the training runs (smoke runs).
        overrides, lora_overrides: extra ``key=value`` for the full-token / the LoRA runs.
        lock: machine-wide lock file held by CPU-heavy parts (None: none).
        batch_size: questions per ``generate`` call.
        report_only: measure nothing; rebuild the report from the cells already under ``out``.
    """

    recipe: str = "demo144_full"
    lora_recipe: str = "demo144_libra_lora"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: [m.name for m in METHODS])
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.67, 0.8])
    aware_ratio: float = 0.8
    aware: bool = True
    aware_methods: list[str] | None = None
    out: Path = Path("docs/results/quality/demo144")
    work: Path = Path("outputs/quality/demo144")
    eval_data: Path | None = None
    image_folder: Path | None = None
    eval_limit: int | None = None
    max_steps: int | None = None
    lora_max_steps: int | None = None
    overrides: list[str] = field(default_factory=list)
    lora_overrides: list[str] = field(default_factory=list)
    lock: str | None = None
    batch_size: int = 32
    report_only: bool = False


def _has_demo(recipe: str, overrides: list[str]) -> bool:
    """Whether the recipe generates the demo data (``data.demo`` set), read before ``???`` values are filled."""
    from libra_train.config import compose

    return compose(recipe, overrides).data.demo is not None


def _seeded(recipe: str, seed: int, overrides: list[str]) -> list[str]:
    demo = [f"data.demo.seed={seed}"] if _has_demo(recipe, overrides) else []
    return [f"recipe={recipe}", f"train.seed={seed}", *demo]


def _cap(steps: int | None) -> list[str]:
    return [f"train.max_steps={steps}"] if steps else []


def _eval_data(opts: QualityOptions, run_dir: Path) -> Path:
    if opts.eval_data is not None:
        return opts.eval_data
    generated = run_dir / "demo_data" / "val.json"
    if generated.is_file():
        return generated
    raise SystemExit(
        f"no held-out set: {opts.recipe} generates no demo data ({generated} is missing); "
        "give one with --eval-data FILE [--image-folder DIR]"
    )


def _log(text: str) -> None:
    print(f"[quality] {text}", flush=True)


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 (first 16 hex digits) of a model directory's weight files: a retrained model that differs from
    the one a cell measured (training is not bitwise reproducible everywhere) makes that cell count as not done."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no weight files (*.safetensors, *.bin)")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _spec(
    model: list[str], weights: str, data: Path, opts: QualityOptions, libra: dict[str, Any] | None
) -> dict[str, Any]:
    """What a cell's number depends on: the training arguments of its model and the full-token weights it
    starts from, the questions, the merge config."""
    return {"model": model, "weights": weights, "data": str(data), "limit": opts.eval_limit, "libra": libra}


def training_free(
    opts: QualityOptions,
    store: CellStore,
    seed: int,
    export: Path,
    model_args: list[str],
    data: Path,
    methods: list[QualityMethod],
) -> None:
    """Step 2: the full-token model with full tokens and with every method at every ratio (missing cells only)."""
    shape, weights = llm_shape(export), weights_fingerprint(export)
    todo = [(FULL, None, None)] + [
        (m.name, r, libra_kwargs(m, r, shape.num_layers)) for m in methods for r in opts.ratios
    ]
    todo = [
        t
        for t in todo
        if not store.done(seed, "free", t[0], t[1], _spec(model_args, weights, data, opts, t[2]))
    ]
    if not todo:
        _log(f"seed {seed}: training-free cells done")
        return
    from libra_train.infer import evaluate, load, load_qa, prompt_template
    from libra_train.plugin import LibraConfig, apply_libra, remove_libra

    with machine_lock(opts.lock):
        model, processor = load(export, libra="off")
        examples = load_qa(data, limit=opts.eval_limit)
        options = {
            "template": prompt_template(export),
            "image_folder": opts.image_folder or default_image_folder(data),
            "batch_size": opts.batch_size,
            "progress": False,
            "warmup": False,  # accuracy, not latency
        }
        for name, ratio, kwargs in todo:
            if kwargs is not None:
                apply_libra(model, LibraConfig(**kwargs))
            result = evaluate(model, processor, examples, label=name, **options)
            if kwargs is not None:
                remove_libra(model)
            points = kwargs["layers"] if kwargs else []
            store.save(make_cell(
                result, seed=seed, phase="free", method=name, ratio=ratio, points=points, shape=shape,
                spec=_spec(model_args, weights, data, opts, kwargs),
            ))  # fmt: skip
            _log(f"seed {seed} training-free {name}{f' R={ratio:g}' if ratio else ''}: {result.accuracy:.1%}")


def compression_aware(
    opts: QualityOptions,
    store: CellStore,
    seed: int,
    export: Path,
    data: Path,
    methods: list[QualityMethod],
) -> None:
    """Step 3: a LoRA adaptation per main method (and with full tokens), each evaluated as it was trained."""
    from libra_train.bench.runs import evaluate_export

    shape, weights = llm_shape(export), weights_fingerprint(export)
    seed_dir = opts.work / f"seed{seed}"
    adapted = [m for m in methods if m.aware and (opts.aware_methods is None or m.name in opts.aware_methods)]
    for method in [None, *adapted]:
        name = FULL if method is None else method.name
        kwargs = None if method is None else libra_kwargs(method, opts.aware_ratio, shape.num_layers)
        ratio = None if method is None else opts.aware_ratio
        args = [
            *_seeded(opts.lora_recipe, seed, opts.lora_overrides), f"model.path={export}",
            *recipe_overrides(kwargs), *QUIET, *_cap(opts.lora_max_steps), *opts.lora_overrides,
        ]  # fmt: skip
        spec = _spec(args, weights, data, opts, kwargs)
        if store.done(seed, "aware", name, ratio, spec):
            continue
        run_dir = seed_dir / f"aware-{name}"
        train_run(
            args, run_dir, seed_dir / "logs" / f"aware-{name}.log", reuse=True, lock=opts.lock, tag="quality"
        )
        model_dir = export_run(run_dir, seed_dir / "exports" / f"aware-{name}", reuse=True)
        with machine_lock(opts.lock):
            result = evaluate_export(
                model_dir, data, "off" if kwargs is None else None, limit=opts.eval_limit, label=name,
                image_folder=opts.image_folder, batch_size=opts.batch_size,
            )  # fmt: skip
        store.save(make_cell(
            result, seed=seed, phase="aware", method=name, ratio=ratio, points=kwargs["layers"] if kwargs else [],
            shape=shape, spec=spec,
        ))  # fmt: skip
        _log(f"seed {seed} compression-aware {name}{f' R={ratio:g}' if ratio else ''}: {result.accuracy:.1%}")


def _meta(opts: QualityOptions, skipped: dict[str, str], started: float, load_before: str) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe": opts.recipe,
        "lora_recipe": opts.lora_recipe,
        "seeds": opts.seeds,
        "methods": opts.methods,
        "skipped_methods": skipped,
        "ratios": opts.ratios,
        "aware_ratio": opts.aware_ratio,
        "aware_methods": opts.aware_methods,
        "eval_data": str(opts.eval_data) if opts.eval_data else "each seed's generated demo val.json",
        "eval_limit": opts.eval_limit,
        "max_steps": opts.max_steps,
        "lora_max_steps": opts.lora_max_steps,
        "overrides": opts.overrides,
        "lora_overrides": opts.lora_overrides,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
        "load_before": load_before,
        "load_after": _loadavg(),
        "wall_seconds_this_invocation": time.perf_counter() - started,
    }


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def run(opts: QualityOptions) -> dict[str, Any]:
    """The whole experiment (missing cells only), then the report from every cell under ``opts.out``.

    Returns:
        The report written to ``<out>/quality.json`` (``meta``, ``fields``, ``rows``, ``cells``).
    """
    started, load_before = time.perf_counter(), _loadavg()
    if not opts.seeds:
        raise ValueError("give at least one seed (--seeds 0,1,2)")
    methods = select_methods(opts.methods)
    if opts.aware_methods is not None:
        select_methods(opts.aware_methods)  # unknown names fail here, not silently
    skipped = {m.name: why for m in methods if (why := unsupported(m)) is not None}
    for name, why in skipped.items():
        _log(
            f"skipping {name}: the installed LibraConfig does not accept it yet ({why}); rerun later to add it"
        )
    methods = [m for m in methods if m.name not in skipped]
    store = CellStore(opts.out / "cells")
    for seed in [] if opts.report_only else opts.seeds:
        seed_dir = opts.work / f"seed{seed}"
        model_args = [
            *_seeded(opts.recipe, seed, opts.overrides), "libra.enabled=false", *QUIET, *_cap(opts.max_steps),
            *opts.overrides,
        ]  # fmt: skip
        train_run(model_args, seed_dir / "full", seed_dir / "logs" / "full.log", reuse=True, lock=opts.lock,
                  tag="quality")  # fmt: skip
        export = export_run(seed_dir / "full", seed_dir / "exports" / "full", reuse=True)
        data = _eval_data(opts, seed_dir / "full")
        training_free(opts, store, seed, export, model_args, data, methods)
        if opts.aware:
            compression_aware(opts, store, seed, export, data, methods)
        _report(opts, store, skipped, started, load_before)  # after every seed: a partial report
    report = _report(opts, store, skipped, started, load_before)
    _log(f"report: {opts.out / 'quality.md'}, {opts.out / 'quality.json'}, {opts.out / 'quality.png'}")
    return report


def _report(
    opts: QualityOptions, store: CellStore, skipped: dict[str, str], started: float, load_before: str
) -> dict[str, Any]:
    """Aggregate every cell of the requested seeds under ``opts.out`` and write the report files."""
    cells = [c for c in store.load_all() if c["seed"] in opts.seeds]
    report = {"meta": _meta(opts, skipped, started, load_before), "rows": aggregate(cells), "cells": cells}
    write_report(report, opts.out)
    return report
