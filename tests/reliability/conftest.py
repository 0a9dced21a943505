"""Shared by the fault tests: one generated demo data set and one uninterrupted reference run per session.

The runs read the data through ``data.train`` / ``data.eval`` / ``data.image_folder`` (``data.demo=null``), so no
run generates its own copy; the reference (one process, 6 steps, checkpoints 2 / 4 / 6) is what every
interrupted-then-resumed run is compared with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from libra_train.data import generate_demo_data
from tests.reliability.runs import BASE, ONE_PROCESS, run

# The demo recipe's data (48 px, 2x2 board, up to 4 questions per image) at the size of tests/training's runs.
DEMO_ARGS = {"n_train": 40, "n_val": 8, "image_size": 48, "grid": 2, "max_turns": 4}


def data_overrides(root: Path) -> list[str]:
    return [
        "data.demo=null",
        f"data.train={root / 'train.json'}",
        f"data.eval={root / 'val.json'}",
        f"data.image_folder={root / 'images'}",
    ]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    generate_demo_data(root, **DEMO_ARGS)
    return root


@pytest.fixture(scope="session")
def data(demo_root) -> list[str]:
    """Overrides that point a run at the shared demo data."""
    return data_overrides(demo_root)


@pytest.fixture
def private_data(demo_root, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the demo data this test may damage, and the overrides that use it."""
    root = tmp_path / "demo_data"
    shutil.copytree(demo_root, root)
    return root, data_overrides(root)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted run: one process, 6 steps, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run(out, [*data, *BASE, *ONE_PROCESS, "train.save_total_limit=null"])
    assert result.rc == 0, result.describe()
    return out
