"""Model building: a tiny LLaVA built from configs (demo, tests) and loading of local HF checkpoints.

Nothing here downloads: the tiny model's tokenizer and image processor are built locally, and real
checkpoints are read from a local folder with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from libra_train.data.demo import demo_vocabulary
from libra_train.data.templates import VICUNA_ROLES, VICUNA_SYSTEM, VICUNA_V1_JINJA

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")  # ids 0..4
MODEL_FAMILIES = {
    "llava": ("LlavaForConditionalGeneration", "llava-hf/llava-1.5-7b-hf"),
    "llava_next": ("LlavaNextForConditionalGeneration", "llava-hf/llava-v1.6-vicuna-7b-hf"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen/Qwen3-VL-8B-Instruct"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
}
# What to install when a processor's video part cannot be built (every transformers video processor imports
# torchvision); the CPU wheel of torchvision next to torch 2.13 does not import (see ENV-FACTS), hence the pin.
TORCHVISION_HINT = (
    "pip install torchvision -c constraints.txt (the torchvision release built for the installed torch; on a CUDA "
    "machine the wheel of the same CUDA build)"
)


def pick_attn_implementation(requested: str = "auto") -> str:
    """``flash_attention_2`` when CUDA and the `flash_attn` package are there, else ``sdpa``; any other
    explicit request (``sdpa``, ``eager``, ...) is returned unchanged."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_tiny_tokenizer(extra_texts: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace + punctuation split) covering vicuna_v1 and the demo data.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, ``<image>`` 4, then the words sorted. It prepends
    ``<s>`` like Llama's, and carries the vicuna_v1 chat template. Whitespace is not kept (decoding joins
    tokens with spaces).
    """
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    corpus = [VICUNA_SYSTEM, *(f"{r}:" for r in VICUNA_ROLES.values()), *demo_vocabulary(), *extra_texts]
    words = sorted({w for text in corpus for w, _ in pre.pre_tokenize_str(text)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
    )
    tokenizer.chat_template = VICUNA_V1_JINJA
    return tokenizer


def clip_llava_processor(
    tokenizer: Any, image_size: int, patch_size: int, chat_template: str | None = None
) -> LlavaProcessor:
    """A LLaVA-1.5 processor as llava-hf's checkpoints configure it, on `tokenizer`, built locally.

    CLIP preprocessing (resize the shortest edge to `image_size`, centre crop, OpenAI CLIP mean/std); one
    ``<image>`` expands to (image_size / patch_size)^2 tokens: the processor counts the CLS token
    (`num_additional_image_tokens=1`) and drops it again (`vision_feature_select_strategy="default"`).
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def build_tiny_llava(
    out_dir: str | os.PathLike | None = None,
    *,
    image_size: int = 48,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int | None = None,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA-1.5 (CLIP tower with CLS token + Llama LM) and its processor.

    One ``<image>`` expands to (image_size / patch_size)^2 tokens (36 by default): the processor counts the
    CLS token (`num_additional_image_tokens=1`) and drops it again (`vision_feature_select_strategy="default"`),
    as the model does. `vision_feature_layer=-1` (LLaVA-1.5 uses -2 of 24 layers; with 2 layers that would
    leave half the tower unused, and unused parameters trouble ZeRO).

    Args:
        out_dir: if given, save model + processor there and check that both load back.
        image_size, patch_size: vision input size and patch size (image_size must be a multiple of patch_size).
        vision_hidden, vision_layers: CLIP width and depth (heads: `heads`; MLP: 4x width).
        text_hidden, text_layers, heads, kv_heads, intermediate: Llama width, depth, heads, KV heads, MLP width.
        vocab: vocabulary size; default (None) = the tokenizer's size; a larger value pads the embedding.
        seed: torch seed for the random initialisation.

    Returns:
        (model in eval mode, fp32, on CPU; processor).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    tokenizer = build_tiny_tokenizer()
    vocab_size = vocab or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    processor = clip_llava_processor(tokenizer, image_size, patch_size, VICUNA_V1_JINJA)
    n_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=vision_hidden,
            intermediate_size=4 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=intermediate,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        reloaded = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
        if reloaded.tokenizer.get_vocab() != tokenizer.get_vocab() or type(reloaded) is not LlavaProcessor:
            raise RuntimeError(f"processor saved in {out_dir} does not load back identically")
        loaded = LlavaForConditionalGeneration.from_pretrained(out_dir, local_files_only=True).state_dict()
        if any(not torch.equal(v, loaded[k]) for k, v in model.state_dict().items()):
            raise RuntimeError(f"model saved in {out_dir} does not load back identically")
    return model, processor


def _check_checkpoint(path: Path, family: str) -> dict[str, Any]:
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(MODEL_FAMILIES)}")
    example = MODEL_FAMILIES[family][1]
    how = (
        f"download one on a machine with network, e.g. `huggingface-cli download {example} --local-dir {path}` "
        "(or `hf download ...`), and copy the folder here"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; {how}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder; {how}"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") and config["model_type"] != family:
        raise ValueError(f"{path} holds a {config['model_type']!r} model, not family={family!r}")
    return config


