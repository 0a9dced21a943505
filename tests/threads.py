"""The one-thread fixture the tiny-model test folders share (imported into their conftest.py, autouse there)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread; several threads on a shared 2-core machine spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
