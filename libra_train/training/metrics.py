"""Where metrics go: ``<output_dir>/log.jsonl`` (always, unless ``logging.jsonl=false``), a tqdm bar, wandb and
TensorBoard when asked. Only rank 0 writes; the values are already reduced over ranks by the loop.

wandb is never required: it runs offline unless ``logging.wandb_mode`` (or ``WANDB_MODE``) says otherwise, and
if it cannot start the run goes on with a warning. The same holds for TensorBoard (the ``tensorboard`` extra).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from libra_train.config import RecipeConfig, recipe_to_dict

LOG_FILE = "log.jsonl"


class MetricsLogger:
    """Rank 0's sinks. On other ranks every method does nothing.

    Args:
        cfg: the recipe (``logging`` section, ``train.output_dir``).
        is_main: whether this is rank 0.
        total_steps, start_step: for the progress bar.
    """

    def __init__(self, cfg: RecipeConfig, is_main: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = is_main
        self.cfg = cfg
        self.jsonl = None
        self.wandb = None
        self.tensorboard = None
        self.bar = None
        if not is_main:
            return
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = cfg.logging
        if log.jsonl:
            self.jsonl = open(out / LOG_FILE, "a", buffering=1)  # noqa: SIM115 (closed in close())
        if log.wandb:
            self.wandb = self._start_wandb(out)
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError as exc:
                warnings.warn(
                    f"logging.tensorboard: TensorBoard is not installed ({exc}); skipping", stacklevel=2
                )
        if log.progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
            )

    def _start_wandb(self, out: Path) -> Any:
        os.environ.setdefault("WANDB_MODE", self.cfg.logging.wandb_mode)
        try:
            import wandb

            return wandb.init(
                project=self.cfg.logging.wandb_project,
                name=f"{self.cfg.recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                config=recipe_to_dict(self.cfg),
                dir=str(out),
            )
        except Exception as exc:  # wandb is optional: a missing key or package must not stop training
            warnings.warn(
                f"logging.wandb: could not start wandb ({exc}); continuing without it", stacklevel=2
            )
            return None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``) to every sink."""
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        for k, v in record.items():  # lists (visual tokens per stage) become one scalar per entry
            if isinstance(v, list):
                scalars.update({f"{k}/{i}": x for i, x in enumerate(v) if isinstance(x, int | float)})
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)

    def progress(self, steps: int, postfix: dict[str, str] | None = None) -> None:
        """Advance the bar by ``steps`` and show ``postfix``."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def print(self, message: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.bar = self.jsonl = self.wandb = self.tensorboard = None
