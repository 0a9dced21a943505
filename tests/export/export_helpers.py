"""Checkpoint-like directories for the export tests, built from the tiny LLaVA (no training, no download).

A "checkpoint" here is what ``libra_train.export.load_checkpoint`` reads directly: a transformers model
directory (weights, config, processor) with ``libra_config.json``, the resolved recipe and, for LoRA, a peft
adapter beside the weights. The in-memory models they were saved from are the "training-time" models the
exports are compared against.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from libra_train import LibraConfig, apply_libra
from libra_train.config.schema import DEFAULT_LORA_TARGETS
from libra_train.infer import Query, build_inputs

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = LibraConfig(layers=[1], ratio=0.5)  # the demo recipe's compression on the 4-layer tiny LLM
N_VISUAL = 36  # tiny LLaVA: 48 px / patch 8 -> 6 x 6


def recipe_text(name: str, libra: dict) -> str:
    libra_yaml = json.dumps(libra)  # JSON is YAML
    head = f"# Resolved recipe '{name}'\nrecipe_name: {name}\n"
    return f"{head}data:\n  template: vicuna_v1\nlibra: {libra_yaml}\n"


def save_checkpoint(
    folder: Path, model, processor, *, libra: LibraConfig | None, recipe: dict | None
) -> Path:
    """``model`` (without Libra) + processor + merge config + recipe, as a checkpoint directory."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if libra is not None:
        libra.save_pretrained(folder)
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe_text(recipe["name"], recipe["libra"]))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    return folder


def lora_model(base, cfg: LibraConfig, seed: int = 1):
    """The training-time LoRA model: Libra applied to a copy of ``base``, then a peft adapter with random
    (non-zero) weights so that merged and unmerged differ from the base."""
    model = apply_libra(copy.deepcopy(base), cfg)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS, init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def queries(demo: Path, n: int = 2) -> list[Query]:
    """``n`` demo questions of different lengths (so a batch is left-padded), one image each."""
    texts = ["what colour is the shape at row 1 column 2 ?", "how many red shapes are there ?"]
    return [Query.single(texts[i % 2], f"val_{i:05d}.png", f"q{i}") for i in range(n)]


def batch(processor, demo: Path, n: int = 2):
    return build_inputs(processor, queries(demo, n), "vicuna_v1", demo / "images")


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"libra_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
