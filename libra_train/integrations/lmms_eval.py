"""The ``libra`` model of lmms-eval: benchmarks run with exactly the compression a model was trained with.

    python -m lmms_eval --model libra --model_args pretrained=exports/demo --tasks gqa,pope --batch_size 8
    python -m lmms_eval --model libra --model_args pretrained=exports/demo,libra=off ...        # all tokens
    python -m lmms_eval --model libra \\
        --model_args pretrained=checkpoints/llava-1.5-7b-hf,method=fastv,layers=[2],ratio=0.5 ...

lmms-eval finds the model through the entry-point group ``lmms_eval.models`` (pyproject.toml), whose payload
:func:`manifest` names :class:`LibraLMM`; nothing is imported from lmms-eval until it asks.

``pretrained`` is an export (``scripts/export.py``), a training checkpoint (``output_dir/checkpoint-N``, or
the run's ``output_dir`` for its newest one) or a plain transformers VLM directory; loading is
``libra_train.infer.load`` for directories with a ``config.json`` and ``libra_train.export.load_checkpoint``
for DeepSpeed checkpoints, so the merge config and the chat template are the ones training recorded.
``--model_args`` (comma-separated, values YAML-typed, so ``layers=[7,15,23]``):

- ``libra``: ``off`` (no compression), a ``libra_config.json``; default: the model's own merge config.
- merge-config fields override it (``method``, ``layers``, ``ratio``, ``select``, ``merge``, ``theta``, ``lam``,
  ``query``, ``enabled``): e.g. the paper's baselines on an uncompressed LLaVA-1.5 (which has no merge
  config, so a field, or ``libra=off``, is required there).
- ``template`` (``vicuna_v1`` | ``chat_template``; default: the training recipe's), ``dtype`` (default: as
  saved), ``attn_implementation`` (``auto``: flash_attention_2 on CUDA when installed, else sdpa),
  ``device`` (default: ``cuda:$LOCAL_RANK`` when CUDA is there, else cpu), ``batch_size`` (``--batch_size``),
  ``max_new_tokens`` (for tasks that set none), ``stats_path`` (a JSON file the visual-token counts are
  written to; ``scripts/eval_suite.sh`` reads it).

Requests:

- ``generate_until``: ``libra_train.inference.generate`` (the prompt rendered with the training template,
  images and videos prepared as in training (video files decoded by the processor: ``_query``), left-padded
  batches of ``batch_size``, KV cache, compression in the prefill with the last prompt token as the query).
  Batches keep lmms-eval's request order within a task and generation setting (no length sorting: a run then
  reproduces ``scripts/evaluate.py``'s batches, and the prompts are dominated by the image tokens anyway). ``until`` strings cut the decoded text; decoding
  itself stops at end-of-sequence or ``max_new_tokens``. Greedy unless the task asks for sampling; beam
  search is refused (the compressed KV cache is not reordered per beam).
- ``loglikelihood`` (multiple-choice tasks): the context is the user turn and the continuation the
  assistant's answer, encoded by the training ``Encoder`` (the tokens scored are those the training loss
  supervises: the answer and the template's end-of-turn, as lmms-eval's own ``llava`` models score it).
  One forward over context + continuation, with the compression query pinned to the last context token
  (``libra_train.visual_span(query_index=...)``): the causal attention of that token, and the visual hidden
  states before it, do not see the continuation, so every option of a question is scored on the same
  compressed sequence, the one a generation from the context would build. Returns the summed log-probability
  and whether greedy decoding would produce the continuation.
- ``generate_until_multi_round``: not implemented (raises).

The visual tokens each stage of the LLM saw (mean over a task's image requests) are logged after every
call and, with ``stats_path``, written as JSON with the merge config and the LLM's shape (for FLOPs).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm.auto import tqdm

from libra_train.plugin.config import LibraConfig

__all__ = ["LibraLMM", "VisualTokenLog", "load_for_eval", "manifest", "merge_choice", "score_continuations"]

MODEL_NAME = "libra"
MERGE_FIELDS = tuple(f.name for f in fields(LibraConfig))


def manifest() -> Any:
    """The entry point's payload: lmms-eval's registry calls it and imports :class:`LibraLMM` when asked."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LibraLMM")


