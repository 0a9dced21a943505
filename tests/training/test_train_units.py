"""Fast tests of the loop's parts (no DeepSpeed process): schedule, parameter groups, data layout and resume
position, loss normalisation over accumulation, evaluation helpers, checkpoint bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from libra_train.config import load_recipe
from libra_train.data import IGNORE_INDEX, LengthGroupedSampler
from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig, apply_libra
from libra_train.training.batches import ResumableSampler, eval_shard
from libra_train.training.checkpoint import resolve_resume
from libra_train.training.dist import DistEnv
from libra_train.training.evaluate import answer_prompt, collate_prompts, normalize_answer
from libra_train.training.loop import train_step
from libra_train.training.optim import build_scheduler, lr_lambda, param_groups
from libra_train.training.output_dir import prune, write_latest
from libra_train.training.resume import ResumeError
from libra_train.training.setup import prepare_model

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


# -- schedule and optimizer ---------------------------------------------------------------------------------------
def test_lr_schedules_warm_up_then_decay():
    cosine = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert [cosine(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine(6) == pytest.approx(0.5)  # half-way through the decay
    assert cosine(10) == pytest.approx(0.0)
    linear = lr_lambda("linear", 0, 4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert {lr_lambda("constant", 1, 4)(s) for s in range(1, 5)} == {1.0}


def test_scheduler_warmup_is_ceil_of_ratio():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(
        opt, "constant", warmup_ratio=0.03, total_steps=100
    )  # ceil(3.0) = 3 warm-up steps
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_param_groups_split_projector_lr_and_decay():
    model, _ = build_tiny_llava()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, projector_lr=1e-4)}
    assert set(groups) == {"model", "model_no_decay", "projector", "projector_no_decay"}
    assert groups["projector"]["lr"] == 1e-4 and groups["model"]["lr"] == 1e-3
    assert groups["model_no_decay"]["weight_decay"] == 0.0 and groups["model"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups["model_no_decay"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_prepare_model_lora_trains_adapters_and_projector_only():
    cfg = load_recipe(
        "demo", ["lora.enabled=true", "model.train_llm=false", "model.freeze_vision_tower=true"]
    )
    model, _ = build_tiny_llava()
    peft_model = prepare_model(model, cfg, LibraConfig(**cfg.libra))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)  # the regex keeps LoRA off the CLIP tower


# -- data layout and resume position ------------------------------------------------------------------------------
def _steps(lengths, micro, accumulation, world_size, epoch=0):
    """Per optimizer step, the set of samples all ranks see (as TrainData / the DataLoader cut them)."""
    streams = []
    for rank in range(world_size):
        s = LengthGroupedSampler(lengths, micro * accumulation, world_size=world_size, rank=rank, seed=3)
        s.set_epoch(epoch)
        streams.append(list(s))
    per_step = micro * accumulation
    n_steps = min(len(st) for st in streams) // per_step
    return [
        sorted(i for st in streams for i in st[k * per_step : (k + 1) * per_step]) for k in range(n_steps)
    ]


def test_a_global_step_holds_the_same_samples_whatever_the_layout():
    lengths = [(-1) ** (i % 7 == 0) * (10 + i % 13) for i in range(70)]  # images and a few text-only samples
    reference = _steps(lengths, micro=8, accumulation=1, world_size=1)
    full = 70 // 8 - 1  # the last global batches mix the modality groups' tails (left out of an epoch)
    for micro, accumulation, world_size in [(1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2)]:
        assert _steps(lengths, micro, accumulation, world_size)[:full] == reference[:full]


def test_resumable_sampler_skips_consumed_samples():
    base = LengthGroupedSampler(list(range(1, 41)), 4, world_size=2, rank=1, seed=0)
    sampler = ResumableSampler(base)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip=6)
    assert list(sampler) == whole[6:] and len(sampler) == len(whole) - 6


def test_eval_shards_cover_every_sample_once_and_have_equal_length():
    for n, world_size in [(10, 3), (2, 4), (8, 2)]:
        shards = [eval_shard(n, DistEnv(r, r, world_size, CPU.device)) for r in range(world_size)]
        assert len({len(s) for s in shards}) == 1
        assert sorted(i for s in shards for i, counted in s if counted) == list(range(n))
    assert [i for i, c in eval_shard(100, CPU, limit=5) if c] == [0, 1, 2, 3, 4]


# -- loss normalisation -------------------------------------------------------------------------------------------
class FakeEngine:
    """What `train_step` uses of a DeepSpeed engine, for one process: backward divides by the accumulation
    steps, step applies SGD on the boundary."""

    def __init__(self, model: torch.nn.Module, accumulation: int, lr: float = 1.0) -> None:
        self.module, self.accumulation, self.lr, self.micro_steps = model, accumulation, lr, 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            with torch.no_grad():
                for p in self.module.parameters():
                    if p.grad is not None:
                        p -= self.lr * p.grad
                        p.grad = None


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` samples of different lengths and answer lengths: [BOS, 36 image tokens, text, answer, pad...]."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(n):
        text = torch.randint(5, 60, (4 + 3 * i,), generator=gen)
        answer = torch.randint(5, 60, (1 + 2 * i,), generator=gen)
        ids = torch.cat([torch.tensor([1]), torch.full((36,), 4), text, answer])
        rows.append(ids)
        labels.append(torch.cat([torch.full((len(ids) - len(answer),), IGNORE_INDEX), answer]))
    length = max(len(r) for r in rows)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, length - len(t)), value=v)  # noqa: E731
    return {
        "input_ids": torch.stack([pad(r, 3) for r in rows]),
        "attention_mask": torch.stack([pad(torch.ones_like(r), 0) for r in rows]),
        "labels": torch.stack([pad(lab, IGNORE_INDEX) for lab in labels]),
        "pixel_values": torch.randn(n, 3, 48, 48, generator=gen),
    }


def _split(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``size`` samples, each trimmed of the padding it does not need."""
    out = []
    for start in range(0, len(batch["input_ids"]), size):
        part = {k: v[start : start + size] for k, v in batch.items()}
        keep = int(part["attention_mask"].sum(1).max())
        out.append({k: v if k == "pixel_values" else v[:, :keep] for k, v in part.items()})
    return out


