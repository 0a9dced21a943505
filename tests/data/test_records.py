"""Reading and normalising LLaVA / HF-messages records."""

from __future__ import annotations

import json

import pytest

from libra_train.data import DataError, load_records, normalize_record
from libra_train.data.records import row_to_record
from libra_train.data.templates import render


def test_llava_and_hf_records_normalise_identically(sample_dir, tiny):
    a = [row_to_record(r) for r in load_records(sample_dir / "llava_small.json")]
    b = [row_to_record(r) for r in load_records(sample_dir / "hf_small.jsonl")]
    assert [(r.id, r.images) for r in a] == [(r.id, r.images) for r in b]
    # The placeholder sits at the end of the LLaVA question and first in the HF parts; rendering moves it
    # to the front (LLaVA's preprocess_multimodal), so the prompts agree.
    assert a[0].turns[0][1].endswith("?\n<image>") and b[0].turns[0][1].startswith("<image>\n")
    assert [render("vicuna_v1", r.turns, tiny[1]) for r in a] == [
        render("vicuna_v1", r.turns, tiny[1]) for r in b
    ]
    assert a[0].images == ["board_a.png"] and a[1].images == []
    assert [role for role, _ in a[2].turns] == ["user", "assistant", "user", "assistant"]


def test_mixed_schema_keeps_strings(tmp_path, write_records):
    # datasets' load_dataset("json") would turn the id "000123" into 123 and the answer "5" into 5 here
    # (mixed str/int ids and str/list images become `Json` columns); the loader must keep them as written.
    records = [
        {
            "id": "000123",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "5"}],
        },
        {
            "id": 7,
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
        },
        {"id": "null", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "true"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}]},
    ]
    rows = load_records(write_records(tmp_path, records))
    assert list(rows["id"]) == ["000123", "7", "null", "data.json:3"]
    assert list(rows["images"]) == [["a.png"], ["a.png", "b.png"], [], []]
    assert [t[-1] for t in rows["texts"]] == ["5", "x", "true", "5"]
    assert not any(rows["reason"])


def test_jsonl_and_json_errors(tmp_path):
    good = {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good | {"id": "b"}) + "\n")
    assert list(load_records(path)["id"]) == ["a", "b"]
    path.write_text(json.dumps(good) + "\n{broken\n")
    rows = load_records(path)  # a bad JSONL line is a bad row (skippable), not an exception
    assert list(rows["reason"]) == ["", "bad_json"] and list(rows["id"]) == ["a", "d.jsonl:line 2"]
    assert f"{path}, line 2, column 2: not valid JSON" in rows["error"][1]
    array = tmp_path / "d.json"
    array.write_text("[\n" + json.dumps(good) + ",\n  {broken}\n]")
    with pytest.raises(DataError, match=r"d\.json, line 3, column 4: not valid JSON"):
        load_records(array)
    with pytest.raises(FileNotFoundError, match="README"):
        load_records(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"id": "s1", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            "bad_roles",
        ),
        ({"id": "s2", "conversations": [{"from": "robot", "value": "q"}]}, "bad_format"),
        ({"id": "s3", "text": "q"}, "bad_format"),
        ({"id": "s4", "conversations": [{"from": "human", "value": "q"}]}, "no_labels"),
        (
            {
                "id": "s5",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "image_count_mismatch",
        ),
        (
            {
                "id": "s6",
                "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}],
            },
            "image_count_mismatch",
        ),
        ({"id": "s7", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "bad_format"),
        (
            {
                "id": "s8",
                "image": 3,
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "bad_format",
        ),
        ({"id": "s9", "conversations": "q"}, "bad_format"),
    ],
)
def test_bad_records_name_the_sample(record, reason):
    with pytest.raises(DataError, match=record["id"]) as info:
        normalize_record(record, 0, "file.json")
    assert info.value.reason == reason and info.value.sample_id == record["id"]
    assert "file.json" in str(info.value)


def test_system_turn_and_content_parts():
    rec = normalize_record(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]},
                {"role": "assistant", "content": "ok"},
            ],
            "images": ["x.png"],
        },
        3,
        "dir/f.jsonl",
    )
    assert rec.id == "f.jsonl:3"
    assert rec.turns == [("system", "be brief"), ("user", "look<image>\n"), ("assistant", "ok")]
