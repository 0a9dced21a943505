"""The README's "Libra in your own trainer" examples, run as written on the tiny LLaVA, then checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from libra_train import LibraConfig
from libra_train.inference.generation import find_runtime
from tests.integrations.trainer_helpers import (
    QUESTIONS,
    applied,
    collate,
    image,
    logits_of,
    processor,
    prompt,
    samples,
    tiny_model,
)

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Libra in your own trainer"
NAMES = ("hf-trainer", "hf-trainer-extras", "trl", "peft", "accelerate")
CFG = LibraConfig(layers=[1], ratio=0.5)  # what every example applies
BATCH = collate(samples(2, start=30))


def examples() -> dict[str, str]:
    """``# example: NAME`` python blocks of the README section."""
    text = README.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start + 1)]
    found = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        match = re.match(r"# example: (\S+)\n", block)
        if match:
            found[match.group(1)] = block
    return found


def test_every_example_is_run():
    assert tuple(examples()) == NAMES


def saved_key(directory: str) -> dict | None:
    return json.loads((Path(directory) / "config.json").read_text()).get("libra_merging")


def check_hf_trainer(ns):
    assert saved_key(f"{ns['output_dir']}/final") == applied(CFG).to_dict()
    assert find_runtime(ns["reloaded"]).config == applied(CFG)
    expected = logits_of(ns["trainer"].model, BATCH)
    assert expected.shape[1] < BATCH["input_ids"].shape[1]
    torch.testing.assert_close(logits_of(ns["reloaded"], BATCH), expected, rtol=0, atol=0)


def check_hf_trainer_extras(ns):
    assert find_runtime(ns["trainer"].model).config == applied(CFG)
    assert 0.0 <= ns["metrics"]["eval_token_accuracy"] <= 1.0
    assert ns["metrics"]["eval_loss"] > 0 and ns["trainer"].state.log_history[-2]["train_loss"] > 0


def check_trl(ns):
    assert find_runtime(ns["trainer"].model).config == applied(CFG)
    logged = ns["trainer"].state.log_history[
        0
    ]  # the only log of 2 steps: the summary, TRL's metrics merged in
    assert {"train_loss", "entropy", "mean_token_accuracy"} <= set(logged)


def check_peft(ns):
    out = ns["output_dir"]
    assert (Path(out) / "adapter" / "libra_config.json").is_file()
    assert saved_key(f"{out}/merged") == applied(CFG).to_dict()
    assert find_runtime(ns["reloaded"]).config == applied(CFG)
    merged = LlavaForConditionalGeneration.from_pretrained(f"{out}/merged", local_files_only=True)
    # the adapter (zero-initialised B: no effect) reloaded with Libra == the merged model with Libra applied
    from libra_train import apply_libra

    torch.testing.assert_close(
        logits_of(ns["reloaded"], BATCH), logits_of(apply_libra(merged), BATCH), rtol=1e-5, atol=1e-6
    )


def check_accelerate(ns):
    assert saved_key(f"{ns['output_dir']}/model") == applied(CFG).to_dict()
    assert torch.isfinite(ns["loss"])


CHECKS = {
    "hf-trainer": check_hf_trainer,
    "hf-trainer-extras": check_hf_trainer_extras,
    "trl": check_trl,
    "peft": check_peft,
    "accelerate": check_accelerate,
}


@pytest.mark.parametrize("name", NAMES)
def test_readme_example(name, tmp_path, monkeypatch):
    if name == "trl":
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)  # anything an example writes by default stays in the test's folder
    base = tmp_path / "base"  # `model` as a user has it: loaded from a local directory
    tiny_model(None).save_pretrained(base)
    processor().save_pretrained(base)
    rows = [
        {"images": [image(i)], "prompt": prompt(q), "completion": f" {a} </s>"}
        for i, (q, a) in enumerate(QUESTIONS)
    ]
    namespace = {
        "model": LlavaForConditionalGeneration.from_pretrained(base, local_files_only=True),
        "processor": processor(),
        "train_dataset": samples(4),
        "collate": collate,
        "vqa_rows": rows,
        "output_dir": str(tmp_path / "out"),
    }
    exec(compile(examples()[name], f"README.md example {name}", "exec"), namespace)
    CHECKS[name](namespace)
