"""Full tokens versus FastV versus Libra-Merging on one LLM, one machine, one run: training and inference.

For each method (and ratio) on the same random model and the same batch (see `libra_train.bench.shapes`):

* **training step**: forward + backward + optimizer step (``--optimizer``, lr 0 so that every method sees the
  same weights; the update arithmetic runs all the same), loss through the plug-in's position map, with
  gradient checkpointing off and on. Reported: step time (median, min, max), its forward+backward and
  optimizer parts, samples/s and input tokens/s (uncompressed tokens per second, what a data loader feeds).
* **inference**: the prefill of the prompt (everything but the answer) with a KV cache and ``logits_to_keep=1``
  as ``generate`` does, then ``decode_tokens`` greedy single-token steps on the cache (the argmax's embedding
  fed back), i.e. ``generate(min_new_tokens=max_new_tokens=decode_tokens + 1)`` split into its two phases.
  Reported: prefill latency, decode tokens/s.
* **memory**: peak per measurement (`libra_train.bench.memory`: RSS on CPU, CUDA max allocated on GPU), and
  the activations saved for backward by one training forward (``SavedForBackward``: bytes autograd keeps,
  parameters excluded; the same number on any device, so the activation saving shows on CPU too).
* **tokens and FLOPs**: visual tokens and all tokens per stage as the timed run saw them
  (``libra_runtime(model).last_visual_tokens`` batch maximum, and ``.last_widths``, the padded width each
  stage computes on, reserved compensation slots included), the per-layer schedule, its analytic FLOPs (`libra_train.flops.schedule_flops`) and the ratio to
  full tokens; the FLOPs-ideal speed-up is ``1 / flops_ratio``.
* **efficiency** = measured speed-up over ``full`` / FLOPs-ideal speed-up. The FLOPs model counts the decoder
  layers only, so the parts it leaves out (LM head + loss, the optimizer step, which does not shrink at all)
  pull the step's efficiency down; ``train_fwd_bwd_efficiency`` leaves the optimizer out.

Timing follows `libra_train.bench.timing.measure`: warm-up calls discarded, the device synchronised before the
clock is read, median and spread of several repeats. Phases inside one call (forward+backward / optimizer,
prefill / decode) are read with a synchronise at each boundary.

Methods (equal ratio R per point; ``fastv-q`` gives Libra's exact token budget without its merge):

* ``full``: no compression.
* ``fastv``: top-k by attention + pruning at one point, ``max(0, round(num_layers * 3 / 32))``: the paper's
  FastV "K=3" setting (point {3} of 32 layers, shared/DESIGN.md section 1) scaled to the depth
  (point 0 of 4 layers, 1 of 8, 4 of 40).
* ``fastv-q``: FastV's selection and pruning at Libra's points: the same tokens per stage as ``libra`` minus
  its compensation tokens, which isolates the cost of interval selection + importance-weighted merging.
* ``libra``: interval selection + IGM at the end of each of the first three quarters of depth
  (`libra_train.flops.libra_points`: {7, 15, 23} of 32 layers, {0, 1, 2} of 4).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from libra_train.bench.memory import PeakMemory, SavedForBackward, release_memory
from libra_train.bench.shapes import BenchInputs, BenchShape
from libra_train.bench.timing import Timing, measure, synchronize
from libra_train.flops import libra_points, schedule_flops
from libra_train.plugin import LibraConfig, apply_libra, libra_runtime, remove_libra, visual_span

METHODS = ("full", "fastv", "fastv-q", "libra")
TRAIN_MODES = {"train": False, "train_ckpt": True}  # field prefix -> gradient checkpointing


def fastv_point(num_layers: int) -> int:
    """FastV's single compression point scaled from the paper's {3} of 32 layers."""
    return max(0, round(num_layers * 3 / 32))


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison."""

    method: str  # one of METHODS
    ratio: float = 0.0  # fraction removed at each point (0 for full)
    points: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return self.method if self.method == "full" else f"{self.method} R={self.ratio:g}"

    def config(self) -> LibraConfig | None:
        if self.method == "full":
            return None
        preset = "libra" if self.method == "libra" else "fastv"
        return LibraConfig(method=preset, layers=list(self.points), ratio=self.ratio)


def method_specs(methods: list[str], ratios: list[float], num_layers: int) -> list[MethodSpec]:
    """``full`` once, every other method once per ratio, in the order given."""
    specs = []
    for method in methods:
        if method == "full":
            specs.append(MethodSpec("full"))
        elif method == "fastv":
            specs += [MethodSpec("fastv", r, (fastv_point(num_layers),)) for r in ratios]
        elif method in ("fastv-q", "libra"):
            if num_layers < 4:
                raise ValueError(
                    f"{method} needs at least 4 layers (one point per quarter), got {num_layers}"
                )
            specs += [MethodSpec(method, r, tuple(libra_points(num_layers))) for r in ratios]
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return specs


