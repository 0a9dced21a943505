"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA-OneVision models and hand-built inputs (no hub, no processor).

The processors of these families need torchvision (absent on the CPU machines), so the inputs are built here the
way the processors lay them out, with the visual token counts taken from the model itself. What each family does
inside the language model, as read in transformers 5.24 (``transformers/models/<family>/modeling_<family>.py``)
and checked by ``test_new_families.py``:

**Qwen2-VL / Qwen2.5-VL** (``Qwen2_5_VLForConditionalGeneration``).
- Decoder: ``model.model.language_model`` (``Qwen2_5_VLTextModel``); its layers have ``self_attn.layer_idx``, the
  vision tower has ``blocks`` (no ``layers``), so ``find_decoder`` finds the text model unchanged.
- Visual positions: ``input_ids == image_token_id`` (images) or ``== video_token_id`` (videos); each image or
  video is one contiguous run between a ``vision_start_token_id`` and a ``vision_end_token_id`` (text tokens with
  ordinary embeddings). ``mm_token_type_ids`` (0 text, 1 image, 2 video) is required to build the positions.
  An image of ``grid_thw = (t, h, w)`` patches gives ``t * h * w / merge**2`` tokens, in ``t`` temporal groups of
  ``h * w / merge**2`` (a video's "frames" after the temporal patch of 2 raw frames).
- Rotary (M-RoPE): ``get_rope_index`` gives ``position_ids [3, B, L]``: text tokens the same id on the three axes,
  visual tokens ``(t, h, w)`` offset by the position where the image starts; Qwen2.5-VL scales the temporal axis
  of videos by ``tokens_per_second * second_per_grid_ts`` (time-scaled positions; images unscaled); text after an
  image continues at ``start + max(h, w) / merge``. The rotary module mixes the axes into ``cos``/``sin`` of
  shape ``[B, L, head_dim]`` (``recomposition_frequencies``: each ``mrope_section`` chunk reads its axis), so
  gathering ``cos``/``sin`` along ``L`` keeps every token's own 3-axis phase.
- The decoder layers get ``position_ids=None`` (text positions are passed only for packed 4-row ids, or by
  ``generate``, which passes ``[4, B, L]`` with the text positions in row 0); one causal mask for all layers
  (plus a sliding-window one only when ``use_sliding_window``).
- Decode steps: positions are ``cumsum(attention_mask) - 1 + rope_deltas`` (``rope_deltas`` cached on
  ``model.model`` by the prefill): the ORIGINAL positions continue, which is what Libra's position rule needs.
- Qwen2.5-VL's vision tower uses window attention except in ``fullatt_block_indexes``; the LLM side is unaffected.

**Qwen3-VL** (``Qwen3VLForConditionalGeneration``).
- Decoder: ``model.model.language_model`` (``Qwen3VLTextModel``), found by ``find_decoder``. Its attention applies
  a per-head RMSNorm (``q_norm``, ``k_norm``) to queries and keys before the rotary embedding.
- Rotary: interleaved M-RoPE (``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``: frequency ``i`` reads the
  T axis, except ``i % 3 == 1`` (H) and ``i % 3 == 2`` (W) below ``3 * mrope_section[1|2]``); ``cos``/``sin`` are
  ``[B, L, head_dim]`` as for Qwen2.5-VL; no temporal scaling of video positions.
- Video: ``get_rope_index`` splits every video into one grid per temporal index; the processor writes every frame
  as its own run, ``<timestamp text> <vision_start> frame tokens <vision_end>`` (:func:`qwen_sample` does the same).
- DeepStack: the vision tower also returns ``deepstack_features``: the outputs of the vision blocks listed in
  ``vision_config.deepstack_visual_indexes``, each through its own merger. ``Qwen3VLModel.forward`` builds
  ``visual_pos_masks`` ``[B, L]`` (image | video positions) and ``deepstack_visual_embeds`` (one
  ``[visual tokens of the batch, D]`` per index) and passes them to the text model, whose decoder loop adds
  ``deepstack_visual_embeds[i]`` to the OUTPUT of decoder layer ``i`` at ``visual_pos_masks``, for
  ``i < len(deepstack_visual_embeds)`` (``Qwen3VLTextModel._deepstack_process``, called in the loop after the layer
  returns: no hook of the layer sees it; the forward pre-hook of layer ``i + 1`` sees the sum). A compression point
  ``l`` (output of layer ``l`` compressed before layer ``l + 1``) is therefore harmless when
  ``l >= len(deepstack_visual_indexes) - 1``; before that, the next addition indexes the shortened hidden states
  with the full-length mask and fails. The first allowed point is ``len(deepstack_visual_indexes) - 1`` (2 for the
  released checkpoints, whose towers list 3 DeepStack blocks).

**LLaVA-OneVision** (``LlavaOnevisionForConditionalGeneration``, SigLIP tower, Qwen2 LM).
- Decoder: ``model.model.language_model`` (``Qwen2Model``); SigLIP's attention has no ``layer_idx``.
- Visual positions: ``image_token_index`` and ``video_token_index`` (aliased ``image_token_id`` /
  ``video_token_id``, so the plug-in's id lookup finds both).
- Images (``anyres_max_9``): one base tile (``(image_size / patch)**2`` tokens, no newline), then the un-padded
  high-resolution grid of tiles with one ``image_newline`` token after every row (resampled down when it holds
  more than about 9 tiles' worth): the count depends on the aspect ratio. A sample with several images
  (``batch_num_images > 1``) gets one tile plus one newline per image. The newline vectors sit at image-token
  positions, so they are visual tokens to the plug-in.
- Video: every frame through the tower, projected, 2x2 bilinear pooling (``ceil(h / 2) * ceil(w / 2)`` tokens a
  frame), the frames concatenated, then ONE ``image_newline`` after the last frame: ``F * p + 1`` video tokens.
- Rotary: plain 1-D RoPE (``[B, L, head_dim]``); positions ``0..L-1`` (``generate``: ``cumsum(mask) - 1``).
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from tests.plugin.conftest import IGNORE, PAD, TEXT_KWARGS, VOCAB

IMAGE, VIDEO, VISION_START, VISION_END = 3, 5, 6, 7  # token ids of the tiny configs; text ids are 8..VOCAB-1
PATCH_DIM = 3 * 2 * 2 * 2  # channels * temporal patch * patch * patch of the tiny Qwen towers
MERGE = 2  # spatial merge of the tiny Qwen towers

# The tiny text model of all three Qwen families: 6 layers, 4 heads, 2 KV heads, head_dim 8 (4 rotary frequencies
# split 2 / 1 / 1 over T / H / W).
QWEN_TEXT = dict(
    TEXT_KWARGS, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
)
QWEN_IDS = dict(
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
)


_TOWER = dict(num_heads=2, patch_size=2, spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3)
_TOWER_2 = dict(_TOWER, depth=2, hidden_size=16, intermediate_size=32, out_hidden_size=32)  # 2.5-VL and 3-VL


def _qwen_model(config_class, model_class, vision: dict, attn: str, seed: int, **text):
    torch.manual_seed(seed)
    config = config_class(text_config=dict(QWEN_TEXT, **text), vision_config=vision, **QWEN_IDS)
    return model_class._from_config(config, attn_implementation=attn).eval()


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, **text) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL: 1-block tower (patch 2, merge 2), the 6-layer text model above (``text``: its overrides)."""
    vision = dict(_TOWER, depth=1, embed_dim=16, hidden_size=32, mlp_ratio=2)
    return _qwen_model(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, attn, seed, **text)


def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 2-block tower, block 0 windowed (window 8 px = 2x2 merged tokens), block 1 full attention."""
    vision = dict(_TOWER_2, window_size=8, fullatt_block_indexes=[1], tokens_per_second=2)
    return _qwen_model(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, attn, seed)


DEEPSTACK_LAYERS = 2  # the tiny Qwen3-VL adds DeepStack features to the outputs of LLM layers 0 and 1


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: 2-block tower, both blocks DeepStack sources (LLM layers 0 and 1 get their features)."""
    vision = dict(
        _TOWER_2, num_position_embeddings=16, deepstack_visual_indexes=list(range(DEEPSTACK_LAYERS))
    )
    return _qwen_model(Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision, attn, seed, head_dim=8)


def qwen_sample(
    segments: list[tuple[str, object]],
    *,
    answers: tuple[tuple[int, int], ...] = (),
    frames_as_runs: bool = False,
    seed: int = 0,
) -> dict:
    """One unpadded Qwen-VL sample laid out as the processor does.

    Args:
        segments: ``("text", n)``, ``("image", (t, h, w))`` or ``("video", (t, h, w))`` in patches; each visual
            segment becomes ``<vision_start> tokens <vision_end>``.
        answers: ``[start, end)`` spans of the LAST text segment that are supervised (labels = ids).
        frames_as_runs: Qwen3-VL's video layout: every temporal index its own run, preceded by one timestamp
            text token.
        seed: for the text ids and the pixel values.

    Returns:
        ``input_ids``, ``labels``, ``mm_token_type_ids`` ``[L]`` and, when present, ``pixel_values`` /
        ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw`` (this sample's rows).
    """
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    types: list[int] = []
    pixels = {"image": [], "video": []}
    grids = {"image": [], "video": []}
    for kind, spec in segments:
        if kind == "text":
            ids += torch.randint(8, VOCAB, (spec,), generator=g).tolist()
            types += [0] * spec
            start_of_last_text = len(ids) - spec
            continue
        t, h, w = spec
        token, type_id = (IMAGE, 1) if kind == "image" else (VIDEO, 2)
        pixels[kind].append(torch.randn(t * h * w, PATCH_DIM, generator=g))
        grids[kind].append(torch.tensor([t, h, w]))
        per_group = h * w // MERGE**2
        runs = [per_group] * t if (kind == "video" and frames_as_runs) else [t * per_group]
        for run in runs:
            if kind == "video" and frames_as_runs:  # the frame's timestamp, as text
                ids.append(int(torch.randint(8, VOCAB, (1,), generator=g)))
                types.append(0)
            ids += [VISION_START] + [token] * run + [VISION_END]
            types += [0] + [type_id] * run + [0]
    input_ids = torch.tensor(ids)
    labels = torch.full_like(input_ids, IGNORE)
    for start, end in answers:
        where = slice(start_of_last_text + start, start_of_last_text + end)
        labels[where] = input_ids[where]
    sample = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": torch.tensor(types)}
    for kind, (pix_key, grid_key) in {
        "image": ("pixel_values", "image_grid_thw"),
        "video": ("pixel_values_videos", "video_grid_thw"),
    }.items():
        if pixels[kind]:
            sample[pix_key] = torch.cat(pixels[kind])
            sample[grid_key] = torch.stack(grids[kind])
    return sample


def _pad_rows(samples: list[dict], keys: dict[str, int], side: str) -> tuple[dict, torch.Tensor]:
    """Pad the ``[L]`` tensors named in ``keys`` (name -> fill value) into ``[B, L]``; return them and the mask."""
    length = max(s["input_ids"].numel() for s in samples)
    out = {key: torch.full((len(samples), length), fill, dtype=torch.long) for key, fill in keys.items()}
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        where = slice(length - n, length) if side == "left" else slice(0, n)
        for key in keys:
            out[key][b, where] = s[key]
        mask[b, where] = 1
    return out, mask


def collate_qwen(samples: list[dict], side: str = "left", labels: bool = False) -> dict:
    """Batch :func:`qwen_sample` outputs: padded ids, mask, ``mm_token_type_ids`` (and labels), visual rows joined."""
    keys = {"input_ids": PAD, "mm_token_type_ids": 0, **({"labels": IGNORE} if labels else {})}
    batch, mask = _pad_rows(samples, keys, side)
    batch["attention_mask"] = mask
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        rows = [s[key] for s in samples if key in s]
        if rows:
            batch[key] = torch.cat(rows)
    return batch


# -- LLaVA-OneVision -----------------------------------------------------------------------------------------------
OV_IMAGE, OV_VIDEO = 3, 5
OV_TILE = 16  # px; patch 4: 16 tokens a tile, 4 a pooled video frame


# 2-layer SigLIP (16 px tiles, patch 4) and the model's settings besides the towers and token ids.
OV_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=OV_TILE,
    patch_size=4,
)
OV_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
OV_SETTINGS = dict(
    vision_feature_select_strategy="full",
    vision_feature_layer=-1,
    image_grid_pinpoints=OV_PINPOINTS,
    vision_aspect_ratio="anyres_max_9",
)


def tiny_llava_onevision(attn: str = "sdpa", seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision: 2-layer SigLIP (16 px tiles, patch 4), a 6-layer Qwen2 LM, anyres_max_9 over 16/32 px grids."""
    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=OV_VISION,
        text_config=dict(TEXT_KWARGS, model_type="qwen2"),
        image_token_index=OV_IMAGE,
        video_token_index=OV_VIDEO,
        **OV_SETTINGS,
    )
    return LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn).eval()


def onevision_counts(
    model, image_sizes: list[tuple[int, int]] = (), frames: int = 0
) -> tuple[list[int], int]:
    """Visual tokens of each (single-image-sample) image of these sizes, and of a video of ``frames`` frames."""
    counts = []
    if image_sizes:
        pixels = torch.zeros(len(image_sizes), 5, 3, OV_TILE, OV_TILE)
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=pixels, image_sizes=torch.tensor(image_sizes), return_dict=True
            ).pooler_output
        counts = [f.shape[0] for f in feats]
    video = 0
    if frames:
        with torch.no_grad():
            video = model.model.get_video_features(
                torch.zeros(1, frames, 3, OV_TILE, OV_TILE), return_dict=True
            ).pooler_output.shape[1]
    return counts, video


