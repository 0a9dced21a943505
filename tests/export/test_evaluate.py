"""Evaluation of an export gives the accuracy computed directly with the training-time model."""

from __future__ import annotations

import json

import pytest
import torch

import libra_train.training.evaluate as training_evaluate
from libra_train.data import build_dataset
from libra_train.data.records import load_records
from libra_train.infer import (
    Query,
    evaluate,
    format_table,
    generate,
    is_correct,
    load,
    load_qa,
    normalize_answer,
)
from tests.export.export_helpers import load_script


def _direct(model, processor, demo, questions):
    """Predictions of ``model`` one question at a time (no batching, no padding)."""
    preds = []
    for q in questions:
        out = generate(
            model, processor, [q], template="vicuna_v1", image_folder=demo / "images", max_new_tokens=3
        )
        preds.append(out[0].text)
    return preds


def test_demo_split_accuracy_equals_direct_computation(exported, trained, tiny, demo):
    rows = load_records(demo / "val.json")
    questions = [
        Query([(rows[i]["roles"][0], rows[i]["texts"][0])], rows[i]["images"], rows[i]["id"])
        for i in range(8)
    ]
    gold = [rows[i]["texts"][1] for i in range(8)]
    direct = _direct(trained, tiny[1], demo, questions)
    model, processor = load(exported)
    result = evaluate(
        model,
        processor,
        load_qa(demo / "val.json"),
        template="vicuna_v1",
        image_folder=demo / "images",
        batch_size=3,
        max_new_tokens=3,
        progress=False,
    )
    assert result.predictions == direct
    assert result.correct == sum(is_correct(p, g) for p, g in zip(direct, gold))
    assert result.total == 8 and result.visual_tokens == [36, 18]
    assert result.seconds > 0 and result.memory.peak_mib > 0