@pytest.mark.parametrize("libra", [False, True])
def test_micro_batch_1_x_accumulation_4_equals_4_x_1(libra):
    """Token-level normalisation over the whole accumulated batch: the loss and the update of one optimizer
    step do not depend on how the global batch is cut into micro-batches (unequal answer lengths included)."""

    def fresh_model() -> (
        torch.nn.Module
    ):  # rebuilt, not deep-copied: the plug-in's forward wrapper is per instance
        model, _ = build_tiny_llava(seed=1)
        return (apply_libra(model, LibraConfig(layers=[1], ratio=0.5)) if libra else model).train()

    batch = _batch(4, seed=0)
    results = []
    for micro in (4, 1):
        trained = fresh_model()
        engine = FakeEngine(trained, accumulation=4 // micro)
        step = train_step(engine, _split(batch, micro), CPU, torch.float32, stages=2 if libra else 0)
        results.append((step, [p.detach().clone() for p in trained.parameters()]))
    (one, params_one), (four, params_four) = results
    assert four.loss == pytest.approx(one.loss, rel=1e-5) and four.tokens == one.tokens
    initial = list(fresh_model().parameters())
    for a, b in zip(params_one, params_four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(not torch.equal(a, before) for a, before in zip(params_one, initial)) > len(initial) // 2
    if libra:
        # 36 visual tokens, then 18 merged targets + a compensation token in the samples that have negatives
        assert one.visual_tokens == four.visual_tokens and one.visual_tokens[0] == 36.0
        assert 18.0 <= one.visual_tokens[1] <= 19.0
    # And it is the token mean: a per-micro-batch mean would weight the short answers' tokens more.
    with torch.no_grad():
        full = fresh_model()(
            **{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"], use_cache=False
        )
    assert one.loss == pytest.approx(float(full.loss), rel=1e-5)


# -- evaluation helpers -------------------------------------------------------------------------------------------
def test_normalize_answer():
    assert normalize_answer("  Red.\nmore") == "red"
    assert normalize_answer("\n\nblue, I think") == "blue"
    assert normalize_answer("") == ""


def test_answer_prompt_cuts_before_the_first_answer_and_left_pads():
    ids = torch.tensor([1, 10, 11, 12, 20, 2, 13, 21, 2])
    labels = torch.tensor([-100, -100, -100, -100, 20, 2, -100, 21, 2])
    sample = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(9, dtype=torch.long)}
    prompt, reference = answer_prompt(sample)
    assert prompt["input_ids"].tolist() == [1, 10, 11, 12] and reference.tolist() == [20, 2]
    short = {k: v[:6] for k, v in sample.items()}
    short["labels"] = torch.tensor([-100, -100, 30, 2, -100, -100])
    batch = collate_prompts([sample, short], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12], [3, 3, 1, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


# -- checkpoint bookkeeping ---------------------------------------------------------------------------------------
def test_prune_latest_and_resolve(tmp_path: Path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(
            f'{{"step": {step}, "files": {{}}}}'
        )
    prune(tmp_path, limit=2, keep=tmp_path / "checkpoint-8")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    cfg = load_recipe("demo", [f"train.output_dir={tmp_path}", "train.resume=latest"])
    assert resolve_resume(cfg) == tmp_path / "checkpoint-8"  # no pointer: the newest complete checkpoint
    write_latest(tmp_path, "checkpoint-6")
    assert resolve_resume(cfg) == tmp_path / "checkpoint-6"
    (tmp_path / "incomplete").mkdir()
    with pytest.raises(ResumeError, match="is not a complete checkpoint"):
        resolve_resume(load_recipe("demo", [f"train.resume={tmp_path / 'incomplete'}"]))
    assert math.isfinite(len(list(tmp_path.iterdir())))


# -- logging ------------------------------------------------------------------------------------------------------
def test_metrics_logger_writes_jsonl_and_offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    from libra_train.training.metrics import LOG_FILE, MetricsLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_recipe(
        "demo", [f"train.output_dir={tmp_path}", "logging.wandb=true", "logging.progress=false"]
    )
    logger = MetricsLogger(cfg, is_main=True, total_steps=2)
    logger.log({"step": 1, "loss": 2.5, "lr": 1e-3, "visual_tokens": [36.0, 18.0]})
    logger.log({"step": 2, "eval_loss": 2.0, "eval_accuracy": 0.5})
    assert logger.wandb is not None  # offline: no network, no key
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "visual_tokens": [36.0, 18.0]},
        {"step": 2, "eval_loss": 2.0, "eval_accuracy": 0.5},
    ]
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    silent = MetricsLogger(cfg, is_main=False, total_steps=2)  # other ranks write nothing
    silent.log({"step": 3, "loss": 1.0})
    silent.close()
    assert len((tmp_path / LOG_FILE).read_text().splitlines()) == 2
