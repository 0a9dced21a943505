"""Recipe tests run from the repository root: messages name recipes relative to it (``recipes/demo.yaml``)."""

from __future__ import annotations

import pytest

from libra_train.config import RECIPES_DIR


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES_DIR.parent)
