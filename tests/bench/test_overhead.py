"""The overhead benchmark leaves the model and transformers' attention registry as it found them, and its
pieces add up to what it prints (numbers are printed, not asserted: a timing is not a test)."""

from __future__ import annotations

import math

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from libra_train.bench import overhead
from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig, apply_libra, remove_libra
from libra_train.plugin.apply import RUNTIME_ATTR


def test_pieces_restore_the_registry_and_the_wrappers():
    model, _ = build_tiny_llava()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    runtime = getattr(apply_libra(model, LibraConfig(layers=[1], enabled=False)), RUNTIME_ATTR)
    forwards = [module.forward.__wrapped__ for module, _ in runtime.entries]
    pieces = [
        overhead.entry_seconds(runtime, 50, 2),
        overhead.attention_wrapper_seconds(runtime, 50, 2),
        overhead.layer_hook_seconds(runtime, 50, 2),
    ]
    assert all(math.isfinite(p) for p in pieces)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa  # the no-op backend was put back
    assert [module.forward.__wrapped__ for module, _ in runtime.entries] == forwards
    ids = torch.randint(0, 10, (1, 8))  # text tokens (the image token id is near the vocabulary end)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()  # the real backend runs again
    remove_libra(model)


def test_whole_forward_leaves_the_model_unpatched():
    model, _ = build_tiny_llava()
    ids = torch.randint(0, 10, (1, 8))  # text tokens (the image token id is near the vocabulary end)
    base, extra, noise = overhead.whole_forward(model, LibraConfig(layers=[1]), {"input_ids": ids}, 2, 2)
    assert base > 0 and math.isfinite(extra) and math.isfinite(noise)
    assert not hasattr(model, RUNTIME_ATTR)


def test_main_prints_both_tables(capsys):
    overhead.main(["--rounds", "1", "--calls", "2"])
    out = capsys.readouterr().out
    assert "| **sum** |" in out and "| disabled (enabled=False), image batch |" in out
    assert "noise floor" in out
