"""LLaVA-NeXT (anyres: visual counts differ per sample) and Qwen2-VL (M-RoPE) through the same plug-in."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from libra_train import LibraConfig, apply_libra, remove_libra
from libra_train.plugin import libra_runtime, visual_span
from tests.plugin.conftest import IMAGE_TOKEN, PAD, VOCAB, llama_config, tiny_clip_config

CFG = LibraConfig(layers=[1, 3], ratio=0.5)


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return ids, mask


def _rows(counts: list[int], make_row) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [make_row(c, g) for c in counts]


def tiny_llava_next():
    torch.manual_seed(0)
    vision = tiny_clip_config()
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=llama_config(),
        image_token_id=IMAGE_TOKEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    return LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def llava_next_batch(model) -> tuple[dict, list[int]]:
    """Two images of different aspect ratios -> different visual counts; left-padded prompts."""
    image_sizes = torch.tensor([[16, 32], [32, 32]])
    pixel_values = torch.randn(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        ).pooler_output
    counts = [f.shape[0] for f in feats]

    def row(c, g):
        r = torch.randint(4, VOCAB, (3 + c + 4,), generator=g)
        r[3 : 3 + c] = IMAGE_TOKEN
        return r

    ids, mask = _left_padded(_rows(counts, row))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }, counts


def test_llava_next_batched_equals_per_sample_with_different_visual_counts():
    model = tiny_llava_next()
    batch, counts = llava_next_batch(model)
    assert counts[0] != counts[1]
    apply_libra(model, CFG)
    with torch.no_grad():
        out = model(**batch)
        kept = libra_runtime(model).last_visual_tokens
        assert kept[0].tolist() == counts  # stage 0: all visual tokens
        assert kept[1].tolist()[0] <= round(counts[0] * 0.5) + 1
        length = batch["input_ids"].shape[1]
        for b in range(2):
            n = int(batch["attention_mask"][b].sum())
            single = model(
                input_ids=batch["input_ids"][b : b + 1, length - n :],
                attention_mask=batch["attention_mask"][b : b + 1, length - n :],
                pixel_values=batch["pixel_values"][b : b + 1],
                image_sizes=batch["image_sizes"][b : b + 1],
            )
            real, alone = out.libra_attention_mask[b], single.libra_attention_mask[0]
            torch.testing.assert_close(out.logits[b][real], single.logits[0][alone], atol=1e-5, rtol=1e-5)
            assert torch.equal(
                out.libra_position_map[b][real] - (length - n) * (out.libra_position_map[b][real] >= 0),
                single.libra_position_map[0][alone],
            )


def test_llava_next_generation_cached_equals_uncached():
    model = tiny_llava_next()
    batch, _ = llava_next_batch(model)
    apply_libra(model, CFG)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(4):
            with visual_span(None, query_index=torch.full((2,), length - 1)):
                out = model(**{**batch, "input_ids": ids, "attention_mask": mask}, use_cache=False)
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    assert torch.equal(generated, ids)


def tiny_qwen2_vl():
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            mlp_ratio=2,
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
    )
    return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def qwen_batch() -> dict:
    """Qwen2-VL inputs built by hand (its processor needs torchvision): two grids, 16 and 8 visual tokens."""
    thw = torch.tensor([[1, 8, 8], [1, 8, 4]])
    counts = [int(t * h * w) // 4 for t, h, w in thw.tolist()]  # spatial merge 2x2
    patches = int(thw.prod(-1).sum())
    pixel_values = torch.randn(patches, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(4))

    def row(c, g):
        r = torch.randint(8, VOCAB, (3 + c + 2 + 4,), generator=g)
        r[3], r[4 : 4 + c], r[4 + c] = 6, IMAGE_TOKEN, 7
        return r

    ids, mask = _left_padded(_rows(counts, row))
    mm = (ids == IMAGE_TOKEN).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_grid_thw": thw,
        "mm_token_type_ids": mm,
    }


@pytest.mark.parametrize("method", ["libra", "fastv"])
def test_qwen2_vl_batched_equals_per_sample_and_remove_restores(method):
    model = tiny_qwen2_vl()
    batch = qwen_batch()
    with torch.no_grad():
        reference = model(**batch).logits
        apply_libra(model, LibraConfig(method=method, layers=[1, 3] if method == "libra" else [1], ratio=0.5))
        out = model(**batch)
        assert out.logits.shape[1] < batch["input_ids"].shape[1]
        length, offset = batch["input_ids"].shape[1], 0
        for b in range(2):
            n = int(batch["attention_mask"][b].sum())
            patches = int(batch["image_grid_thw"][b].prod())
            single = model(
                input_ids=batch["input_ids"][b : b + 1, length - n :],
                attention_mask=batch["attention_mask"][b : b + 1, length - n :],
                pixel_values=batch["pixel_values"][offset : offset + patches],
                image_grid_thw=batch["image_grid_thw"][b : b + 1],
                mm_token_type_ids=batch["mm_token_type_ids"][b : b + 1, length - n :],
            )
            offset += patches
            torch.testing.assert_close(
                out.logits[b][out.libra_attention_mask[b]], single.logits[0], atol=1e-5, rtol=1e-5
            )
        remove_libra(model)
        assert torch.equal(model(**batch).logits, reference)


def test_qwen2_vl_generation_cached_equals_uncached():
    model = tiny_qwen2_vl()
    batch = qwen_batch()
    apply_libra(model, CFG)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        for _ in range(4):
            with visual_span(None, query_index=torch.full((2,), length - 1)):
                out = model(
                    **{**batch, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm},
                    use_cache=False,
                )
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            mm = torch.cat([mm, torch.zeros(2, 1, dtype=mm.dtype)], 1)
    assert torch.equal(generated, ids)