def load_model_and_processor(
    path: str | os.PathLike,
    *,
    family: str = "llava",
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a local Hugging Face checkpoint folder (no hub access).

    Args:
        path: folder with config.json, weights and processor files (e.g. a copy of llava-hf/llava-1.5-7b-hf).
        family: a key of `MODEL_FAMILIES` (``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``,
            ``llava_onevision``); must match the config's model_type.
        torch_dtype: weight dtype (``torch.bfloat16``, ``"bfloat16"``, ...); None = the checkpoint's.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, or ``auto`` (see
            `pick_attn_implementation`).

    Returns:
        (model, processor).
    """
    path = Path(path)
    _check_checkpoint(path, family)
    model_cls = getattr(transformers, MODEL_FAMILIES[family][0])
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    model = model_cls.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=pick_attn_implementation(attn_implementation),
    )
    return model, load_processor(path)


def processor_without_video(processor_class: type) -> type:
    """`processor_class` without its ``video_processor`` part, under the same name.

    transformers builds, checks and loads a processor's parts by `get_attributes` (the part-named arguments of
    its ``__init__``), and every video processor (even the name of their base class) needs torchvision. A
    subclass whose `get_attributes` leaves ``video_processor`` out has no such part: images and text work as in
    the full processor (`ProcessorMixin.__call__` skips a missing part), ``__init__`` and its saved arguments
    (``num_image_tokens``, ...) are the original ones, and `save_pretrained` writes the original class name, so
    the saved folder loads as the full processor where torchvision is installed (`load_processor` keeps the
    checkpoint's video configuration in ``libra_video_config``, and `save_pretrained` writes it back).
    """

    def get_attributes(cls) -> list[str]:
        return [a for a in processor_class.get_attributes() if a != "video_processor"]

    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        rest = {k: v for k, v in processor_dict.items() if k != "video_processor"}
        return super(subclass, cls).from_args_and_dict(args, rest, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super(subclass, self).to_dict()
        if self.libra_video_config:  # the checkpoint's video part, saved back untouched
            out["video_processor"] = dict(self.libra_video_config)
        return out

    attrs = {
        "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict),
        "to_dict": to_dict,
        "__module__": processor_class.__module__,
        "libra_video_missing": True,
        "libra_video_config": None,
    }
    subclass = type(processor_class.__name__, (processor_class,), attrs)
    return subclass


def load_processor(path: str | os.PathLike) -> Any:
    """``AutoProcessor.from_pretrained(path)``, or, when only its video processor cannot be built because
    torchvision is missing, the same processor without its video part (a warning says what to install).

    Why: the Qwen-VL and LLaVA-OneVision checkpoints ship a video processor, and building it needs torchvision
    even for image-only data; without this, image fine-tuning of those families would need a package it never
    uses. A record with a video then fails in `Encoder` with the install line (`TORCHVISION_HINT`).
    """
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        config = json.loads((Path(path) / "processor_config.json").read_text())
        processor_class = getattr(transformers, config.get("processor_class", ""), None)
        if processor_class is None or "video_processor" not in inspect.signature(processor_class).parameters:
            raise
    processor = processor_without_video(processor_class).from_pretrained(path, local_files_only=True)
    video_file = Path(path) / "video_preprocessor_config.json"  # older checkpoints keep it apart
    processor.libra_video_config = config.get("video_processor") or (
        json.loads(video_file.read_text()) if video_file.is_file() else None
    )
    warnings.warn(
        f"{path}: the processor's video part needs torchvision, which is not installed; loaded it for images and "
        f"text only (samples with a video will fail). For video data: {TORCHVISION_HINT}",
        stacklevel=2,
    )
    return processor
