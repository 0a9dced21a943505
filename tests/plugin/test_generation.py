"""Cached generation == the uncached forward with the same compression decision.

Greedy ``generate`` compresses in prefill and decodes against a compressed KV cache with per-stage masks. The
reference re-runs the whole uncached forward on ``prompt + generated`` at every step, with the importance
pinned to the last prompt token (``visual_span(None, query_index=...)``) so that it compresses exactly as the
prefill did; its last-position logits must be the step's logits and their argmax the generated token.
"""

from __future__ import annotations

import pytest
import torch

from libra_train import LibraConfig, apply_libra, visual_span
from libra_train.plugin import libra_runtime
from tests.plugin.conftest import N_VISUAL, collate, llava_sample, tiny_llama, tiny_llava

NEW_TOKENS = 6
CONFIGS = {
    "libra": LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9),
    "fastv": LibraConfig(method="fastv", layers=[2], ratio=0.5),
}
BATCHES = {
    "single": [llava_sample(3, 5, answers=(), seed=0)],
    "left-padded": [llava_sample(3, 5, answers=(), seed=0), llava_sample(1, 2, answers=(), seed=2)],
    "with-text-only": [
        llava_sample(2, 4, answers=(), seed=3),
        llava_sample(4, 9, image=False, answers=(), seed=4),
    ],
}


def _uncached_step_logits(model, batch: dict, sequences: torch.Tensor, step: int) -> torch.Tensor:
    """Last-position logits ``[B, V]`` of the full uncached forward on the prompt + the first ``step`` new tokens."""
    prompt = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(len(sequences), step, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate gives a left-padded batch
    extra = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}
    with visual_span(None, query_index=torch.full((len(sequences),), prompt - 1)), torch.no_grad():
        out = model(
            input_ids=sequences[:, : prompt + step],
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            **extra,
        )
    return out.logits[:, -1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_cached_generation_equals_uncached_forward(attn, method, batch_name):
    samples = BATCHES[batch_name]
    batch = collate(samples, "left")
    del batch["labels"]
    model = apply_libra(tiny_llava(attn), CONFIGS[method])
    with torch.no_grad():
        gen = model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt = batch["input_ids"].shape[1]
    assert gen.sequences.shape[1] == prompt + NEW_TOKENS

    # the prefill compressed the image samples, and the KV cache after the first point is shorter
    counts = libra_runtime(model).last_visual_tokens
    has_image = torch.tensor([s["pixel_values"] is not None for s in samples])
    assert torch.equal(counts[0], torch.where(has_image, N_VISUAL, 0))
    assert (counts[-1][has_image] < N_VISUAL).all()
    cache = gen.past_key_values
    assert len(cache._libra_stages) == len(CONFIGS[method].layers)
    first = CONFIGS[method].layers[0]
    full, short = cache.get_seq_length(0), cache.get_seq_length(first + 1)
    assert full == prompt + NEW_TOKENS - 1
    assert short == cache._libra_stages[0].valid.shape[1] + NEW_TOKENS - 1 < full

    for step in range(NEW_TOKENS):
        expected = _uncached_step_logits(model, batch, gen.sequences, step)
        torch.testing.assert_close(gen.logits[step], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(expected.argmax(-1), gen.sequences[:, prompt + step])


@pytest.mark.parametrize("method", list(CONFIGS))
def test_batched_generation_equals_per_sample(method):
    """Each prompt of a left-padded batch generates what it generates alone."""
    samples = BATCHES["left-padded"]
    model = apply_libra(tiny_llava(), CONFIGS[method])
    batch = collate(samples, "left")
    del batch["labels"]
    kwargs = dict(
        max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)
        for b, sample in enumerate(samples):
            single = collate([sample])
            del single["labels"]
            alone = model.generate(**single, **kwargs)
            assert torch.equal(alone.sequences[0, -NEW_TOKENS:], together.sequences[b, -NEW_TOKENS:])
            for step in range(NEW_TOKENS):
                torch.testing.assert_close(
                    alone.logits[step][0], together.logits[step][b], rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_model_with_visual_span_generates_like_the_uncached_forward(attn):
    """A Llama given the visual positions with ``visual_span`` (left-padded batch) decodes like the LLaVA path."""
    model = apply_libra(tiny_llama(attn), CONFIGS["libra"])
    ids = torch.randint(4, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 6:14] = True
    with visual_span(visual), torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert len(gen.past_key_values._libra_stages) == 2
    for step in range(NEW_TOKENS):
        step_mask = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], dim=1)
        positions = (step_mask.cumsum(-1) - 1).masked_fill(step_mask == 0, 0)
        step_visual = torch.cat([visual, torch.zeros(2, step, dtype=torch.bool)], dim=1)
        with visual_span(step_visual, query_index=torch.full((2,), 19)), torch.no_grad():
            out = model(
                input_ids=gen.sequences[:, : 20 + step],
                attention_mask=step_mask,
                position_ids=positions,
                use_cache=False,
            )
        torch.testing.assert_close(gen.logits[step], out.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.logits[:, -1].argmax(-1), gen.sequences[:, 20 + step])
