"""Held-out evaluation: answer loss and short-answer accuracy.

* Loss: mean over the supervised tokens of the split (sums and counts reduced over ranks), the same
  token-level definition as the training loss. Each batch asks the model for the *sum* of its token losses
  (``num_items_in_batch=1``, transformers' sum-then-divide rule); padding samples of a rank's shard get no label.
* Accuracy: the prompt of each sample is its tokens up to the first answer token (for vicuna_v1 that ends with
  ``ASSISTANT:``, exactly the generation prompt); the model, in eval mode with its KV cache (and Libra compressing
  the prefill when applied), greedily generates a few tokens; the first word of the first line, lower-cased and
  stripped of punctuation, must equal that of the reference (the first answer). Multi-turn samples are scored on
  their first answer only.
* Accuracy per question type: the type of a sample's first answer as the data gives it (the records'
  ``question_types``, which the demo generator writes; see ``libra_train.data.records``); untyped samples count
  in the overall accuracy only. The types are those of the whole split, sorted, so every rank reduces the same
  vector.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from libra_train.data import IGNORE_INDEX, SupervisedDataset, collate
from libra_train.training.dist import all_reduce_sum

MAX_NEW_TOKENS = 8  # short answers; a word-level or SentencePiece answer word and its end token fit


def normalize_answer(text: str) -> str:
    """The first word of the first non-empty line, lower-cased, without surrounding punctuation."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    words = lines[0].split() if lines else []
    return words[0].lower().strip(string.punctuation) if words else ""


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Move a batch; floating tensors (pixel values) take the compute dtype."""
    return {
        k: v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        for k, v in batch.items()
    }


def answer_prompt(sample: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Cut a sample before its first answer: (the per-token tensors of the prompt, the reference answer ids)."""
    labels = sample["labels"]
    supervised = (labels != IGNORE_INDEX).nonzero().flatten()
    start = int(supervised[0])
    rest = (labels[start:] == IGNORE_INDEX).nonzero().flatten()
    end = start + int(rest[0]) if len(rest) else len(labels)
    length = len(sample["input_ids"])
    prompt = {k: v[:start] for k, v in sample.items() if k != "labels" and v.dim() == 1 and len(v) == length}
    return prompt, labels[start:end]


def collate_prompts(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts (generation appends on the right) plus the samples' per-image tensors."""
    prompts = [answer_prompt(s)[0] for s in samples]
    length = max(len(p["input_ids"]) for p in prompts)
    batch: dict[str, torch.Tensor] = {}
    for key in prompts[0]:
        pad = pad_token_id if key == "input_ids" else 0
        rows = [torch.cat([v.new_full((length - len(v),), pad), v]) for v in (p[key] for p in prompts)]
        batch[key] = torch.stack(rows)  # [B, L]
    for key in sorted({k for s in samples for k in s} - set(prompts[0]) - {"labels"}):
        batch[key] = torch.cat([s[key] for s in samples if key in s])  # [sum n_img, ...]
    return batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SupervisedDataset,
    shard: Sequence[tuple[int, bool]],
    processor: Any,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    synced_gpus: bool = False,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on this rank's ``shard`` (from `batches.eval_shard`), reduced over ranks.

    Args:
        model: the model (``engine.module``); put in eval mode here, the caller restores train mode.
        dataset: the evaluation split.
        shard: ``(index, counted)`` pairs; uncounted ones only keep ranks in step.
        processor: for the pad id and for decoding.
        batch_size: samples per forward.
        device, dtype: where the batches go and the floating dtype of pixel values.
        synced_gpus: ZeRO-3 with several ranks: keep generating until every rank is done.

    Returns:
        ``eval_loss``, ``eval_accuracy`` (fraction) and ``eval_samples``; for each question type ``T`` found in
        the split with at least one evaluated sample, ``eval_accuracy/T`` and ``eval_samples/T``.
    """
    model.eval()
    tokenizer = processor.tokenizer
    types = first_question_types(dataset)
    names = sorted({t for t in types if t is not None})
    slot = {t: 4 + 2 * k for k, t in enumerate(names)}  # type -> index of its (correct, samples) pair
    # loss sum, supervised tokens, correct, samples, then (correct, samples) per type
    totals = torch.zeros(4 + 2 * len(names), dtype=torch.float64)
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        samples = [dataset[i] for i, _ in chunk]
        counted = torch.tensor([c for _, c in chunk])
        batch = collate(samples, tokenizer.pad_token_id)
        labels = batch.pop("labels").masked_fill(~counted[:, None], IGNORE_INDEX)
        out = model(
            **to_device(batch, device, dtype), labels=labels.to(device), num_items_in_batch=1, use_cache=False
        )
        totals[0] += float(out.loss)
        totals[1] += int((labels[:, 1:] != IGNORE_INDEX).sum())

        prompts = to_device(collate_prompts(samples, tokenizer.pad_token_id), device, dtype)
        generated = model.generate(
            **prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )[:, prompts["input_ids"].shape[1] :]
        for (index, _), sample, ids, keep in zip(chunk, samples, generated, counted.tolist()):
            if keep:
                reference = tokenizer.decode(answer_prompt(sample)[1], skip_special_tokens=True)
                prediction = tokenizer.decode(ids, skip_special_tokens=True)
                ok = normalize_answer(prediction) == normalize_answer(reference)
                totals[2] += ok
                totals[3] += 1
                if types[index] is not None:
                    totals[slot[types[index]]] += ok
                    totals[slot[types[index]] + 1] += 1
    loss_sum, tokens, correct, n, *per_type = all_reduce_sum(totals).tolist()
    result: dict[str, float] = {
        "eval_loss": loss_sum / max(tokens, 1),
        "eval_accuracy": correct / max(n, 1),
        "eval_samples": int(n),
    }
    for name, k in slot.items():
        right, seen = per_type[k - 4], per_type[k - 3]
        if seen:
            result[f"eval_accuracy/{name}"] = right / seen
            result[f"eval_samples/{name}"] = int(seen)
    return result


def first_question_types(dataset: SupervisedDataset) -> list[str | None]:
    """The question type of each item's first answer (None where the data gives none), by item index."""
    column = dataset.records["question_types"]
    return [(column[i] or [None])[0] for i in dataset.indices]


def format_per_type(result: dict[str, float]) -> str:
    """``"; colour 80.0% of 50, count ..."`` from an `evaluate` result; empty without typed samples."""
    names = [key.split("/", 1)[1] for key in result if key.startswith("eval_accuracy/")]
    parts = [f"{t} {100 * result[f'eval_accuracy/{t}']:.1f}% of {result[f'eval_samples/{t}']}" for t in names]
    return "; " + ", ".join(parts) if parts else ""
