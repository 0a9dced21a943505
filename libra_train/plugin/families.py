"""What the plug-in reads of a model family from its config, and the settings a family cannot run with.

Everything here is read once, at ``apply_libra`` time, from the transformers config of the model (no forward).
"""

from __future__ import annotations

import math

from torch import nn

from libra_train.plugin.config import LibraConfig
from libra_train.plugin.units import IMAGE, VIDEO


def visual_token_kinds(model: nn.Module) -> dict[int, int]:
    """Token id -> kind (``IMAGE`` / ``VIDEO``) of the placeholders the multimodal model fills with features.

    ``image_token_index`` / ``video_token_index`` are aliases of the ``*_token_id`` fields in transformers 5.
    """
    config = getattr(model, "config", None)
    kinds: dict[int, int] = {}
    for name, kind in (
        ("image_token_id", IMAGE),
        ("image_token_index", IMAGE),
        ("video_token_id", VIDEO),
        ("video_token_index", VIDEO),
    ):
        value = getattr(config, name, None)
        if isinstance(value, int):
            kinds.setdefault(value, kind)
    return kinds


def spatial_merge(model: nn.Module) -> int:
    """The Qwen-VL towers' spatial merge (``h * w / merge**2`` tokens per temporal group); 1 elsewhere."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    return int(getattr(vision, "spatial_merge_size", 1) or 1)


def video_frame_tokens(model: nn.Module) -> int | None:
    """LLaVA-OneVision's pooled tokens per video frame, ``ceil(s / 2)**2`` with ``s = image_size / patch_size``
    (its ``apply_pooling``: 2x2 bilinear down-sampling of the frame's patch grid); None for other families."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llava_onevision":
        return None
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2) ** 2


def uses_mrope(text_config: object) -> bool:
    """Whether the decoder's rotary embedding is multi-axis (Qwen-VL M-RoPE: ``mrope_section``)."""
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(text_config, name, None)
        if isinstance(rope, dict) and rope.get("mrope_section") is not None:
            return True
    return False


def layer_windows(text_config: object, num_layers: int) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding attention window (None: full causal attention), as transformers decides it.

    ``layer_types`` where the config has them (Qwen2 and the Qwen-VL text models: ``"sliding_attention"`` from
    ``max_window_layers`` on when ``use_sliding_window``); otherwise every layer slides when ``sliding_window`` is set
    (Mistral's rule: its decoder picks ``create_sliding_window_causal_mask`` for all layers). A window ``W`` lets the
    query at ``i`` see keys ``i - W < j <= i`` (``masking_utils.sliding_window_overlay``); after a compression point
    it sees its last ``W`` real tokens of the compressed sequence (``state.real_token_window``).
    """
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    other = sorted({kind for kind in types or () if kind not in ("full_attention", "sliding_attention")})
    if other:  # chunked (Llama 4), linear (Qwen3-Next), ...: masks the plug-in does not rebuild
        raise ValueError(
            f"layer_types {other} of this text model are not supported by Libra-Merging, which rebuilds the masks "
            "of full_attention and sliding_attention layers only after a compression point"
        )
    if window is None:
        return (None,) * num_layers
    if types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in types[:num_layers])


def check_supported(model: nn.Module, config: LibraConfig, text_config: object) -> None:
    """Raise ``ValueError`` for a config the model cannot run correctly, naming what to change.

    - Qwen3-VL's DeepStack adds visual features to the outputs of the first
      ``len(vision_config.deepstack_visual_indexes)`` decoder layers at the full-length visual positions, outside
      the layers (so no hook sees it): a compression point before the last of them would leave the next addition
      indexing the compressed sequence with the full-length mask. Such points are refused; carrying the features
      through the compression would only matter for very early points (the paper's are all allowed).
    - ``positions="renumber"`` is PyramidDrop's rule for 1-D positions; M-RoPE's three axes have no such
      renumbering.
    """
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    deepstack = getattr(vision, "deepstack_visual_indexes", None)
    if deepstack:
        first = len(deepstack) - 1
        early = [layer for layer in config.layers if layer < first]
        if early:
            raise ValueError(
                f"LibraConfig.layers={config.layers}: point(s) {early} come before the last DeepStack layer of "
                f"this {type(model).__name__} (vision_config.deepstack_visual_indexes={list(deepstack)} adds visual "
                f"features to the outputs of decoder layers 0..{first}, at the uncompressed visual positions). The "
                f"first allowed point is {first}: use layers >= {first} (e.g. libra.layers=[{first}, ...])."
            )
    if config.position_rule == "renumber" and uses_mrope(text_config):
        raise ValueError(
            f'LibraConfig.positions="renumber" (method={config.method!r}) renumbers 1-D positions, but this '
            f"{type(model).__name__} uses multi-axis M-RoPE positions, which have no such renumbering. Use "
            'positions="original" (e.g. libra.positions=original), which keeps every token\'s own 3-axis phase.'
        )
