"""Shared pieces of the trainer and save-path tests: a tiny LLaVA with its real processor, VQA samples built by
that processor (image tokens expanded, answers supervised), a padding collator and HF ``TrainingArguments``.

The model is ``libra_train.models.build_tiny_llava`` at a smaller width (36 visual tokens, 4 LM layers): the
save paths need a processor (``libra_train.load`` returns one) and TRL's vision collator drives it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings

import numpy as np
import torch
from PIL import Image

from libra_train import LibraConfig, apply_libra
from libra_train.models import build_tiny_llava
from libra_train.plugin.units import default_unit

IGNORE = -100
CFG = LibraConfig(
    layers=[1], ratio=0.5
)  # compress after LM layer 1 of 4: layers 2, 3 see the shorter sequence
N_VISUAL = 36  # 48 px images, patch 8
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
QUESTIONS = (
    ("what colour is the shape at row 1 column 2 ?", "red"),
    ("what shape is at row 2 column 1 ?", "circle"),
    ("how many blue shapes are there ?", "3"),
    ("what colour is the shape at row 2 column 2 ?", "green"),
)


@functools.cache
def _tiny():
    return build_tiny_llava(vision_hidden=32, text_hidden=64, intermediate=128, seed=0)


def applied(config: LibraConfig = CFG) -> LibraConfig:
    """The config ``apply_libra`` applies (and records) on the tiny LLaVA: the family's default unit resolved."""
    return dataclasses.replace(config, unit=config.unit or default_unit(_tiny()[0]))


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
    n_prompt = processor()(images=[image(i)], text=prompt(question), return_tensors="pt")["input_ids"].shape[
        1
    ]
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


def training_args(output_dir, config_class=None, **overrides):
    """CPU ``TrainingArguments`` (or ``config_class``, e.g. TRL's ``SFTConfig``) for a few deterministic fp32
    SGD steps: no logging integrations, no shuffling, no mixed precision."""
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
        bf16=False,  # TRL's SFTConfig defaults to bf16
        train_sampling_strategy="sequential",  # batches in dataset order: the tests know each step's batch
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (config_class or TrainingArguments)(**kwargs)


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model.eval()(**inputs).logits


class LayerLengths:
    """Sequence length each decoder layer saw, per call: ``with LayerLengths(model) as seen: ...``;
    ``seen.lengths[i]`` lists layer ``i``'s. A forward pre-hook registered after Libra's sees what the layer
    gets (Libra's own pre-hook compresses first)."""

    def __init__(self, model) -> None:
        from libra_train.plugin.apply import find_decoder

        self.layers = find_decoder(model).layers
        self.lengths: dict[int, list[int]] = {i: [] for i in range(len(self.layers))}
        self._handles = []

    def _hook(self, idx, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.lengths[idx].append(hidden.shape[1])

    def __enter__(self) -> LayerLengths:
        for idx, layer in enumerate(self.layers):
            hook = functools.partial(self._hook, idx)
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def own_loss_and_metrics(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """The model's own ``labels=`` loss on ``batch`` and, from the same forward, TRL's two metrics computed by
    hand over the compressed sequence: mean entropy and top-1 accuracy of the positions that predict a label."""
    from libra_train.plugin.loss import shift_labels_through_map

    with torch.no_grad():
        out = model(**batch)
    targets = shift_labels_through_map(batch["labels"], out.libra_position_map)
    mask = targets != IGNORE
    logp = torch.log_softmax(out.logits[mask].float(), -1)
    return {
        "loss": out.loss.item(),
        "entropy": (-(logp.exp() * logp).sum(-1)).mean().item(),
        "mean_token_accuracy": (logp.argmax(-1) == targets[mask]).float().mean().item(),
        "length": batch["input_ids"].shape[1],
        "compressed_length": out.logits.shape[1],
    }


@functools.cache
def _fitted_state() -> dict[str, torch.Tensor]:
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = collate(samples(4))
    for _ in range(25):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fitted_model(libra: LibraConfig | None = CFG):
    """The tiny LLaVA after a few AdamW steps on the VQA samples, so that its token accuracy is not zero (a
    metric check on a random model would compare 0 with 0)."""
    model = tiny_model(libra)
    model.load_state_dict(_fitted_state())
    return model
