"""Generation from an export equals generation from the training-time model; the CLI prints it."""

from __future__ import annotations

import pytest
import torch

from libra_train.infer import Query, generate, load, prompt_template
from libra_train.inference.cli import libra_argument
from tests.export.export_helpers import load_script, queries

NEW = 5


def _ids(model, processor, demo, qs, **kwargs):
    outs = generate(
        model, processor, qs, template="vicuna_v1", image_folder=demo / "images", max_new_tokens=NEW, **kwargs
    )
    return outs


def test_export_generates_the_training_time_ids(exported, trained, tiny, demo):
    model, processor = load(exported)
    assert prompt_template(exported) == "vicuna_v1"
    qs = queries(demo, n=3)
    got = _ids(model, processor, demo, qs)
    want = _ids(trained, tiny[1], demo, qs)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(g.token_ids) == NEW for g in got)  # a random model does not stop early
    assert [g.visual_tokens for g in got] == [[36, 18]] * 3
    # batched (left padding) == one query at a time
    assert [g.token_ids for g in got] == [_ids(model, processor, demo, [q])[0].token_ids for q in qs]


def test_full_generation_and_text_only(exported, tiny, demo):
    model, processor = load(exported, libra="off")
    qs = [*queries(demo, n=1), Query.single("what number comes after 4 ?")]
    got = _ids(model, processor, demo, qs)
    assert [g.token_ids for g in got] == [g.token_ids for g in _ids(tiny[0], tiny[1], demo, qs)]
    assert [g.visual_tokens for g in got] == [[36], []]


def test_sampling_is_seeded(exported, demo):
    model, processor = load(exported)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(
            [
                g.token_ids
                for g in _ids(model, processor, demo, queries(demo, 2), do_sample=True, temperature=5.0)
            ]
        )
    assert runs[0] == runs[1]
    assert runs[0] != [g.token_ids for g in _ids(model, processor, demo, queries(demo, 2))]  # not greedy


def test_generate_cli(exported, demo, capsys):
    script = load_script("generate")
    images = [str(demo / "images" / f"val_0000{i}.png") for i in range(2)]
    prompt = "how many red shapes are there ?"
    argv = [
        str(exported),
        "--image",
        images[0],
        "--image",
        images[1],
        "--prompt",
        prompt,
        "--max-new-tokens",
        str(NEW),
    ]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    model, processor = load(exported)
    want = generate(
        model,
        processor,
        [Query.single(prompt, im) for im in images],
        template="vicuna_v1",
        max_new_tokens=NEW,
    )
    for i, (image, out) in enumerate(zip(images, want), 1):
        assert f"[{i}] image: {image}\n    prompt: {prompt}\n    answer: {out.text}\n" in printed
    assert printed.count("visual tokens per stage: 36 -> 18") == 2


def test_generate_cli_pairs_images_and_prompts():
    script = load_script("generate")
    assert script.pair(["a", "b"], ["p"]) == [("a", "p"), ("b", "p")]
    assert script.pair(["a"], ["p", "q"]) == [("a", "p"), ("a", "q")]
    assert script.pair([], ["p"]) == [(None, "p")]
    with pytest.raises(ValueError, match="2 images and 3 prompts"):
        script.pair(["a", "b"], ["p", "q", "r"])


def test_libra_argument():
    assert libra_argument(None) is None
    assert libra_argument(["off"]) == "off"
    assert libra_argument(["ratio=0.8", "layers=[1, 2]"]) == {"ratio": 0.8, "layers": [1, 2]}
    with pytest.raises(ValueError, match="key=value"):
        libra_argument(["ratio=0.8", "oops"])
