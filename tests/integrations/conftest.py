"""Fixtures of the integration tests: the export tests' tiny LLaVA, its checkpoints and exports, demo data."""

from __future__ import annotations

from tests.export.conftest import (  # noqa: F401 (fixtures, shared with the export tests)
    _single_thread,
    checkpoint,
    demo,
    exported,
    lora,
    tiny,
    trained,
)
