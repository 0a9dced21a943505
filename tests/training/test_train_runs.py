"""End-to-end runs of ``train.py`` on CPU: the demo on a small budget, process-count and accumulation
invariance, resume, and loading checkpoints back (full ZeRO-2, ZeRO-3 shards of two processes, LoRA).

Each run is launched once per module (fixtures) and compared with the reference run: 1 process, ZeRO-2,
micro-batch 4 x accumulation 1, 4 steps, checkpoints at steps 2 and 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from libra_train.config import load_recipe
from libra_train.training.batches import eval_shard, load_split
from libra_train.training.checkpoint import NON_LORA, load_trained_model
from libra_train.training.dist import DistEnv
from libra_train.training.evaluate import evaluate
from tests.training.train_helpers import SMALL, losses, read_log, run_train

pytestmark = pytest.mark.slow
CPU = DistEnv(0, 0, 1, torch.device("cpu"))
# Summation order differs between layouts (ZeRO reduce-scatter, padding): fp32 round-off only.
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs) -> tuple[Path, str]:
    """The demo through the DeepSpeed launcher (one process), on a small budget."""
    out = runs / "reference"
    return out, run_train(out, [*SMALL, "train.micro_batch_size=4"], nproc=1)


def test_demo_small_budget_reports_accuracy_and_checkpoint(reference):
    out, stdout = reference
    assert "held-out accuracy:" in stdout and f"checkpoint: {out / 'checkpoint-4'}" in stdout
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        for name in (
            "trainer_state.json",
            "recipe.yaml",
            "libra_config.json",
            "tokenizer.json",
            "rng_state_0.pth",
        ):
            assert (ckpt / name).is_file(), f"{ckpt} has no {name}"
        assert (ckpt / f"global_step{step}").is_dir()
    assert not list(out.glob(".tmp-step-*"))
    train_log, eval_log = read_log(out)
    assert [r["step"] for r in train_log] == [1, 2, 3, 4]
    # 48 px / patch 8 = 36 visual tokens; ratio 0.5 keeps 18 targets (+ a compensation token in some samples)
    assert all(r["visual_tokens"][0] == 36.0 and 18.0 <= r["visual_tokens"][1] <= 19.0 for r in train_log)
    assert train_log[-1]["loss"] < train_log[0]["loss"]
    assert [r["step"] for r in eval_log] == [4] and eval_log[0]["eval_samples"] == 8


@pytest.mark.parametrize(
    ("name", "nproc", "overrides"),
    [
        ("zero2_2proc", 2, ["train.micro_batch_size=2"]),
        ("zero3_2proc_accum", 2, ["train.micro_batch_size=1", "train.deepspeed=zero3"]),
        ("micro1_accum4", None, ["train.micro_batch_size=1"]),
    ],
)
def test_same_losses_as_one_process_with_the_same_global_batch(reference, runs, name, nproc, overrides):
    """2 processes (ZeRO-2; ZeRO-3 with accumulation 2) and micro-batch 1 x accumulation 4 in one process
    follow the reference's loss curve: the same samples per step and the same token-mean loss."""
    out = runs / name
    run_train(out, [*SMALL, *overrides, "train.save_steps=null"], nproc=nproc)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(reference[0])), **CLOSE)


def test_resume_continues_like_the_uninterrupted_run(reference, runs):
    ref = reference[0]
    out = runs / "resumed"
    stdout = run_train(out, [*SMALL, "train.micro_batch_size=4", f"train.resume={ref / 'checkpoint-2'}"])
    assert "resumed from" in stdout
    train_log, eval_log = read_log(out)
    assert [r["step"] for r in train_log] == [3, 4]
    assert losses(out) == pytest.approx(losses(ref)[2:], rel=1e-6)
    assert eval_log[-1]["eval_loss"] == pytest.approx(read_log(ref)[1][-1]["eval_loss"], rel=1e-6)


def _eval_like_training(model, checkpoint: Path) -> dict[str, float]:
    """`evaluate` on the run's held-out split, as the training loop ran it at its last step."""
    cfg = load_recipe(checkpoint / "recipe.yaml", ["train.resume=null"])
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    dataset = load_split(cfg, cfg.data.eval, processor)
    shard = eval_shard(len(dataset), CPU, cfg.data.eval_max_samples)
    return evaluate(model, dataset, shard, processor, cfg.train.micro_batch_size, CPU.device, torch.float32)


@pytest.mark.parametrize("run", ["reference", "zero3_2proc_accum"])
def test_load_trained_model_matches_the_model_in_training(reference, runs, run):
    """The consolidated model (ZeRO-2, or ZeRO-3 shards of two processes) scores what the training process
    scored at its last step; it carries the run's merge config."""
    out = reference[0] if run == "reference" else runs / run
    if not (out / "latest").is_file():
        pytest.skip(f"{run} did not run")
    checkpoint = out / (out / "latest").read_text().strip()
    model, processor, libra = load_trained_model(checkpoint)
    assert libra is not None and libra.layers == [1] and not model.training
    got = _eval_like_training(model, checkpoint)
    want = read_log(out)[1][-1]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert got["eval_accuracy"] == want["eval_accuracy"]


def test_lora_zero3_checkpoint_saves_and_loads(runs):
    """LoRA under ZeRO-3 with gradient checkpointing: the adapter + non-LoRA trainables are saved; the
    consolidated model matches the training process, and so does base model + adapter + projector."""
    from peft import PeftModel

    from libra_train.config import load_recipe as load
    from libra_train.plugin import apply_libra
    from libra_train.training.setup import build_base_model

    out = runs / "lora"
    overrides = [
        "train.micro_batch_size=4",
        "train.max_steps=2",
        "train.deepspeed=zero3",
        "lora.enabled=true",
    ]
    overrides += [
        "model.train_llm=false",
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.0",
        "lora.projector_lr=2e-3",
    ]
    run_train(out, [*SMALL, *overrides, "train.gradient_checkpointing=true"])
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    rest = load_file(checkpoint / NON_LORA)
    assert any("multi_modal_projector" in k for k in rest) and not any("lora_" in k for k in rest)
    assert not any(k.startswith("base_model.") for k in rest)

    merged, _, libra = load_trained_model(checkpoint)
    want = read_log(out)[1][-1]
    assert _eval_like_training(merged, checkpoint)["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)

    # The files a LoRA user would ship: base weights (the tiny model's seeded initialisation, the LLM frozen),
    # then the adapter and the non-LoRA trainables.
    cfg = load(checkpoint / "recipe.yaml", ["train.resume=null"])
    base, _ = build_base_model(cfg)
    apply_libra(base, libra)
    missing, unexpected = base.load_state_dict(rest, strict=False)
    assert not unexpected
    adapted = PeftModel.from_pretrained(base, checkpoint / "adapter").eval()
    assert _eval_like_training(adapted, checkpoint)["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
