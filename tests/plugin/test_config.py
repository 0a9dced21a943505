"""LibraConfig: validation, method presets, the ``libra_config.json`` round trip, layer checks at apply time."""

from __future__ import annotations

import json

import pytest

from libra_train import LibraConfig, apply_libra
from libra_train.plugin import libra_runtime
from tests.plugin.conftest import tiny_llama, tiny_llava


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "tome"}, "method"),
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"ratio": [0.5, 1.5], "layers": [1, 2]}, r"\[0, 1\)"),
        ({"ratio": [0.5, 0.5], "layers": [1, 2, 3]}, "2 values for 3 layers"),
        ({"ratio": [0.5], "layers": [1, 2]}, "1 values for 2 layers"),
        ({"layers": [3, 1]}, "sorted"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"layers": [-1, 2]}, "non-negative"),
        ({"layers": []}, "empty"),
        ({"select": "random"}, "select"),
        ({"merge": "sum"}, "merge"),
        ({"query": "first_token"}, "query"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LibraConfig(**kwargs)


@pytest.mark.parametrize(
    ("method", "select", "merge"),
    [("libra", "interval", "igm"), ("fastv", "topk", "prune"), ("turbo", "turbo", "mean")],
)
def test_method_presets(method, select, merge):
    cfg = LibraConfig(method=method)
    assert (cfg.select_method, cfg.merge_method) == (select, merge)


def test_explicit_select_merge_override_preset():
    cfg = LibraConfig(method="libra", select="topk", merge="igm_neg")
    assert (cfg.select_method, cfg.merge_method) == ("topk", "igm_neg")
    cfg = LibraConfig(method="fastv", merge="mean")
    assert (cfg.select_method, cfg.merge_method) == ("topk", "mean")


def test_ratios_broadcast_and_list():
    assert LibraConfig(layers=[1, 3, 4], ratio=0.5).ratios == [0.5, 0.5, 0.5]
    assert LibraConfig(layers=[1, 3], ratio=[0.5, 0.25]).ratios == [0.5, 0.25]
    assert LibraConfig(layers=[2], ratio=0).ratios == [0.0]


def test_save_and_load_round_trip(tmp_path):
    cfg = LibraConfig(method="turbo", layers=[1, 4], ratio=[0.5, 0.75], merge="igm", theta=0.6, lam=2.0)
    path = cfg.save_pretrained(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "libra_config.json"
    text = path.read_text()
    # peft-style: sorted keys, indented, trailing newline
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert json.loads(text)["ratio"] == [0.5, 0.75]
    for source in (tmp_path / "ckpt", path):  # the directory or the file itself
        loaded = LibraConfig.from_pretrained(source)
        assert loaded == cfg
        assert (loaded.select_method, loaded.merge_method) == ("turbo", "igm")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # the atomic write left nothing behind


def test_unknown_field_in_json_is_a_clear_error(tmp_path):
    data = LibraConfig().to_dict() | {"ratios": [0.5]}
    (tmp_path / "libra_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown LibraConfig field\(s\) \['ratios'\]"):
        LibraConfig.from_pretrained(tmp_path)


def test_invalid_value_in_json_names_the_file(tmp_path):
    (tmp_path / "libra_config.json").write_text(json.dumps({"method": "fastv", "ratio": 1.0}))
    with pytest.raises(ValueError, match="libra_config.json"):
        LibraConfig.from_pretrained(tmp_path)


def test_missing_or_broken_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="libra_config.json"):
        LibraConfig.from_pretrained(tmp_path)
    (tmp_path / "libra_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LibraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("layers", [[5], [1, 5], [2, 9]])
def test_layer_beyond_the_model_fails_at_apply(layers):
    model = tiny_llama()  # 6 layers: the last point that leaves a layer after it is 4
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="beyond this model's 6 layers"):
        apply_libra(model, LibraConfig(layers=layers))
    assert libra_runtime(model) is None  # nothing half-applied
    assert model.config._attn_implementation == impl
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_last_possible_layer_applies():
    model = apply_libra(tiny_llama(), LibraConfig(layers=[0, 4]))
    assert libra_runtime(model).points == {0: 0.5, 4: 0.5}


def test_unit_is_validated_and_old_saved_configs_read_as_one_span_per_sample(tmp_path):
    with pytest.raises(ValueError, match="unit"):
        LibraConfig(unit="tile")
    assert LibraConfig().unit is None  # the family's default, resolved by apply_libra
    old = {k: v for k, v in LibraConfig(layers=[1]).to_dict().items() if k != "unit"}
    (tmp_path / "libra_config.json").write_text(json.dumps(old))
    assert LibraConfig.from_pretrained(tmp_path).unit == "sample"  # saved before `unit` existed
    assert LibraConfig.from_dict(old).unit is None  # a recipe's block: the family's default
    LibraConfig(layers=[1], unit="image").save_pretrained(tmp_path)
    assert LibraConfig.from_pretrained(tmp_path).unit == "image"


def test_apply_resolves_the_family_unit_on_a_copy():
    config = LibraConfig(layers=[1])
    model = apply_libra(tiny_llava(), config)
    assert libra_runtime(model).config.unit == "image" and config.unit is None