def _typed(value: Any) -> Any:
    """A ``--model_args`` value as YAML types it (lmms-eval leaves ``[7,15,23]`` a string)."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def merge_choice(libra: Any, overrides: dict[str, Any]) -> Any:
    """``libra=`` and merge-config fields of ``--model_args`` -> ``load(libra=...)``.

    Args:
        libra: None (the model's config), ``"off"`` or a ``libra_config.json`` path.
        overrides: merge-config fields, applied on top of that config (or on the defaults without one).
    """
    overrides = {key: _typed(value) for key, value in overrides.items()}
    if not overrides:
        return libra
    if libra is None:
        return overrides
    if str(libra) == "off":
        raise ValueError(
            f"--model_args libra=off and merge-config fields {sorted(overrides)} contradict each other; "
            "drop libra=off to compress with those fields, or the fields to run with all visual tokens"
        )
    base = LibraConfig.from_pretrained(libra)
    try:
        return LibraConfig.from_dict({**base.to_dict(), **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"--model_args merge-config fields {overrides} on {libra}: {err}") from err


def _recipe_template(path: Path) -> str | None:
    from libra_train.export import find_recipe

    recipe_file = find_recipe(path)
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file is not None else None
    return ((recipe or {}).get("data") or {}).get("template")


def _is_training_checkpoint(path: Path) -> bool:
    """DeepSpeed state, or a transformers directory with a peft adapter that is not an export: an export's
    adapter names the export as its base (``from_pretrained`` loads both), a checkpoint's needs
    ``libra_train.export``'s loader."""
    from libra_train.export import is_deepspeed_checkpoint
    from libra_train.inference.loading import CONFIG_KEY, model_config_json

    if is_deepspeed_checkpoint(path):
        return True
    adapter = any((folder / "adapter_config.json").is_file() for folder in (path, path / "adapter"))
    return adapter and CONFIG_KEY not in model_config_json(path)


def load_for_eval(
    pretrained: str | os.PathLike,
    *,
    libra: Any = None,
    dtype: Any = None,
    attn_implementation: str = "auto",
    device: str | None = None,
) -> tuple[Any, Any, str]:
    """``(model, processor, template)`` for an export, a training checkpoint or a transformers VLM directory.

    Exports and transformers directories go through ``libra_train.infer.load``. Training checkpoints
    (DeepSpeed state, or a directory with a LoRA adapter beside the base weights) go through
    ``libra_train.export.load_checkpoint``, as ``scripts/export.py`` reads them, with the LoRA merged (faster;
    the same function up to rounding), then the same merge-config resolution. The template is the training
    recipe's ``data.template`` when the directory holds a recipe, else ``libra_train.infer.prompt_template``'s
    rule.

    Args:
        pretrained: the directory (a run's ``output_dir``: its newest checkpoint).
        libra: as ``libra_train.infer.load``: None, ``"off"``, a ``LibraConfig``, a path or a dict of fields.
        dtype: weight dtype (``"bfloat16"``, ...; None = as saved).
        attn_implementation: ``auto`` | ``sdpa`` | ``eager`` | ``flash_attention_2``.
        device: where to put the model (None = cpu).

    Raises:
        FileNotFoundError: no such directory.
        ValueError: no merge config and no ``libra`` (the message says to pass ``libra=off``), or one that
            does not fit the model.
    """
    from libra_train.export import load_checkpoint, resolve_checkpoint
    from libra_train.inference.loading import load, parse_dtype, prompt_template, resolve_libra
    from libra_train.models import pick_attn_implementation
    from libra_train.plugin import apply_libra

    path = resolve_checkpoint(pretrained)
    if not path.is_dir():
        raise FileNotFoundError(f"--model_args pretrained={pretrained}: no such directory")
    if not _is_training_checkpoint(path):
        model, processor = load(
            path, libra=libra, dtype=dtype, attn_implementation=attn_implementation, device=device
        )
        return model, processor, _recipe_template(path) or prompt_template(path)
    from peft import PeftModel

    model, processor, found = load_checkpoint(path, dtype=parse_dtype(dtype))
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    cfg = resolve_libra(found, libra, path)
    if cfg is not None:
        try:
            cfg.check_num_layers(model.config.get_text_config().num_hidden_layers)
        except ValueError as err:
            raise ValueError(f"the merge config does not fit the model in {path}: {err}") from err
    if attn_implementation != "auto":  # else the backend the checkpoint loader chose (the recipe's, or sdpa)
        model.set_attn_implementation(pick_attn_implementation(attn_implementation))
    model.eval().to(device or "cpu")
    if cfg is not None:
        apply_libra(model, cfg)
    template = _recipe_template(path)
    if template is None:
        raise ValueError(f"{path}: the checkpoint holds no recipe with data.template; pass template=...")
    return model, processor, template


@dataclass
class VisualTokenLog:
    """Visual tokens per LLM stage of every image request, per task (``Generation.visual_tokens`` rows)."""

    rows: dict[str, list[list[int]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, task: str, counts: Sequence[int]) -> None:
        if counts:  # text-only requests have none
            self.rows[task].append(list(counts))

    def means(self, task: str) -> list[float]:
        """Mean per stage over the task's requests that went through every stage (as ``evaluate`` does:
        a request whose image a point did not compress has fewer stages and is left out)."""
        rows = self.rows.get(task, [])
        depth = max((len(r) for r in rows), default=0)
        rows = [r for r in rows if len(r) == depth]
        return [sum(r[s] for r in rows) / len(rows) for s in range(depth)]

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            task: {"requests": len(rows), "visual_tokens": self.means(task)}
            for task, rows in self.rows.items()
        }


@torch.no_grad()
def score_continuations(
    model: Any, samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int
) -> tuple[list[tuple[float, bool]], list[list[int]]]:
    """Log-probability of each sample's labelled tokens with the compression decided by its context alone.

    Args:
        model: the VLM (Libra applied or not).
        samples: ``Encoder.encode`` outputs (``input_ids[L]``, ``labels[L]`` marking the continuation, ...);
            every sample has at least one label and its first label follows the context.
        pad_token_id: for the (right) padding of the batch.

    Returns:
        ``([(sum of log-probs, greedy), ...], visual tokens per stage of each sample)``; *greedy*: every
        labelled token is the argmax of its position (the continuation is what greedy decoding would give).
    """
    from libra_train.data.collate import collate
    from libra_train.inference.generation import find_runtime, visual_counts
    from libra_train.plugin import visual_span
    from libra_train.plugin.loss import IGNORE_INDEX, shift_labels_through_map

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in collate(samples, pad_token_id).items()}
    labels = batch.pop("labels")  # [B, L]
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    query = (labels != IGNORE_INDEX).int().argmax(1) - 1  # [B] the last context token
    runtime = find_runtime(model)
    with visual_span(query_index=query):
        out = model(**batch, use_cache=False)
    position_map = out.get("libra_position_map")  # [B, L'] when the forward compressed
    if position_map is None:
        positions = torch.arange(labels.shape[1], device=device)
        position_map = torch.where(batch["attention_mask"].bool(), positions, -1)
    targets = shift_labels_through_map(labels, position_map)  # [B, L'] next token at each position
    scored = targets != IGNORE_INDEX
    logits = out.logits[scored].float()  # [n, V] the positions that predict a continuation token
    logprobs = torch.log_softmax(logits, -1).gather(1, targets[scored][:, None])[:, 0]  # [n]
    hits = logits.argmax(-1) == targets[scored]  # [n]
    row = scored.nonzero()[:, 0]  # [n] sample of each scored position
    total = torch.zeros(len(samples), device=device).index_add_(0, row, logprobs)
    misses = torch.zeros(len(samples), device=device).index_add_(0, row, (~hits).float())
    scores = [(float(t), bool(m == 0)) for t, m in zip(total.tolist(), misses.tolist())]
    return scores, visual_counts(model, runtime, batch["input_ids"].cpu())


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class LibraLMM(lmms):
    """lmms-eval's model interface over a libra-train model (see the module doc for the arguments)."""

    is_simple = True  # requests carry (context, ..., doc_to_visual, doc_id, task, split), as for llava_hf
    chat_template = None  # the prompt template is the training one (``template``), not lmms-eval's

    def __init__(
        self,
        pretrained: str,
        libra: str | None = None,
        template: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str = "auto",
        max_new_tokens: int = 256,
        stats_path: str | None = None,
        **merge_fields: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(merge_fields) - set(MERGE_FIELDS))
        if unknown:
            raise ValueError(
                f"--model_args: unknown argument(s) {unknown} for --model {MODEL_NAME}; it takes pretrained, "
                "libra, template, batch_size, device, dtype, attn_implementation, max_new_tokens, stats_path "
                f"and the merge-config fields {list(MERGE_FIELDS)}"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by --model libra; give a number, e.g. 8")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        del max_batch_size  # only meaningful with batch_size=auto
        if device is None:
            local_rank = os.environ.get("LOCAL_RANK")
            device = (f"cuda:{local_rank}" if local_rank else "cuda") if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model, self.processor, self.template = load_for_eval(
            pretrained,
            libra=merge_choice(libra, merge_fields),
            dtype=None if dtype in (None, "auto") else dtype,
            attn_implementation=attn_implementation,
            device=str(self._device),
        )
        if template is not None:
            self.template = template
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pretrained = str(pretrained)
        self.max_new_tokens = int(max_new_tokens)
        self.stats_path = stats_path
        self.visual_tokens = VisualTokenLog()
        from libra_train.inference.generation import find_runtime

        runtime = find_runtime(self.model)
        self.merge_config = runtime.config if runtime is not None else None
        state = "off" if self.merge_config is None else self.merge_config.to_dict()
        logger.info(f"libra: {pretrained} on {self._device}, template {self.template}, compression {state}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # -- requests -> libra-train queries ---------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _query(self, request: Instance) -> Any:
        """The request's user turn, images and videos as a ``Query``; one ``<video>`` / ``<image>`` placeholder
        per video / image, prepended (videos first) when the task's prompt has none (MME, GQA, Video-MME, ... do
        not write them), as LLaVA's and LLaVA-OneVision's evaluations do.

        Visuals (``doc_to_visual``): PIL images; video files (a path with a video suffix: the processor's video
        part decodes and samples it, as lmms-eval's own video models do); a video as a list of PIL frames.
        Both request types carry ``(context, gen_kwargs | continuation, doc_to_visual, doc_id, task, split)``.
        """
        from libra_train.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, is_video_file
        from libra_train.inference.generation import Query

        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        images, videos = [], []
        for visual in visuals or []:
            if isinstance(visual, Image.Image):
                images.append(visual)
            elif isinstance(visual, (str, os.PathLike)) and is_video_file([os.fspath(visual)]):
                videos.append([os.fspath(visual)])
            elif (
                isinstance(visual, (list, tuple))
                and visual
                and all(isinstance(f, Image.Image) for f in visual)
            ):
                videos.append(list(visual))
            else:
                raise ValueError(
                    f"task {task!r}, doc {doc_id}: a {type(visual).__name__} visual ({str(visual)[:80]!r}); "
                    f"--model {MODEL_NAME} takes PIL images, video files and videos as lists of PIL frames"
                )
        text = context
        for placeholder, items, what in (
            (IMAGE_PLACEHOLDER, images, "image"),
            (VIDEO_PLACEHOLDER, videos, "video"),
        ):
            missing = len(items) - context.count(placeholder)
            if missing < 0:
                raise ValueError(
                    f"task {task!r}, doc {doc_id}: the prompt has {context.count(placeholder)} {placeholder} "
                    f"placeholders for {len(items)} {what}(s)"
                )
            text = f"{placeholder}\n" * missing + text
        return Query([("user", text)], images, f"{task}:{doc_id}", videos)

    def _report(self, tasks: Iterable[str]) -> None:
        for task in sorted(set(tasks)):
            means = self.visual_tokens.means(task)
            if means:
                stages = " -> ".join(f"{m:.1f}" for m in means)
                logger.info(f"libra: {task}: visual tokens per LLM stage {stages} (mean of image requests)")
        if self.stats_path:
            text = self.model.config.get_text_config()
            stats = {
                "model": self.pretrained,
                "template": self.template,
                "merge_config": None if self.merge_config is None else self.merge_config.to_dict(),
                "llm": {
                    "num_layers": text.num_hidden_layers,
                    "hidden": text.hidden_size,
                    "intermediate": text.intermediate_size,
                },
                "tasks": self.visual_tokens.summary(),
            }
            Path(self.stats_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.stats_path).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")

    # -- lmms-eval's interface -------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from libra_train.inference.generation import generate

        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups[(task, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="libra generate", disable=self.rank != 0)
        for (task, _), indices in groups.items():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if int(gen_kwargs.get("num_beams") or 1) > 1:
                raise ValueError(
                    f"task {task!r} asks for beam search (num_beams={gen_kwargs['num_beams']}); --model "
                    f"{MODEL_NAME} decodes greedily or samples (override with --gen_kwargs num_beams=1)"
                )
            temperature = float(gen_kwargs.get("temperature") or 0.0)
            do_sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
            for batch in _chunks(indices, self.batch_size):
                queries = [self._query(requests[i]) for i in batch]
                outputs = generate(
                    self.model,
                    self.processor,
                    queries,
                    template=self.template,
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                    do_sample=do_sample,
                    temperature=temperature if do_sample else 1.0,
                    top_p=gen_kwargs.get("top_p") if do_sample else None,
                )
                for i, out in zip(batch, outputs):
                    results[i] = _cut(out.text, until)
                    self.visual_tokens.add(task, out.visual_tokens)
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], results[i])
                bar.update(len(batch))
        bar.close()
        self._report(task for task, _ in groups)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from libra_train.inference.generation import ImageEncoder

        encoder = ImageEncoder(self.processor, self.template, max_length=1 << 30)
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="libra loglikelihood", disable=self.rank != 0)
        for batch in _chunks(requests, self.batch_size):
            samples, tasks = [], []
            for request in batch:
                _, target, _, doc_id, task, split = request.args
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                samples.append(encoder.encode(_record(self._query(request), str(continuation))))
                tasks.append(task)
            scores, counts = score_continuations(self.model, samples, self.tokenizer.pad_token_id)
            for request, task, score, visual in zip(batch, tasks, scores, counts):
                results.append(score)
                self.visual_tokens.add(task, visual)
                self.cache_hook.add_partial("loglikelihood", request.args[:2], score)
            bar.update(len(batch))
        bar.close()
        self._report(request.args[4] for request in requests)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            f"--model {MODEL_NAME} does not implement generate_until_multi_round (multi-round tasks); "
            "single-turn generate_until and loglikelihood tasks are supported"
        )


def _record(query: Any, continuation: str) -> Any:
    """The query with ``continuation`` as the assistant's answer, for the training ``Encoder``."""
    from libra_train.data.records import Record

    if not continuation.strip():
        raise ValueError(f"request {query.id!r}: an empty continuation cannot be scored")
    # lmms-eval prefixes choices with its target delimiter (" "); the template adds its own separator.
    return Record(
        query.id,
        list(query.images),
        [*query.turns, ("assistant", continuation.strip())],
        videos=[list(video) for video in query.videos],
    )
