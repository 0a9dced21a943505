"""deepspeed_config: every "auto" filled from the recipe, accumulation per world size, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from libra_train.config import (
    BUNDLED_DEEPSPEED,
    RECIPES_DIR,
    RecipeError,
    deepspeed_config,
    load_recipe,
    offloads_optimizer,
)
from tests.config.recipe_helpers import dummy_overrides


def _values(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    else:
        yield node


@pytest.mark.parametrize("name", BUNDLED_DEEPSPEED)
@pytest.mark.parametrize("world_size", [1, 2])
def test_no_auto_left(name, world_size):
    cfg = load_recipe("llava15_libra", [*dummy_overrides("llava15_libra"), f"train.deepspeed={name}"])
    ds = deepspeed_config(cfg, world_size)
    assert "auto" not in list(_values(ds))
    assert not [k for k in ds if k.startswith("_")]
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    )
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # the loop builds AdamW + LambdaLR


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 8), (2, 4), (8, 1)])
def test_accumulation(world_size, accumulation):
    cfg = load_recipe("llava15_libra", dummy_overrides("llava15_libra"))  # micro 16, global 128
    ds = deepspeed_config(cfg, world_size)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (
        16,
        accumulation,
        128,
    )


def test_demo_one_and_two_processes():
    assert deepspeed_config(load_recipe("demo"), 1)["gradient_accumulation_steps"] == 1
    ds = deepspeed_config(load_recipe("demo", ["train.micro_batch_size=8"]), 2)
    assert (ds["gradient_accumulation_steps"], ds["zero_optimization"]["stage"]) == (1, 2)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(
        RecipeError, match=r"recipes/demo\.yaml: train\.global_batch_size \(16\) must be divisible"
    ):
        deepspeed_config(load_recipe("demo"), 2)
    with pytest.raises(RecipeError, match="world size \\(3\\)"):
        deepspeed_config(load_recipe("llava15_libra", dummy_overrides("llava15_libra")), 3)


def test_bucket_sizes_follow_hidden_size():
    cfg = load_recipe("llava15_libra", dummy_overrides("llava15_libra"))
    zero = deepspeed_config(cfg, 1, hidden_size=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 40960
    default = deepspeed_config(cfg, 1)["zero_optimization"]
    assert default["reduce_bucket_size"] == 500_000_000


def test_fp16_and_clipping_come_from_the_recipe():
    ds = deepspeed_config(load_recipe("demo", ["train.precision=fp16", "train.max_grad_norm=0.5"]), 1)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 0.5


def test_user_json_optimizer_filled_and_unknown_auto_rejected(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
            }
        )
    )
    ds = deepspeed_config(load_recipe("demo", [f"train.deepspeed={path}"]), 1)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "weight_decay": 0.0}
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}))
    with pytest.raises(
        RecipeError, match=r"custom\.json: cannot fill \"auto\" for scheduler\.params\.warmup_num_steps"
    ):
        deepspeed_config(load_recipe("demo", [f"train.deepspeed={path}"]), 1)


def test_offload_needs_cpu_adam():
    cfg = load_recipe("llava15_libra", dummy_overrides("llava15_libra"))
    assert not offloads_optimizer(deepspeed_config(cfg, 1))
    cfg.train.deepspeed = "zero3_offload"
    assert offloads_optimizer(deepspeed_config(cfg, 1))


@pytest.mark.parametrize("name", BUNDLED_DEEPSPEED)
def test_deepspeed_parses_the_filled_config(name, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = load_recipe("llava15_libra", [*dummy_overrides("llava15_libra"), f"train.deepspeed={name}"])
    parsed = ds_config.DeepSpeedConfig(deepspeed_config(cfg, 1, hidden_size=4096))
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps, parsed.bfloat16_config.enabled) == (
        128,
        8,
        True,
    )
    assert parsed.zero_optimization_stage == (2 if name == "zero2" else 3)


_ENGINE_SCRIPT = """
import sys, torch, deepspeed
from libra_train.config import deepspeed_config, load_recipe
cfg = load_recipe("demo", ["train.deepspeed=" + sys.argv[1]])
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
engine, *_ = deepspeed.initialize(
    model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, 1, hidden_size=16)
)
for _ in range(2):
    loss = engine(torch.randn(32, 16)).pow(2).mean()
    engine.backward(loss)
    engine.step()
print("STEPS", engine.global_steps)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_bundled_config_runs_a_deepspeed_engine(name, tmp_path):
    # One CPU process, torch AdamW + LambdaLR handed to deepspeed.initialize, as the training loop does.
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
        "PYTHONPATH": os.pathsep.join([str(RECIPES_DIR.parent), os.environ.get("PYTHONPATH", "")]),
    }
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), name], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "STEPS 2" in run.stdout
