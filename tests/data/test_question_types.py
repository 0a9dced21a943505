"""The records carry the question type of each answer from the data (``question_types``) for per-type accuracy."""

from __future__ import annotations

import pytest

from libra_train.data import DataError, load_records, normalize_record
from libra_train.data.demo import generate_demo_data
from libra_train.data.records import row_to_record

TURNS = [
    {"from": "human", "value": "<image>\nwhat colour ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many ?"},
    {"from": "gpt", "value": "2"},
]


def test_question_types_travel_with_the_record(tmp_path, write_records):
    records = [
        {"id": "two", "image": "a.png", "conversations": TURNS, "question_types": ["colour", "count"]},
        {"id": "first-only", "image": "a.png", "conversations": TURNS, "question_types": ["shape"]},
        {"id": "none", "image": "a.png", "conversations": TURNS},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}],
         "question_types": ["text"]},
    ]  # fmt: skip
    rows = load_records(write_records(tmp_path, records))
    assert list(rows["question_types"]) == [["colour", "count"], ["shape"], [], ["text"]]
    assert [row_to_record(r).question_types for r in rows] == [["colour", "count"], ["shape"], [], ["text"]]
    assert not any(rows["reason"])


@pytest.mark.parametrize(
    ("types", "match"),
    [
        ("colour", "must be a list of strings"),
        ([1], "must be a list of strings"),
        (["a", "b", "c"], "3 'question"),
    ],
)
def test_bad_question_types_name_the_sample(types, match):
    raw = {"id": "s1", "image": "a.png", "conversations": TURNS, "question_types": types}
    with pytest.raises(DataError, match=match) as err:
        normalize_record(raw, 0, "val.json")
    assert "sample 's1' in val.json" in str(err.value) and err.value.reason == "bad_format"


def test_demo_records_say_the_type_of_each_question(tmp_path):
    paths = generate_demo_data(tmp_path, n_train=6, n_val=6, max_turns=3, text_only_fraction=0)
    for row in [*load_records(paths.train), *load_records(paths.val)]:
        record = row_to_record(row)
        questions = [text for role, text in record.turns if role == "user"]
        assert len(record.question_types) == len(questions)
        for qtype, question in zip(record.question_types, questions):
            assert {"colour": "what colour", "shape": "what shape", "count": "how many"}[qtype] in question
