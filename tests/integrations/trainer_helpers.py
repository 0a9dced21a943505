"""Shared pieces of the trainer and save-path tests: a tiny LLaVA with its real processor, VQA samples built by
that processor (image tokens expanded, answers supervised), a padding collator and HF ``TrainingArguments``.

The model is ``libra_train.models.build_tiny_llava`` at a smaller width (36 visual tokens, 4 LM layers): the
save paths need a processor (``libra_train.load`` returns one) and TRL's vision collator drives it.
"""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from libra_train import LibraConfig, apply_libra
from libra_train.models import build_tiny_llava

IGNORE = -100
CFG = LibraConfig(layers=[1], ratio=0.5)  # compress after LM layer 1 of 4: layers 2, 3 see the shorter sequence
N_VISUAL = 36  # 48 px images, patch 8
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
QUESTIONS = (
    ("what colour is the shape at row 1 column 2 ?", "red"),
    ("what shape is at row 2 column 1 ?", "circle"),
    ("how many blue shapes are there ?", "3"),
    ("what colour is the shape at row 2 column 2 ?", "green"),
)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; several threads on a shared 2-core machine spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _tiny():
    return build_tiny_llava(vision_hidden=32, text_hidden=64, intermediate=128, seed=0)


def tiny_model(libra: LibraConfig | None = CFG):
    """A fresh copy of the tiny LLaVA (train mode off), with ``libra`` applied unless None."""
    model = copy.deepcopy(_tiny()[0])
    return apply_libra(model, libra) if libra is not None else model


def processor():
    return _tiny()[1]


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def sample(i: int) -> dict[str, torch.Tensor]:
    """One VQA sample: ``input_ids``, ``attention_mask``, ``labels`` ``[L]`` (only the answer and ``</s>``
    supervised) and ``pixel_values`` ``[3, 48, 48]``; question ``i % 4`` on image ``i``."""
    question, answer = QUESTIONS[i % len(QUESTIONS)]
    full = processor()(images=[image(i)], text=f"{prompt(question)} {answer} </s>", return_tensors="pt")
    n_prompt = processor()(images=[image(i)], text=prompt(question), return_tensors="pt")["input_ids"].shape[1]
    ids = full["input_ids"][0]
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    return {
        "input_ids": ids,
        "attention_mask": full["attention_mask"][0],
        "labels": labels,
        "pixel_values": full["pixel_values"][0],
    }


def samples(n: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    return [sample(i) for i in range(start, start + n)]


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`sample` dicts into a batch."""
    length = max(s["input_ids"].numel() for s in batch)
    pad = processor().tokenizer.pad_token_id
    out = {
        "input_ids": torch.full((len(batch), length), pad),
        "attention_mask": torch.zeros((len(batch), length), dtype=torch.long),
        "labels": torch.full((len(batch), length), IGNORE),
    }
    for b, s in enumerate(batch):
        n = s["input_ids"].numel()
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][b, :n] = s[key]
    out["pixel_values"] = torch.stack([s["pixel_values"] for s in batch])
    return out


def training_args(output_dir, **overrides):
    """CPU ``TrainingArguments`` for a few deterministic SGD steps (no logging integrations, no shuffling)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingArguments(**kwargs)


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model.eval()(**inputs).logits
