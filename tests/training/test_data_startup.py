"""Training data with several ranks: the pre-check runs once (rank 0) and is shared; bad data at run time.

The process groups here are real (gloo, spawned processes; the DeepSpeed launcher for the end-to-end run).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from libra_train.data.demo import generate_demo_data
from libra_train.training.dist import free_port
from tests.training.train_helpers import SMALL, read_log, run_train

pytestmark = pytest.mark.slow
Q = "what colour is the shape at row 1 column 2 ?"


def _records(n: int, image: str) -> list[dict]:
    return [
        {"id": f"s{i}", "image": image,
         "conversations": [{"from": "human", "value": "<image>\n" + Q}, {"from": "gpt", "value": "red"}]}
        for i in range(n)
    ]  # fmt: skip


def _rank(rank: int, world: int, port: int, folder: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as torch_dist

    from libra_train.config import RecipeConfig
    from libra_train.data import BadSamplesError
    from libra_train.data.encode import Encoder
    from libra_train.models import build_tiny_llava
    from libra_train.training.batches import load_split
    from libra_train.training.dist import DistEnv

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    checked = []
    check_batch = Encoder.check_batch
    Encoder.check_batch = lambda self, records: checked.append(len(records)) or check_batch(self, records)
    cfg = RecipeConfig(recipe_name="t")
    cfg.data.image_folder, cfg.data.max_length, cfg.data.cache_dir = str(folder), 100, str(folder / "cache")
    env = DistEnv(rank, rank, world, torch.device("cpu"))
    processor = build_tiny_llava()[1]
    dataset = load_split(cfg, str(folder / "good.json"), processor, env)
    result = {"checked": sum(checked), "end": time.time(), "lengths": dataset.lengths}
    try:
        load_split(cfg, str(folder / "bad.json"), processor, env)
    except BadSamplesError as err:  # every rank ends with the same error; none is left waiting
        result["error"] = str(err)
    (folder / f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


def test_rank0_prechecks_once_and_the_other_ranks_load_its_cache(tmp_path):
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "good.json").write_text(json.dumps(_records(30, "a.png")))
    (tmp_path / "bad.json").write_text(json.dumps(_records(3, "nowhere.png")))
    mp.spawn(_rank, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert first["checked"] == 30 and second["checked"] == 0  # rank 1 loaded rank 0's result
    assert first["lengths"] == second["lengths"] and len(first["lengths"]) == 30
    assert second["end"] >= first["end"] - 1.0  # rank 1 was done after rank 0 had built it
    assert first["error"] == second["error"] and "nowhere.png" in first["error"]


def test_damaged_images_during_training_are_replaced_and_counted_on_every_rank(tmp_path):
    # Train one epoch (16 image samples, 4 steps of 4) on demo data with three training images cut in half: they pass the header-only
    # pre-check and fail when the loader decodes them.
    data = generate_demo_data(tmp_path / "data", n_train=16, n_val=4, image_size=48, grid=2, max_turns=4)
    records = json.loads(data.train.read_text())
    damaged = [r["image"] for r in records if "image" in r][:3]
    for name in damaged:
        path = data.image_folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith("data.demo")]
    data_keys = [
        f"data.train={data.train}",
        f"data.eval={data.val}",
        f"data.image_folder={data.image_folder}",
    ]
    overrides = [
        "~data.demo",
        *data_keys,
        "data.skip_bad_samples=true",
        "train.max_steps=4",
        "train.save_steps=null",
    ]
    stdout = run_train(out, [*small, *overrides, "train.micro_batch_size=2"], nproc=2)
    train_log, _ = read_log(out)
    assert [r["step"] for r in train_log] == [1, 2, 3, 4]  # both ranks stayed in step to the end
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_log)
    counts = [r["skipped_samples"] for r in train_log]
    assert counts == sorted(counts) and counts[-1] == len(damaged)  # one epoch: each drawn once
    summary = re.search(r"failed to load during training: (\d+) \(unreadable_image (\d+)\)", stdout)
    assert summary and int(summary[1]) == int(summary[2]) == counts[-1], stdout
    assert "train skipped 0 (none)" in stdout  # the pre-check passed them (headers are intact)
    assert len(list((out / "data_cache").glob("*/check-*/"))) == 2  # train and eval, cached once
