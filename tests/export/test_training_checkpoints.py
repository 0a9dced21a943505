"""End to end on real checkpoints of ``train.py`` (ZeRO-2 full, ZeRO-3 LoRA): export, load, compare."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import libra_train.training.evaluate as training_evaluate
from libra_train.data import build_dataset
from libra_train.export import export_checkpoint, resolve_checkpoint
from libra_train.infer import evaluate, generate, load, load_qa
from libra_train.training.checkpoint import load_trained_model
from tests.export.export_helpers import REPO, batch, logits, queries

pytestmark = pytest.mark.slow

RUNS = {
    "zero2-full": ["train.deepspeed=zero2"],
    "zero3-lora": [
        "train.deepspeed=zero3",
        "lora.enabled=true",
        "lora.r=8",
        "lora.alpha=16",
        "model.train_llm=false",
    ],
}


def _train(output_dir, overrides):
    command = [
        sys.executable, "train.py", "recipe=demo", "train.max_steps=2", f"train.output_dir={output_dir}",
        "data.demo.n_train=32", "data.demo.n_val=8", "train.micro_batch_size=8", "train.global_batch_size=8",
        "train.eval_steps=null", "logging.progress=false", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return output_dir


@pytest.mark.parametrize("kind", list(RUNS))
def test_export_of_a_training_checkpoint(kind, tmp_path):
    run = _train(tmp_path / "run", RUNS[kind])
    checkpoint = resolve_checkpoint(run)  # output_dir -> its newest checkpoint
    assert checkpoint.name == "checkpoint-2"
    demo = run / "demo_data"
    reference, processor, libra = load_trained_model(checkpoint, apply_libra=True, merge_lora=False)
    inputs = batch(processor, demo, n=2)
    want = logits(reference, inputs)
    qs = queries(demo, n=2)
    want_ids = [
        g.token_ids
        for g in generate(reference, processor, qs, template="vicuna_v1", image_folder=demo / "images")
    ]
    for merge in [False, True] if "lora" in kind else [False]:
        out = export_checkpoint(run, tmp_path / f"export-merge-{merge}", merge_lora=merge)
        assert (out / "adapter_config.json").is_file() == ("lora" in kind and not merge)
        model, _ = load(out)
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if merge else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(logits(model, inputs), want, **tolerance)
        got = generate(model, processor, qs, template="vicuna_v1", image_folder=demo / "images")
        assert [g.token_ids for g in got] == want_ids
    dataset = build_dataset(demo / "val.json", processor, image_folder=demo / "images", max_length=256)
    shard = [(i, True) for i in range(len(dataset))]
    loop = training_evaluate.evaluate(
        reference, dataset, shard, processor, 4, torch.device("cpu"), torch.float32
    )
    examples = load_qa(demo / "val.json")
    ours = evaluate(
        model, processor, examples, template="vicuna_v1", image_folder=demo / "images", warmup=False
    )
    assert ours.total == loop["eval_samples"] and ours.accuracy == loop["eval_accuracy"]
