"""A stand-in engine and processor for `save_checkpoint`: real files on the real file system, in milliseconds.

Its files say which version of the "weights" wrote them, so a test can tell the old checkpoint of a step from
the new one after a re-save.
"""

from __future__ import annotations

from pathlib import Path

import torch

from libra_train.config import load_recipe
from libra_train.plugin import LibraConfig
from libra_train.training.checkpoint import TrainState, save_checkpoint
from libra_train.training.dist import DistEnv

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


class StandInEngine:
    """The part of a DeepSpeed engine `save_checkpoint` uses; its files say which version wrote them."""

    def __init__(self, version: str) -> None:
        self.module = torch.nn.Linear(4, 4)
        self.version = version

    def save_checkpoint(self, folder: str, tag: str) -> None:
        shards = Path(folder) / tag
        shards.mkdir(parents=True)
        torch.save(
            {"version": self.version, "w": torch.arange(1000.0)}, shards / "mp_rank_00_model_states.pt"
        )
        torch.save({"version": self.version}, shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (Path(folder) / "latest").write_text(tag)


class StandInProcessor:
    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")


def save(out: Path, step: int, version: str, limit: int | None = 2) -> Path:
    limit_override = f"train.save_total_limit={limit if limit is not None else 'null'}"
    cfg = load_recipe("demo", [f"train.output_dir={out}", limit_override])
    state = TrainState(step=step)
    return save_checkpoint(
        StandInEngine(version), cfg, state, StandInProcessor(), LibraConfig(layers=[1]), CPU
    )


def version(checkpoint: Path) -> str:
    return torch.load(
        checkpoint / f"global_step{checkpoint.name.split('-')[1]}" / "mp_rank_00_model_states.pt"
    )["version"]
