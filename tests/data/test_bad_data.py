"""Bad data found late or outside the samples: damaged images at load time, invalid JSON / JSONL, wording."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from libra_train.data import BadSamplesError, Collator, DataError, build_dataset
from libra_train.data.dataset import RUNTIME_REASONS, SKIPPED_KEY
from libra_train.inference.evaluation import load_qa
from libra_train.training.batches import SkipCounter

Q = "what colour is the shape at row 1 column 2 ?"


def _sample(sid: str, image: str | None = "board_a.png", answer: str = "red") -> dict:
    rec = {"id": sid, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + Q},
                                        {"from": "gpt", "value": answer}]}  # fmt: skip
    return rec | ({"image": image} if image else {})


@pytest.fixture
def truncated(sample_dir, write_records):
    """Five samples, the third with a PNG cut in half: its header reads, its pixels do not."""
    data = (sample_dir / "board_b.png").read_bytes()
    (sample_dir / "cut.png").write_bytes(data[: len(data) // 2])
    records = [
        _sample("a"),
        _sample("b", None),
        _sample("cut", "cut.png"),
        _sample("d", "board_b.png"),
        _sample("e"),
    ]
    return write_records(sample_dir, records)


def test_damaged_image_without_skipping_names_the_sample_and_the_key(tiny, truncated):
    ds = build_dataset(truncated, tiny[1], max_length=100)
    assert len(ds) == 5  # the header-only pre-check passes it
    with pytest.raises(DataError, match="cut") as info:
        ds[2]
    assert "cannot decode image" in str(info.value) and "data.skip_bad_samples=true" in str(info.value)
    loader = DataLoader(ds, batch_size=5, num_workers=1, collate_fn=Collator(3))  # from a worker process too
    with pytest.raises(DataError, match="'cut'"):
        next(iter(loader))


def test_damaged_image_is_replaced_deterministically_and_reported(tiny, truncated):
    ds = build_dataset(truncated, tiny[1], max_length=100, skip_bad_samples=True)
    want = ds[3]  # the replacement: the next sample in dataset order
    for _ in range(2):  # the same replacement before and after the failure is known
        got = ds[2]
        assert all(torch.equal(got[k], want[k]) for k in want) and SKIPPED_KEY not in got
    assert ds.skipped == Counter(unreadable_image=1) and ds.skipped_ids == ["cut"]
    ds.report_skips = True  # the training loader's setting: the item says whom it stands in for
    assert ds[2][SKIPPED_KEY].tolist() == [[2, RUNTIME_REASONS.index("unreadable_image")]]
    assert SKIPPED_KEY not in ds[1]


def test_skip_marks_reach_the_counter_from_worker_processes(tiny, truncated):
    fresh = build_dataset(truncated, tiny[1], max_length=100, skip_bad_samples=True)
    plain = [fresh[i] for i in range(5)]
    ds = build_dataset(truncated, tiny[1], max_length=100, skip_bad_samples=True)
    ds.report_skips = True
    counter = SkipCounter(enabled=True)
    for _epoch in range(2):
        loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=Collator(3))
        (batch,) = [counter.take(b) for b in loader]
        assert SKIPPED_KEY not in batch and batch["input_ids"].shape[0] == 5  # shapes as if nothing failed
        assert torch.equal(batch["input_ids"], Collator(3)(plain)["input_ids"])
        assert counter.take_pending() == 1
    assert counter.gathered() == Counter(unreadable_image=1)  # one sample, met in two epochs
    assert ds.skipped == Counter()  # the workers' copies counted it, not this one


def test_invalid_json_names_file_line_and_column(tiny, sample_dir):
    path = sample_dir / "broken.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]')
    with pytest.raises(DataError) as info:
        build_dataset(path, tiny[1])
    message = str(info.value)
    assert message.startswith(f"{path}, line 3, column 13: not valid JSON (Expecting ',' delimiter)")
    assert "\n" not in message and "Traceback" not in message


def test_bad_jsonl_line_is_a_bad_sample(tiny, sample_dir):
    path = sample_dir / "data.jsonl"
    lines = [json.dumps(_sample("a")), '{"id": "b", "conversations": [', json.dumps(_sample("c", None))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSamplesError) as info:
        build_dataset(path, tiny[1], max_length=100)
    (problem,) = info.value.problems
    assert problem.reason == "bad_json" and problem.sample_id == "data.jsonl:line 2"
    assert f"{path}, line 2, column 31: not valid JSON" in str(info.value)
    assert "data.skip_bad_samples=true" in str(info.value) and "skip_bad_samples=True to" not in str(
        info.value
    )
    ds = build_dataset(path, tiny[1], max_length=100, skip_bad_samples=True)
    assert [ds.record(i).id for i in range(len(ds))] == ["a", "c"]
    assert ds.skipped == Counter(bad_json=1) and ds.skipped_ids == ["data.jsonl:line 2"]


def test_evaluation_speaks_of_evaluation(tmp_path, tiny, sample_dir):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "what is it ?"}]}]))
    with pytest.raises(DataError) as info:
        load_qa(path)
    assert "evaluate" in str(info.value) and "train" not in str(info.value)
    with pytest.raises(BadSamplesError) as info:
        build_dataset(path, tiny[1], purpose="evaluation")
    assert "evaluate" in str(info.value.problems[0]) and "train" not in str(info.value.problems[0])
    with pytest.raises(BadSamplesError, match="no answer to train on"):
        build_dataset(path, tiny[1])


def test_generation_errors_do_not_suggest_training_keys(tiny, truncated, sample_dir):
    from libra_train.inference.generation import Query, build_inputs

    with pytest.raises(DataError, match="cannot decode image") as info:
        build_inputs(tiny[1], [Query.single(Q, "cut.png", "q")], "vicuna_v1", sample_dir)
    assert "evaluation" in str(info.value) and "data." not in str(info.value)
