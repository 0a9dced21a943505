"""The pre-check at scale: cached per data file and configuration, parallel == serial, all problems reported."""

from __future__ import annotations

import json
import os

import pytest
import torch

from libra_train.data import BadSamplesError, build_dataset
from libra_train.data.encode import Encoder
from libra_train.data.precheck import auto_num_proc, config_key, file_key

Q = "what colour is the shape at row 1 column 2 ?"


def _records(n: int, bad: dict[int, str] | None = None) -> list[dict]:
    """n samples (every 5th text-only, 1-3 rounds); `bad` puts a problem at some rows."""
    out = []
    for i in range(n):
        turns = [{"from": "human", "value": Q}, {"from": "gpt", "value": "red"}] * (1 + i % 3)
        rec = {"id": f"s{i}", "conversations": turns}
        if i % 5:
            rec["image"] = "board_a.png"
            turns[0] = {"from": "human", "value": "<image>\n" + Q}
        kind = (bad or {}).get(i)
        if kind == "missing":
            rec["image"] = "nowhere.png"
            turns[0] = {"from": "human", "value": "<image>\n" + Q}
        elif kind == "roles":
            rec["conversations"] = turns[1:]
        out.append(rec)
    return out


def _same(a, b) -> None:
    assert (a.indices, a.lengths, a.has_images) == (b.indices, b.lengths, b.has_images)
    assert a.skipped == b.skipped and sorted(a.skipped_ids) == sorted(b.skipped_ids)
    for i in (0, 1, len(a) - 1):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_cached_equals_uncached_and_second_build_does_not_check(
    tiny, sample_dir, write_records, tmp_path, monkeypatch
):
    path = write_records(sample_dir, _records(40, {3: "missing", 7: "roles"}))
    kw = dict(max_length=256, skip_bad_samples=True)
    plain = build_dataset(path, tiny[1], **kw)
    first = build_dataset(path, tiny[1], cache_dir=tmp_path / "cache", **kw)
    _same(plain, first)
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "records").is_dir() and len(list(entry.glob("check-*/"))) == 1

    def no_check(*args, **kwargs):
        raise AssertionError("the pre-check ran again instead of loading the cache")

    monkeypatch.setattr(Encoder, "check_batch", no_check)
    monkeypatch.setattr("libra_train.data.records.normalize_record", no_check)
    _same(plain, build_dataset(path, tiny[1], cache_dir=tmp_path / "cache", **kw))


def test_cache_key_follows_file_and_configuration(tiny, sample_dir, write_records, tmp_path):
    path = write_records(sample_dir, _records(10))
    cache = tmp_path / "cache"
    a = build_dataset(path, tiny[1], max_length=256, cache_dir=cache)
    b = build_dataset(path, tiny[1], max_length=80, cache_dir=cache, skip_bad_samples=True)  # another config
    assert a.lengths != b.lengths and len(list(cache.glob("*/check-*/"))) == 2
    enc = Encoder(tiny[1], "vicuna_v1", 256, sample_dir)
    assert config_key(enc) == config_key(Encoder(tiny[1], "vicuna_v1", 256, sample_dir))
    assert config_key(enc) != config_key(Encoder(tiny[1], "chat_template", 256, sample_dir))
    assert config_key(enc) != config_key(Encoder(tiny[1], "vicuna_v1", 256, sample_dir, pad_to_square=False))
    key = file_key(path)
    path.write_text(json.dumps(_records(12)))  # new content, new key: the old entry is not used
    os.utime(path, ns=(1, 1))
    assert file_key(path) != key
    assert len(build_dataset(path, tiny[1], max_length=256, cache_dir=cache)) == 12


@pytest.mark.slow
def test_parallel_equals_serial_and_reports_every_problem(tiny, sample_dir, write_records, tmp_path):
    bad = {3: "missing", 17: "roles", 38: "missing"}
    path = write_records(sample_dir, _records(40, bad))
    serial = build_dataset(path, tiny[1], max_length=256, skip_bad_samples=True, num_proc=1)
    parallel = build_dataset(path, tiny[1], max_length=256, skip_bad_samples=True, num_proc=2)
    cached = build_dataset(
        path, tiny[1], max_length=256, skip_bad_samples=True, num_proc=2, cache_dir=tmp_path
    )
    _same(serial, parallel)
    _same(serial, cached)
    for kw in ({"num_proc": 2}, {"num_proc": 2, "cache_dir": tmp_path}):  # all three named, loaded or not
        with pytest.raises(BadSamplesError) as info:
            build_dataset(path, tiny[1], max_length=256, **kw)
        assert sorted(p.sample_id for p in info.value.problems) == ["s17", "s3", "s38"]
        assert "data.skip_bad_samples=true" in str(info.value) and str(path) in str(info.value)


def test_auto_num_proc(monkeypatch):
    monkeypatch.setattr("libra_train.data.precheck.available_cores", lambda: 8)
    assert [auto_num_proc(n, None) for n in (10, 5_000, 12_000, 665_000)] == [1, 1, 2, 8]
    assert auto_num_proc(665_000, 3) == 3
