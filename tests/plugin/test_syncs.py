"""The sync budget: compression reads the device (almost) never, so a GPU's launch queue stays full.

Counted on CPU with ``libra_train.bench.syncs.SyncCounter`` (the operators that make a GPU host wait:
``item``/``bool``/``int`` reads, ``torch.equal``, ``nonzero``, boolean indexing, explicit host copies), so the
budget is a deterministic count, not a timing. Budget (issue 10): per training forward at most 2 syncs per
compression point and at most 2 more than the unmodified model; none in backward; at most 1 more per decode
step. The plug-in itself makes one read per forward (the per-sample counts, ``begin_prefill``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from libra_train import LibraConfig, apply_libra
from libra_train.bench.syncs import SyncCounter, count_syncs
from libra_train.compress.types import to_host
from libra_train.plugin import libra_runtime
from tests.plugin.conftest import collate, llava_sample, tiny_llava

POINTS = [2, 5, 8]
CONFIGS = {
    "libra": LibraConfig(layers=POINTS, ratio=0.5),
    "libra-comp": LibraConfig(layers=POINTS, ratio=[0.75, 0.5, 0.5], theta=0.95),
    "fastv": LibraConfig(method="fastv", layers=[2], ratio=0.5),
    "turbo": LibraConfig(method="turbo", layers=POINTS, ratio=0.5),
}


def _batch(side: str = "right", labels: bool = True) -> dict:
    samples = [
        llava_sample(3, 7, answers=((2, 4), (5, 7)), seed=0),
        llava_sample(2, 5, image=False, answers=((1, 3),), seed=1),
        llava_sample(1, 4, answers=((2, 4),), seed=2),
    ]
    batch = collate(samples, side)
    if not labels:
        del batch["labels"]
    return batch


def test_counter_sees_host_reads_on_cpu():
    t = torch.arange(6)
    _, plain = count_syncs(t.tolist)  # a bare tolist of a CPU tensor dispatches nothing...
    _, explicit = count_syncs(to_host, t)  # ...so the plug-in reads through an explicit host copy
    _, scalar = count_syncs(lambda: bool(t.any()) + int(t.max()) + torch.equal(t, t))
    assert (plain.total, explicit.total, scalar.total) == (0, 1, 3)
    _, masked = count_syncs(lambda: t[t > 2])
    assert masked.total == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_forward_and_backward_sync_budget(attn, method):
    model = tiny_llava(attn, num_hidden_layers=12).train()
    batch = _batch()
    _, plain = count_syncs(model, **batch)
    apply_libra(model, CONFIGS[method])
    out, libra = count_syncs(model, **batch)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]  # it compressed
    points = len(CONFIGS[method].layers)
    extra = libra.total - plain.total
    assert extra <= 2 and extra <= 2 * points, (plain, libra)
    with SyncCounter() as backward:
        out.loss.backward()
    assert backward.total == 0, backward


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_step_sync_budget(attn):
    def prefill_and_step(model):
        batch = _batch("left", labels=False)
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            out = model(**batch, cache=cache, use_cache=True)
            step = {
                "input_ids": out.logits[:, -1].argmax(-1, keepdim=True),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1),
                "cache": cache,
                "use_cache": True,
            }
            return count_syncs(model, **step)[1]

    model = tiny_llava(attn, num_hidden_layers=12)
    plain = prefill_and_step(model)
    apply_libra(model, CONFIGS["libra"])
    libra = prefill_and_step(model)
    assert libra_runtime(model) is not None
    assert libra.total - plain.total <= 1, (plain, libra)


def test_disabled_plugin_adds_no_sync():
    model = tiny_llava(num_hidden_layers=12).train()
    batch = _batch()
    _, plain = count_syncs(model, **batch)
    apply_libra(model, LibraConfig(layers=POINTS, enabled=False))
    _, off = count_syncs(model, **batch)
    assert off.by_op == plain.by_op
