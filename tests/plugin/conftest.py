"""Tiny models built from configs (random weights, no download) for the plug-in tests."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from tests.threads import _single_thread  # noqa: F401 (autouse fixture)

IMAGE_TOKEN = 3
PAD = 0
VOCAB = 64


# The tiny 6-layer text model of every test family (Llama here; Qwen2 / Qwen-VL text models in family_models.py).
TEXT_KWARGS = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TEXT_KWARGS, **overrides})


def tiny_clip_config() -> CLIPVisionConfig:
    """A 2-layer CLIP tower: 16 px images, patch 4, so 16 visual tokens per image."""
    return CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0, **text_overrides) -> LlavaForConditionalGeneration:
    """LLaVA with a 2-layer CLIP tower (16 px images, patch 4: 16 visual tokens) and a 6-layer Llama."""
    torch.manual_seed(seed)
    vision = tiny_clip_config()
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(**text_overrides),
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn)
    return model.eval()


def tiny_llama(attn: str = "sdpa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(llama_config(**overrides), attn_implementation=attn).eval()


N_VISUAL = 16  # (16 / 4) ** 2


def llava_inputs(batch: int = 2, prefix: int = 3, suffix: int = 5, seed: int = 1, pad: tuple[int, ...] = ()):
    """input_ids [B, L] with one image (16 tokens) after ``prefix`` text tokens, pixel_values, attention_mask.

    ``pad[b]`` right-pads sample b with that many padding tokens (shortening its suffix).
    """
    g = torch.Generator().manual_seed(seed)
    length = prefix + N_VISUAL + suffix
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    ids[:, prefix : prefix + N_VISUAL] = IMAGE_TOKEN
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad):
        if p:
            ids[b, length - p :] = PAD
            mask[b, length - p :] = 0
    pixels = torch.randn(batch, 3, 16, 16, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture
def llava():
    return tiny_llava()


IGNORE = -100


def llava_sample(
    prefix: int = 3,
    suffix: int = 6,
    *,
    image: bool = True,
    answers: tuple[tuple[int, int], ...] = ((2, 4),),
    seed: int = 0,
) -> dict:
    """One unpadded LLaVA sample: ``input_ids [L]``, ``labels [L]`` and ``pixel_values [3, 16, 16]`` (or None).

    ``prefix`` text tokens, the image (16 tokens, absent when ``image=False``), ``suffix`` text tokens;
    ``answers`` are ``[start, end)`` spans inside the suffix that are supervised (labels = ids), the rest is -100.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = N_VISUAL if image else 0
    ids = torch.randint(4, VOCAB, (prefix + n_img + suffix,), generator=g)
    ids[prefix : prefix + n_img] = IMAGE_TOKEN
    labels = torch.full_like(ids, IGNORE)
    for start, end in answers:
        labels[prefix + n_img + start : prefix + n_img + end] = ids[
            prefix + n_img + start : prefix + n_img + end
        ]
    pixels = torch.randn(3, 16, 16, generator=g) if image else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate(samples: list[dict], side: str = "right") -> dict:
    """Pad samples from :func:`llava_sample` into a batch (``pixel_values`` only for samples with an image).

    Returns ``input_ids``, ``attention_mask``, ``labels`` and, when some sample has an image, ``pixel_values``.
    """
    length = max(s["input_ids"].numel() for s in samples)
    ids = torch.full((len(samples), length), PAD, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        where = slice(length - n, length) if side == "left" else slice(0, n)
        ids[b, where], labels[b, where], mask[b, where] = s["input_ids"], s["labels"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    return batch


def assert_cached_generation_equals_uncached(model, batch: dict, new_tokens: int, extra_zeros=()):
    """Greedy ``generate`` on a left-padded batch equals, step by step, the uncached forward of prompt + generated
    tokens with the same compression decision (the query pinned to the prompt's last token); returns the output.

    ``extra_zeros``: ``[B, L]`` inputs to extend with zeros for each generated token (``mm_token_type_ids``).
    """
    from libra_train.plugin import visual_span

    model.generation_config.eos_token_id = None  # no early stop: every step is compared
    length, bsz = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
    with torch.no_grad():
        gen = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        steps = dict(batch)
        for step in range(new_tokens):
            with visual_span(None, query_index=torch.full((bsz,), length - 1)):
                out = model(**steps, use_cache=False)
            torch.testing.assert_close(gen.logits[step], out.logits[:, -1], rtol=1e-5, atol=1e-5)
            token = gen.sequences[:, length + step : length + step + 1]
            assert torch.equal(out.logits[:, -1].argmax(-1, keepdim=True), token)
            steps["input_ids"] = torch.cat([steps["input_ids"], token], 1)
            steps["attention_mask"] = torch.cat([steps["attention_mask"], torch.ones_like(token)], 1)
            for key in extra_zeros:
                steps[key] = torch.cat([steps[key], torch.zeros_like(token)], 1)
    return gen


def recorded_next_layer_importance(model, config, batch: dict, monkeypatch) -> torch.Tensor:
    """Apply ``config`` (``importance="next_layer"``, one point) to ``model``, run ``batch`` and return the
    next-layer importance the plug-in computed: ``[B, L]``."""
    import libra_train.plugin.state as state_module
    from libra_train import apply_libra

    seen = []
    original = state_module.next_layer_importance

    def record(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(state_module, "next_layer_importance", record)
    apply_libra(model, config)
    with torch.no_grad():
        model(**batch)
    assert len(seen) == 1
    return seen[0]


class ImportanceRecord(NamedTuple):
    """One importance the plug-in recorded (at a compression layer of a prefill)."""

    layer: int
    alpha: torch.Tensor  # [B, L] the query rows' attention, over the sequence that layer holds
    position_map: torch.Tensor  # [B, L] original position of each of those tokens
    query_index: torch.Tensor  # [B, Q] the query rows, in that sequence


@pytest.fixture
def recorded_importance(monkeypatch) -> list[ImportanceRecord]:
    """Every importance the plug-in records from now on, in order."""
    from libra_train.plugin.state import ForwardState

    records: list[ImportanceRecord] = []
    original = ForwardState.record_importance

    def record(self, layer_idx, query, key, scaling):
        original(self, layer_idx, query, key, scaling)
        records.append(
            ImportanceRecord(
                layer_idx,
                self.importance[layer_idx].clone(),
                self.position_map.clone(),
                self.query_index.clone(),
            )
        )

    monkeypatch.setattr(ForwardState, "record_importance", record)
    return records
