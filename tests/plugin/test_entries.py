"""No silent no-compression, whoever calls the model: every entry into the language model compresses or raises.

Trainers do not all call the outer ``*ForConditionalGeneration`` forward: TRL's fused LM head calls the inner
``LlavaModel`` (``model.model``) directly, and a custom loop may call the text decoder. Each entry must compress
exactly as the outer forward does (the layers after a point see the compressed length), or raise a clear error
where the plug-in cannot tell the visual positions.
"""

from __future__ import annotations

import pytest
import torch

from libra_train import LibraConfig, apply_libra, visual_span
from libra_train.plugin import libra_labels, libra_runtime
from tests.plugin.conftest import N_VISUAL, collate, llava_sample, tiny_llama, tiny_llava

CFG = LibraConfig(layers=[1, 3], ratio=0.5)


def _batch(labels: bool = True) -> dict:
    batch = collate(
        [llava_sample(3, 7, answers=((2, 4), (5, 7)), seed=0), llava_sample(1, 4, answers=((2, 4),), seed=2)]
    )
    if not labels:
        del batch["labels"]
    return batch


def _seen_lengths(model) -> dict[int, int]:
    """Sequence length each decoder layer receives in the next forward (a pre-hook per layer)."""
    seen: dict[int, int] = {}
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"]).shape[1]
            ),
            with_kwargs=True,
        )
    return seen


def test_inner_model_entry_compresses_like_the_outer_forward():
    model = apply_libra(tiny_llava(), CFG)
    seen = _seen_lengths(model)
    batch = _batch()
    outer = model(**batch)
    outer_lengths = dict(seen)
    labels = batch.pop("labels")
    with libra_labels(labels):  # the training query rule, as TRL's glue passes it
        inner = model.model(**batch)
    assert seen == outer_lengths and seen[2] < seen[1] == batch["input_ids"].shape[1]
    assert torch.equal(inner.libra_position_map, outer.libra_position_map)
    torch.testing.assert_close(model.lm_head(inner.last_hidden_state), outer.logits, rtol=1e-6, atol=1e-6)
    assert libra_runtime(model).last_position_map is inner.libra_position_map


def test_inner_entry_without_labels_uses_the_inference_query_and_warns_in_training():
    model = apply_libra(tiny_llava(), CFG).train()
    batch = _batch()
    labels = batch.pop("labels")
    with pytest.warns(UserWarning, match="without labels"):
        no_labels = model.model(**batch)
    with libra_labels(labels):
        with_labels = model.model(**batch)
    # different queries -> different importance -> (here) different targets
    assert not torch.equal(no_labels.libra_position_map, with_labels.libra_position_map)
    model.eval()
    ref = model(**batch)  # eval, no labels: the last-token rule, as the training-mode call without labels
    assert torch.equal(no_labels.libra_position_map, ref.libra_position_map)


def test_decoder_entry_with_inputs_embeds_raises_unless_the_span_is_given():
    model = apply_libra(tiny_llava(), CFG)
    batch = _batch(labels=False)
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    decoder = model.model.language_model
    with pytest.raises(ValueError, match="visual_span"):
        decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    seen = _seen_lengths(model)
    visual = batch["input_ids"] == model.config.image_token_id
    with visual_span(visual):
        out = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert seen[2] < seen[1] and out.last_hidden_state.shape[1] == seen[5]
    assert "libra_position_map" in out
    with visual_span(torch.zeros_like(visual)):  # a text-only call: nothing to compress
        plain = decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert plain.last_hidden_state.shape[1] == batch["input_ids"].shape[1]


def test_outer_forward_with_inputs_embeds_finds_the_placeholders():
    model = apply_libra(tiny_llava(), CFG)
    batch = _batch()
    expected = model(**batch)
    embeds = model.model.get_input_embeddings()(batch.pop("input_ids"))
    got = model(inputs_embeds=embeds, **batch)
    assert torch.equal(got.libra_position_map, expected.libra_position_map)
    torch.testing.assert_close(got.loss, expected.loss)


def test_llama_decoder_entry_with_visual_span():
    model = apply_libra(tiny_llama(), CFG)
    ids = torch.randint(4, 60, (2, 24))
    visual = torch.zeros(2, 24, dtype=torch.bool)
    visual[:, 2 : 2 + N_VISUAL] = True
    with visual_span(visual):
        outer = model(input_ids=ids)
        decoder = model.model(input_ids=ids)
    assert outer.logits.shape[1] < 24 and decoder.last_hidden_state.shape[1] == outer.logits.shape[1]
    torch.testing.assert_close(model.lm_head(decoder.last_hidden_state), outer.logits, rtol=1e-6, atol=1e-6)


def test_position_maps_of_every_stage_and_every_hidden_state():
    model = apply_libra(tiny_llava(), CFG)
    out = model(**_batch(labels=False), output_hidden_states=True)
    maps, hidden = out.libra_position_maps, out.hidden_states
    assert [m.shape[1] for m in maps] == libra_runtime(model).last_widths
    assert len(maps) == len(CFG.layers) + 1 and maps[-1] is out.libra_position_map
    assert [m.shape[1] for m in out.libra_hidden_position_maps] == [h.shape[1] for h in hidden]
    assert len({h.shape[1] for h in hidden}) == 3  # full, after point 1, after point 3


def test_static_cache_is_refused_at_generate_with_a_clear_error():
    model = apply_libra(tiny_llava(), CFG)
    batch = collate([llava_sample(3, 5, answers=(), seed=0)], "left")
    del batch["labels"]
    with pytest.raises(ValueError, match='cache_implementation="static"'):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")
    ids = model.generate(**batch, max_new_tokens=2, do_sample=False)  # the default dynamic cache works
    assert ids.shape[1] == batch["input_ids"].shape[1] + 2
