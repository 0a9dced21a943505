"""The Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision recipes on tiny saved checkpoints of their families: the processor
loads without torchvision, the recipe's trainable parts are the ones it states, its dataset builds and feeds the
model, and ``train.py recipe=<name>`` trains two steps with Libra on (ZeRO-3, bf16, gradient checkpointing, as the
recipe says)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from libra_train.config import load_recipe
from libra_train.data import build_dataset, collate
from libra_train.models import load_model_and_processor
from libra_train.training.setup import set_trainable
from tests.fixtures.family_checkpoints import (
    build_model,
    family_tokenizer,
    save_family_checkpoint,
    video_processor_config,
    write_image,
)
from tests.training.train_helpers import read_log, run_train

RECIPES = {"qwen25vl_libra": "qwen2_5_vl", "qwen3vl_libra": "qwen3_vl", "llava_ov_libra": "llava_onevision"}
QUESTION = "what colour is the shape ?"
# The tiny models have 6 layers; the tiny Qwen3-VL has 2 DeepStack layers, so its first allowed point is 1.
TINY_POINTS = "libra.layers=[1,3]"


def _records() -> list[dict]:
    """Two image samples of different sizes (different visual counts) and a text-only one."""
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red circle"}]
    text = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "blue"}]
    return [
        {"id": "square", "image": "a.png", "conversations": turns},
        {"id": "wide", "image": "b.png", "conversations": turns},
        {"id": "text", "conversations": text},
        {"id": "square2", "image": "a.png", "conversations": turns},
    ]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny checkpoints (one per new family) and the data: ``{family: dir, "data": json, "images": dir}``."""
    root = tmp_path_factory.mktemp("families")
    dirs = {family: save_family_checkpoint(family, root / family) for family in RECIPES.values()}
    write_image(root / "images" / "a.png", (16, 16), seed=0)
    write_image(root / "images" / "b.png", (32, 12), seed=1)
    (root / "data.json").write_text(json.dumps(_records()))
    return {**dirs, "data": root / "data.json", "images": root / "images"}


def _overrides(dirs: dict[str, Path], recipe: str) -> list[str]:
    return [
        f"model.path={dirs[RECIPES[recipe]]}",
        f"data.train={dirs['data']}",
        f"data.image_folder={dirs['images']}",
    ]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_the_projector_and_freezes_the_tower(recipe):
    # The Qwen-VL patch mergers sit inside model.visual: they were frozen with the tower before set_trainable
    # matched the projector first (train_projector=true had no effect on any Qwen recipe).
    cfg = load_recipe(recipe, ["model.path=x", "data.train=x", "data.image_folder=x"])
    model = build_model(RECIPES[recipe], family_tokenizer())
    set_trainable(model, cfg)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    projector = [n for n in grads if "merger" in n or "multi_modal_projector" in n]
    tower = [n for n in grads if ("visual." in n or "vision_tower" in n) and n not in projector]
    llm = [n for n in grads if "language_model" in n or n.startswith("lm_head")]
    assert projector and tower and llm
    assert all(grads[n] for n in projector) and all(grads[n] for n in llm)
    assert not any(grads[n] for n in tower)


def test_processor_loads_without_torchvision_and_saves_back(family_dirs, tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the full processor loads")
    with pytest.warns(UserWarning, match="pip install torchvision -c constraints.txt"):
        _, processor = load_model_and_processor(family_dirs["llava_onevision"], family="llava_onevision")
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and not hasattr(processor, "video_processor")
    assert processor.num_image_tokens == 16  # the processor's own arguments are kept
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaOnevisionProcessor" and saved["num_image_tokens"] == 16
    # the checkpoint's video part is written back, so a machine with torchvision loads the full processor
    assert saved["video_processor"] == video_processor_config("llava_onevision")  # as the checkpoint holds it


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dataset_feeds_its_model(family_dirs, recipe):
    cfg = load_recipe(recipe, _overrides(family_dirs, recipe))
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # no torchvision here: the processor loads without videos
        model, processor = load_model_and_processor(cfg.model.path, family=cfg.model.family)
    dataset = build_dataset(
        cfg.data.train,
        processor,
        image_folder=cfg.data.image_folder,
        template=cfg.data.template,
        max_length=cfg.data.max_length,
    )
    samples = [dataset[i] for i in range(len(dataset))]
    tok = processor.tokenizer
    for s in samples:  # the answer and the end of turn are trained, nothing else
        assert tok.convert_ids_to_tokens(s["labels"][s["labels"] != -100]) in (
            ["red", "circle", "<|im_end|>"],
            ["blue", "<|im_end|>"],
        )
    image_id = tok.convert_tokens_to_ids("<image>")
    counts = [int((s["input_ids"] == image_id).sum()) for s in samples]
    assert counts[0] == counts[3] > 0 and counts[1] not in (0, counts[0]) and counts[2] == 0
    batch = collate(samples, tok.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss  # the model accepts the batch: image features match the image tokens
    assert torch.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_through_train_py(family_dirs, recipe, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *_overrides(family_dirs, recipe),
        TINY_POINTS,
        "train.max_steps=2",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "data.num_workers=0",
        "logging.wandb=false",
        "logging.progress=false",
    ]
    stdout = run_train(out, overrides, recipe=recipe, timeout=300)
    assert f"recipe {recipe}: 1 process(es), ZeRO-3, bf16" in stdout
    steps, _ = read_log(out)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    for r in steps:  # three stages: all visual tokens, then fewer after each point
        first, *later = r["visual_tokens"]
        assert first > later[0] > later[1] > 0
    saved = json.loads((out / "checkpoint-2" / "libra_config.json").read_text())
    assert saved["unit"] == "frame" and saved["layers"] == [1, 3]