def test_evaluate_cli_pins_accuracy_with_compare_full(exported, trained, tiny, demo, tmp_path, capsys):
    """Half the reference answers are what the training-time model says: the export must score exactly 50%."""
    val = json.loads((demo / "val.json").read_text())
    questions = [Query.single(r["conversations"][0]["value"], r["image"], r["id"]) for r in val]
    direct = _direct(trained, tiny[1], demo, questions)
    full = _direct(tiny[0], tiny[1], demo, questions)
    lines = [
        {
            "id": r["id"],
            "image": r["image"],
            "question": r["conversations"][0]["value"].replace("<image>\n", ""),
            "answer": direct[i] if i % 2 == 0 else "no such answer",
        }
        for i, r in enumerate(val)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    full_correct = sum(is_correct(full[i], line["answer"]) for i, line in enumerate(lines))
    argv = [
        str(exported),
        "--data",
        str(data),
        "--image-folder",
        str(demo / "images"),
        "--compare",
        "full",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert load_script("evaluate").main(argv) == 0
    table = capsys.readouterr().out
    assert "| libra points [1] ratio 0.5 | 50.0% (4/8) |" in table
    assert f"| full (same model, no compression) | {full_correct / 8:.1%} ({full_correct}/8) |" in table
    assert "36 -> 18 |" in table and "| 36 |" in table and "peak RSS" in table


def test_load_qa_formats(tmp_path):
    multi = {
        "id": "m",
        "image": "a.png",
        "question_types": ["colour", "count"],
        "conversations": [
            {"from": "human", "value": "<image>\nq1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ],
    }
    (tmp_path / "llava.json").write_text(json.dumps([multi]))
    (only,) = load_qa(tmp_path / "llava.json")  # the first answer, as the training loop's eval scores it
    assert only.query.id == "m" and only.answers == ["a1"]
    first, second = load_qa(tmp_path / "llava.json", all_turns=True)
    assert first.query.turns == [("user", "<image>\nq1")] and first.answers == ["a1"]
    assert second.query.turns == [("user", "<image>\nq1"), ("assistant", "a1"), ("user", "q2")]
    assert (second.query.id, second.answers, second.question_type) == ("m#1", ["a2"], "count")
    lines = [{"question": "q", "answers": ["x", "y"], "image": "b.png"}, {"question": "t", "answer": "z"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    a, b = load_qa(tmp_path / "qa.jsonl")
    assert (
        a.query.turns == [("user", "<image>\nq")] and a.query.images == ["b.png"] and a.answers == ["x", "y"]
    )
    assert b.query.images == [] and b.answers == ["z"] and b.query.id == "qa.jsonl:1"
    assert len(load_qa(tmp_path / "llava.json", limit=1)) == 1


def test_answer_matching_is_the_training_loops():
    assert normalize_answer is training_evaluate.normalize_answer
    assert (
        is_correct("Red.", "red") and is_correct("red </s> blue", "red") and is_correct("two", ["1", "two"])
    )
    assert not is_correct("blue", "red") and not is_correct("", "red")


def test_same_accuracy_as_the_training_loop_eval(exported, trained, tiny, demo, tmp_path):
    """Half the references are the training-time model's own first words: both evaluations must agree on a
    score of at least 50% (the training loop's on the in-memory model, ours on the export)."""
    val = json.loads((demo / "val.json").read_text())
    questions = [Query.single(r["conversations"][0]["value"], r["image"], r["id"]) for r in val]
    direct = _direct(trained, tiny[1], demo, questions)
    for i, record in enumerate(val):
        if i % 2 == 0:
            record["conversations"][1]["value"] = normalize_answer(direct[i]) or "red"
    data = tmp_path / "val.json"
    data.write_text(json.dumps(val))
    dataset = build_dataset(data, tiny[1], image_folder=demo / "images", max_length=256)
    shard = [(i, True) for i in range(len(dataset))]
    reference = training_evaluate.evaluate(
        trained, dataset, shard, tiny[1], 3, torch.device("cpu"), torch.float32
    )
    model, processor = load(exported)
    ours = evaluate(
        model, processor, load_qa(data), template="vicuna_v1", image_folder=demo / "images", progress=False
    )
    assert reference["eval_samples"] == ours.total == 8
    assert ours.accuracy == reference["eval_accuracy"] >= 0.5


def test_per_type_accuracy_comes_from_the_data_in_both_evaluations(exported, trained, tiny, demo, tmp_path):
    """Types are read from the records' ``question_types`` (one record has none: overall only); both evaluations
    count each type exactly as the predictions and references say, and agree with each other."""
    val = json.loads((demo / "val.json").read_text())
    questions = [Query.single(r["conversations"][0]["value"], r["image"], r["id"]) for r in val]
    direct = _direct(trained, tiny[1], demo, questions)
    for i, record in enumerate(val):
        if i % 2 == 0:  # half right, so that the per-type counts are not all zero
            record["conversations"][1]["value"] = normalize_answer(direct[i]) or "red"
        record["question_types"] = [("colour", "count", "misc")[i % 3]]  # not what the wording says
    del val[5]["question_types"]
    data = tmp_path / "val.json"
    data.write_text(json.dumps(val))
    gold = [r["conversations"][1]["value"] for r in val]
    expected: dict[str, tuple[int, int]] = {}
    for i, record in enumerate(val):
        if "question_types" in record:
            right, seen = expected.get(record["question_types"][0], (0, 0))
            expected[record["question_types"][0]] = (right + is_correct(direct[i], gold[i]), seen + 1)

    model, processor = load(exported)
    ours = evaluate(
        model, processor, load_qa(data), template="vicuna_v1", image_folder=demo / "images", progress=False
    )
    assert ours.by_type == dict(sorted(expected.items())) and sum(n for _, n in expected.values()) == 7
    assert ours.total == 8 and ours.question_types[5] is None
    assert ours.text_tokens > 0 and ours.visual_tokens == [36, 18]

    dataset = build_dataset(data, tiny[1], image_folder=demo / "images", max_length=256)
    shard = [(i, True) for i in range(len(dataset))]
    reference = training_evaluate.evaluate(
        trained, dataset, shard, tiny[1], 3, torch.device("cpu"), torch.float32
    )
    for qtype, (right, seen) in expected.items():
        assert reference[f"eval_samples/{qtype}"] == seen
        assert reference[f"eval_accuracy/{qtype}"] == pytest.approx(right / seen)
        assert reference[f"eval_accuracy/{qtype}"] == pytest.approx(ours.by_type[qtype][0] / seen)
    assert training_evaluate.format_per_type(reference).startswith("; colour ")


def test_per_type_column_in_the_evaluate_table(exported, demo, tmp_path):
    lines = [
        {"question": "what shape is at row 1 column 1 ?", "answer": "circle", "image": "val_00000.png",
         "question_type": "shape"},
        {"question": "what shape is at row 1 column 2 ?", "answer": "square", "image": "val_00001.png"},
    ]  # fmt: skip
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model, processor = load(exported)
    result = evaluate(model, processor, load_qa(data), template="vicuna_v1", image_folder=demo / "images",
                      progress=False)  # fmt: skip
    assert result.question_types == ["shape", None] and list(result.by_type) == ["shape"]
    right = int(result.scores[0])
    assert f"| shape {right / 1:.1%} ({right}/1) |" in format_table([result])
    (bad := tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "question_type": 3}) + "\n")
    with pytest.raises(ValueError, match="'question_type' must be a string"):
        load_qa(bad)