def onevision_sample(
    model,
    prefix: int,
    suffix: int,
    *,
    image_size: tuple[int, int] | None = None,
    frames: int = 0,
    answers: tuple[tuple[int, int], ...] = (),
    seed: int = 0,
) -> dict:
    """One unpadded LLaVA-OneVision sample: text, one image (anyres, ``pixel_values [5, 3, 16, 16]`` tiles) or one
    video (``pixel_values_videos [frames, 3, 16, 16]``), text; ``answers`` are spans of the suffix."""
    g = torch.Generator().manual_seed(seed)
    if image_size is not None:
        (count,), _ = onevision_counts(model, [image_size])
        token = OV_IMAGE
    else:
        _, count = onevision_counts(model, frames=frames)
        token = OV_VIDEO
    ids = torch.randint(8, VOCAB, (prefix + count + suffix,), generator=g)
    ids[prefix : prefix + count] = token
    labels = torch.full_like(ids, IGNORE)
    for start, end in answers:
        labels[prefix + count + start : prefix + count + end] = ids[
            prefix + count + start : prefix + count + end
        ]
    sample = {"input_ids": ids, "labels": labels, "visual_count": count}
    if image_size is not None:
        sample["pixel_values"] = torch.randn(5, 3, OV_TILE, OV_TILE, generator=g)
        sample["image_sizes"] = torch.tensor(image_size)
    else:
        sample["pixel_values_videos"] = torch.randn(frames, 3, OV_TILE, OV_TILE, generator=g)
    return sample


def collate_onevision(samples: list[dict], side: str = "left", labels: bool = False) -> dict:
    """Batch :func:`onevision_sample` outputs (all image samples or all video samples with equal frame counts)."""
    keys = {"input_ids": PAD, **({"labels": IGNORE} if labels else {})}
    batch, mask = _pad_rows(samples, keys, side)
    batch["attention_mask"] = mask
    if any("pixel_values" in s for s in samples):
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples if "pixel_values" in s])
        batch["image_sizes"] = torch.stack([s["image_sizes"] for s in samples if "image_sizes" in s])
    if any("pixel_values_videos" in s for s in samples):
        batch["pixel_values_videos"] = torch.stack(
            [s["pixel_values_videos"] for s in samples if "pixel_values_videos" in s]
        )
    return batch
