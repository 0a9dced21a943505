"""Bad samples: a clear error naming the sample, or (skip_bad_samples=True) skipped and counted."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from libra_train.data import BadSamplesError, Collator, DataError, build_dataset

Q = "what colour is the shape at row 1 column 2 ?"


def _sample(sid: str, image: str | None = "board_a.png", question: str = Q, answer: str = "red") -> dict:
    value = f"<image>\n{question}" if image else question
    rec = {"id": sid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}
    return rec | ({"image": image} if image else {})


def _bad_cases(folder) -> list[tuple[dict, str]]:
    (folder / "garbage.png").write_bytes(b"this is not an image")
    return [
        (_sample("missing_img", image="nowhere.png"), "missing_image"),
        (_sample("garbage_img", image="garbage.png"), "unreadable_image"),
        (
            _sample("extra_placeholder")
            | {
                "conversations": [
                    {"from": "human", "value": "<image> <image> q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            "image_count_mismatch",
        ),
        # 32 prompt tokens + 80 system words push the 36 image tokens past max_length=100:
        (
            _sample("long_system")
            | {
                "conversations": [
                    {"from": "system", "value": " ".join(["what"] * 80)},
                    *_sample("x")["conversations"],
                ]
            },
            "image_truncated",
        ),
        # 32 + 80 question tokens: the answer starts after max_length=100:
        (_sample("long_text_only", image=None, question=" ".join(["what"] * 80)), "no_labels"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_each_bad_case_names_the_sample(tiny, sample_dir, write_records, case):
    record, reason = _bad_cases(sample_dir)[case]
    path = write_records(sample_dir, [_sample("good"), record])
    with pytest.raises(BadSamplesError, match=record["id"]) as info:
        build_dataset(path, tiny[1], max_length=100)
    assert [p.reason for p in info.value.problems] == [reason]
    assert str(path) in str(info.value) and "set data.skip_bad_samples=true" in str(info.value)


def test_skip_counts_every_reason(tiny, sample_dir, write_records):
    cases = _bad_cases(sample_dir)
    records = [_sample("good1"), *(r for r, _ in cases), _sample("good2", image=None)]
    ds = build_dataset(write_records(sample_dir, records), tiny[1], max_length=100, skip_bad_samples=True)
    assert len(ds) == 2 and ds.skipped == Counter(reason for _, reason in cases)
    assert sorted(ds.skipped_ids) == sorted(r["id"] for r, _ in cases)
    assert [ds.record(i).id for i in range(len(ds))] == ["good1", "good2"]


def test_without_skip_all_problems_are_listed(tiny, sample_dir, write_records):
    cases = _bad_cases(sample_dir)
    with pytest.raises(BadSamplesError) as info:
        build_dataset(write_records(sample_dir, [r for r, _ in cases]), tiny[1], max_length=100)
    assert sorted(p.sample_id for p in info.value.problems) == sorted(r["id"] for r, _ in cases)


def test_truncation_keeps_samples_with_labels_left(tiny, sample_dir):
    # The text-only fixture sample has 42 tokens, its trained tokens "5 </s>" at positions 40 and 41.
    path = sample_dir / "llava_small.json"
    ds = build_dataset(path, tiny[1], max_length=41, skip_bad_samples=True)
    text_only = [i for i in range(len(ds)) if not ds.has_images[i]][0]
    item = ds[text_only]
    assert len(item["input_ids"]) == 41 and item["labels"][-1] == 21  # "5" kept, "</s>" cut
    # the image samples' image tokens (positions 32..67) would be cut:
    assert ds.skipped == Counter(image_truncated=2)
    with pytest.raises(BadSamplesError, match="multi_turn"):
        build_dataset(path, tiny[1], max_length=41)
    with pytest.raises(BadSamplesError, match="text_only"):
        build_dataset(path, tiny[1], max_length=40)


def test_corrupt_pixels_fail_at_load_time(tiny, sample_dir, write_records):
    # A PNG cut in half passes the header-only pre-check; decoding in __getitem__ must still name the sample.
    data = (sample_dir / "board_b.png").read_bytes()
    (sample_dir / "cut.png").write_bytes(data[: len(data) // 2])
    path = write_records(sample_dir, [_sample("cut_png", image="cut.png"), _sample("good")])
    ds = build_dataset(path, tiny[1], max_length=100)
    with pytest.raises(DataError, match="cut_png"):
        ds[0]
    skipping = build_dataset(path, tiny[1], max_length=100, skip_bad_samples=True)
    good = skipping[1]
    assert (skipping[0]["input_ids"] == good["input_ids"]).all()  # replaced by the next good sample
    skipping[0]
    assert skipping.skipped == Counter(unreadable_image=1) and skipping.skipped_ids == ["cut_png"]
    # In a DataLoader worker process the error reaches the main process as a DataError naming the sample.
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=Collator(3))
    with pytest.raises(DataError, match="cut_png"):
        next(iter(loader))
    err = pickle.loads(pickle.dumps(DataError("cut_png", "unreadable_image", "broken", "f.json")))
    assert (err.sample_id, err.reason, str(err)) == (
        "cut_png",
        "unreadable_image",
        "sample 'cut_png' in f.json: broken",
    )