def schedule_from_run(num_layers: int, points: list[int] | tuple[int, ...], tokens: list[int]) -> list[int]:
    """Per-layer token counts from the counts of each stage: stage k runs from the layer after point k-1 up to
    point k (the last stage to the last layer)."""
    schedule, stage = [], 0
    for layer in range(num_layers):
        schedule.append(tokens[stage])
        if stage < len(points) and layer == points[stage]:
            stage += 1
    return schedule


@dataclass
class Options:
    """How to measure (the command line's knobs)."""

    device: torch.device
    warmup: int = 1
    repeats: int = 3
    optimizer: str = "adamw"
    checkpointing: tuple[str, ...] = ("train", "train_ckpt")  # which TRAIN_MODES to run


class PhaseClock:
    """Durations of the phases of one timed call (``start`` then ``lap(name)`` at each boundary)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.laps: dict[str, list[float]] = defaultdict(list)
        self._last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.laps[name].append(now - self._last)
        self._last = now

    def timing(self, name: str) -> Timing:
        samples = sorted(self.laps[name])
        n = len(samples)
        median = samples[n // 2] if n % 2 else (samples[n // 2 - 1] + samples[n // 2]) / 2
        return Timing(median, samples[0], samples[-1], n)


def make_optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0)
    raise ValueError(f"unknown optimizer {name!r} (adamw | sgd)")


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Non-reentrant activation checkpointing on or off (the training loop's setting)."""
    # transformers 5.23 renamed gradient_checkpointing_* to activation_checkpointing_*; both spellings work.
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = (
            getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        )
        disable()


def _stage_counts(model: torch.nn.Module) -> tuple[list[int], list[int]] | None:
    runtime = libra_runtime(model)
    if runtime is None or runtime.last_tokens is None:
        return None
    # widths, not real-token counts: the padded rows (reserved compensation slots included) are what is computed
    return [int(t.max()) for t in runtime.last_visual_tokens], list(runtime.last_widths)


def _timing_fields(prefix: str, t: Timing) -> dict[str, float]:
    return {
        f"{prefix}_ms": t.median * 1e3,
        f"{prefix}_ms_min": t.low * 1e3,
        f"{prefix}_ms_max": t.high * 1e3,
        f"{prefix}_spread": t.spread,
    }


def _memory_fields(prefix: str, mem: PeakMemory) -> dict[str, float]:
    return {f"{prefix}_peak_mib": mem.peak_mib, f"{prefix}_start_mib": mem.start_mib}


def _timed(fn, clock: PhaseClock, opts: Options) -> tuple[Timing, PeakMemory]:
    for _ in range(opts.warmup):
        fn()
    clock.laps.clear()
    with PeakMemory(opts.device) as mem:
        timing = measure(fn, warmup=0, repeats=opts.repeats, device=opts.device)
    return timing, mem


def measure_train(
    model, inputs: BenchInputs, shape: BenchShape, opts: Options, prefix: str
) -> dict[str, Any]:
    """One training mode (``train`` or ``train_ckpt``) of the current method: timings, throughput, memory."""
    set_checkpointing(model, TRAIN_MODES[prefix])
    model.train()
    optimizer = make_optimizer(model, opts.optimizer)
    clock = PhaseClock(opts.device)

    def step() -> None:
        clock.start()
        optimizer.zero_grad(set_to_none=True)
        with visual_span(inputs.visual):
            loss = model(inputs_embeds=inputs.embeds, labels=inputs.labels, use_cache=False).loss
        loss.backward()
        clock.lap("fwd_bwd")
        optimizer.step()
        clock.lap("optimizer")

    try:
        timing, mem = _timed(step, clock, opts)
        counts = _stage_counts(model)
        with SavedForBackward(model) as saved, visual_span(inputs.visual):  # one more, untimed forward
            loss = model(inputs_embeds=inputs.embeds, labels=inputs.labels, use_cache=False).loss
        loss.backward()
    finally:
        optimizer.zero_grad(set_to_none=True)  # the optimizer state goes with this frame
        set_checkpointing(model, False)
    row = _timing_fields(f"{prefix}_step", timing)
    row[f"{prefix}_fwd_bwd_ms"] = clock.timing("fwd_bwd").median * 1e3
    row[f"{prefix}_optimizer_ms"] = clock.timing("optimizer").median * 1e3
    row[f"{prefix}_samples_per_s"] = shape.batch / timing.median
    row[f"{prefix}_tokens_per_s"] = shape.batch * shape.train_length / timing.median
    row.update(_memory_fields(prefix, mem))
    row[f"{prefix}_saved_for_backward_mib"] = saved.mib
    row["_counts"] = counts
    return row


