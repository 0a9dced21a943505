"""Fixtures of the export tests: the tiny LLaVA, checkpoints saved from it, their exports, demo data."""

from __future__ import annotations

import copy

import pytest

from libra_train import apply_libra
from libra_train.data.demo import generate_demo_data
from libra_train.export import export_checkpoint
from libra_train.models import build_tiny_llava
from tests.export.export_helpers import TRAIN_CONFIG, lora_model, save_checkpoint
from tests.threads import _single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="session")
def tiny():
    """(base model without Libra, processor); never modify the model, deep-copy it."""
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo data set: 8 validation samples (3 x 3 boards, 48 px)."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, n_train=2, n_val=8, text_only_fraction=0)
    return root


@pytest.fixture(scope="session")
def trained(tiny):
    """The training-time model: the tiny LLaVA with the demo's compression applied."""
    return apply_libra(copy.deepcopy(tiny[0]), TRAIN_CONFIG)


@pytest.fixture(scope="session")
def checkpoint(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint-7"
    recipe = {"name": "demo", "libra": {"enabled": True, "layers": [1], "ratio": 0.5}}
    return save_checkpoint(folder, tiny[0], tiny[1], libra=TRAIN_CONFIG, recipe=recipe)


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("exports") / "demo")


@pytest.fixture(scope="session")
def lora(tiny, tmp_path_factory):
    """(training-time peft model with Libra, its checkpoint: base weights + adapter + libra_config.json)."""
    model = lora_model(tiny[0], TRAIN_CONFIG)
    folder = save_checkpoint(
        tmp_path_factory.mktemp("lora") / "checkpoint-7",
        tiny[0],
        tiny[1],
        libra=TRAIN_CONFIG,
        recipe={"name": "demo_lora", "libra": {"layers": [1]}},
    )
    model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors beside the base
    return model, folder