def measure_inference(model, inputs: BenchInputs, shape: BenchShape, opts: Options) -> dict[str, Any]:
    """Prefill + ``decode_tokens`` cached greedy steps of the current method."""
    model.eval()
    embed = model.get_input_embeddings()
    clock = PhaseClock(opts.device)
    counts: list = [None]

    @torch.no_grad()
    def generate() -> None:
        clock.start()
        with visual_span(inputs.prompt_visual):
            out = model(inputs_embeds=inputs.prompt_embeds, use_cache=True, logits_to_keep=1)
        clock.lap("prefill")
        counts[0] = _stage_counts(model)
        cache = out.past_key_values
        for _ in range(shape.decode_tokens):
            token = out.logits[:, -1].argmax(-1)  # [B]
            out = model(inputs_embeds=embed(token)[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        clock.lap("decode")

    timing, mem = _timed(generate, clock, opts)
    row = _timing_fields("generate", timing)
    row.update(_timing_fields("prefill", clock.timing("prefill")))
    row.update(_timing_fields("decode", clock.timing("decode")))
    decode_s = clock.timing("decode").median
    row["decode_tokens_per_s"] = shape.batch * shape.decode_tokens / decode_s if decode_s else float("nan")
    row.update(_memory_fields("inference", mem))
    row["_counts"] = counts[0]
    return row


def _schedule_fields(prefix: str, spec: MethodSpec, counts, full_length: int, shape: BenchShape) -> dict:
    """Tokens per stage, the per-layer schedule and its FLOPs (``prefix`` is "" or "prefill_")."""
    visual, tokens = counts if counts is not None else ([shape.n_visual], [full_length])
    points = list(spec.points) if counts is not None else []
    schedule = schedule_from_run(shape.num_layers, points, tokens)
    flops = schedule_flops(schedule, shape.llm)
    full = schedule_flops([full_length] * shape.num_layers, shape.llm)
    return {
        f"{prefix}visual_tokens_per_stage": visual,
        f"{prefix}tokens_per_stage": tokens,
        f"{prefix}schedule": schedule,
        f"{prefix}flops": flops,
        f"{prefix}flops_full": full,
        f"{prefix}flops_ratio": flops / full,
        f"{prefix}ideal_speedup": full / flops,
    }


def measure_method(model, spec: MethodSpec, inputs: BenchInputs, shape: BenchShape, opts: Options) -> dict:
    """Every measurement of one method on ``model`` (Libra applied for the duration, then removed)."""
    config = spec.config()
    if config is not None:
        apply_libra(model, config)
    row: dict[str, Any] = {
        "method": spec.method,
        "label": spec.label,
        "ratio": spec.ratio,
        "points": list(spec.points),
        "select": config.select_method if config else None,
        "merge": config.merge_method if config else None,
    }
    try:
        train_counts = None
        for prefix in opts.checkpointing:
            part = measure_train(model, inputs, shape, opts, prefix)
            counts = part.pop("_counts")
            train_counts = train_counts or counts
            row.update(part)
        inference = measure_inference(model, inputs, shape, opts)
        prefill_counts = inference.pop("_counts")
        row.update(inference)
    finally:
        if config is not None:
            remove_libra(model)
        release_memory(opts.device)
    missed_train = bool(opts.checkpointing) and train_counts is None
    if config is not None and (missed_train or prefill_counts is None):
        raise RuntimeError(f"{spec.label}: the plug-in did not compress (no visual span reached it?)")
    if opts.checkpointing:
        row.update(_schedule_fields("", spec, train_counts, shape.train_length, shape))
    row.update(_schedule_fields("prefill_", spec, prefill_counts, shape.prompt_length, shape))
    return row


def add_relative_fields(rows: list[dict], opts: Options) -> None:
    """Speed-ups over the ``full`` row and efficiencies (None without a ``full`` row)."""
    base = next((r for r in rows if r["method"] == "full"), None)

    def ratio(key: str, row: dict) -> float | None:
        return base[key] / row[key] if base is not None and row.get(key) else None

    for row in rows:
        for prefix in opts.checkpointing:
            for part, key in (("", f"{prefix}_step_ms"), ("_fwd_bwd", f"{prefix}_fwd_bwd_ms")):
                speedup = ratio(key, row)
                row[f"{prefix}{part}_speedup"] = speedup
                row[f"{prefix}{part}_efficiency"] = (
                    None if speedup is None else speedup / row["ideal_speedup"]
                )
        speedup = ratio("prefill_ms", row)
        row["prefill_speedup"] = speedup
        row["prefill_efficiency"] = None if speedup is None else speedup / row["prefill_ideal_speedup"]
        decode = ratio("decode_ms", row)
        row["decode_speedup"] = decode


def run_meta(shape: BenchShape, opts: Options, dtype: torch.dtype, attn: str) -> dict[str, Any]:
    """Where and how the run was made (for the header and the JSON)."""
    import transformers

    device = opts.device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
    meta = {
        "model": shape.name,
        "shape": dataclasses.asdict(shape),
        "train_length": shape.train_length,
        "prompt_length": shape.prompt_length,
        "device": str(device),
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "optimizer": opts.optimizer,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastv_point": fastv_point(shape.num_layers),
        "libra_points": libra_points(shape.num_layers) if shape.num_layers >= 4 else None,
        "memory": "cuda_max_allocated" if device.type == "cuda" else "peak_rss (VmHWM reset per measurement)",
        "scope": "LLM only (LlamaForCausalLM fed inputs_embeds): the vision tower and projector are the same "
        "for every method and are not run",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if hasattr(os, "getloadavg"):
        meta["load_before"] = list(os.getloadavg())
    return meta
