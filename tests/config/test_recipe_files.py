"""Every bundled recipe loads and validates; twins differ only in libra.enabled; values match their sources."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from libra_train.config import (
    RecipeConfig,
    compose,
    deepspeed_config,
    list_recipes,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)
from tests.config.recipe_helpers import RECIPE_FILES, TWINS, dummy_overrides

REAL_MODEL_KEYS = {"model.path", "data.train", "data.image_folder"}
# Decoder layers of each recipe's LLM (tiny demo model: 4), for LibraConfig.check_num_layers.
# Qwen2.5-VL-7B and LLaVA-OneVision-7B (Qwen2-7B): 28; Qwen3-VL-8B: 36.
LLM_LAYERS = {
    "tiny": 4,
    "llava": 32,
    "llava_next": 32,
    "qwen2_vl": 28,
    "qwen2_5_vl": 28,
    "qwen3_vl": 36,
    "llava_onevision": 28,
}


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_recipe_loads_and_validates(path):
    cfg = load_recipe(path, dummy_overrides(str(path)))
    assert isinstance(cfg, RecipeConfig)
    assert cfg.recipe_name == path.stem
    assert cfg.train.output_dir == f"outputs/{path.stem}"
    ds = deepspeed_config(cfg, world_size=1)
    assert "auto" not in str(ds)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_only_real_checkpoints_and_data_are_mandatory(path):
    missing = set(OmegaConf.missing_keys(compose(path)))
    if path.stem.endswith("_lora") and path.stem.startswith("demo"):
        expected = {"model.path"}  # the exported demo_full model; the data is the generated demo set
    else:
        expected = set() if path.stem.startswith("demo") else REAL_MODEL_KEYS
    assert missing == expected


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_header_gives_the_launch_command(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert path.read_text().startswith("#")
    assert any(f"train.py recipe={path.stem}" in line for line in header)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_libra_section_is_a_valid_libra_config(path):
    plugin_config = pytest.importorskip("libra_train.plugin.config")
    cfg = load_recipe(
        path, dummy_overrides(str(path)), validators=[lambda c: plugin_config.LibraConfig.from_dict(c.libra)]
    )
    libra = plugin_config.LibraConfig.from_dict(cfg.libra)
    libra.check_num_layers(LLM_LAYERS["tiny" if cfg.model.tiny is not None else cfg.model.family])


def test_every_recipe_has_a_twin():
    assert sorted(name for pair in TWINS for name in pair) == list_recipes()


@pytest.mark.parametrize(("libra", "full"), TWINS)
def test_twins_differ_only_in_libra_enabled(libra, full):
    a = _flat(recipe_to_dict(load_recipe(libra, dummy_overrides(libra))))
    b = _flat(recipe_to_dict(load_recipe(full, dummy_overrides(full))))
    # The name (and the output_dir derived from it) and the source file are meant to differ.
    diff = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert diff == {"libra.enabled", "recipe_name", "recipe_path", "train.output_dir"}
    assert a["libra.enabled"] is True
    assert b["libra.enabled"] is False


def test_llava15_is_llava_finetune_sh():
    # scripts/v1_5/finetune.sh of haotian-liu/LLaVA (8 GPUs x 16 per device, no accumulation).
    cfg = load_recipe("llava15_libra", dummy_overrides("llava15_libra"))
    t, d, m = cfg.train, cfg.data, cfg.model
    assert (t.lr, t.scheduler, t.warmup_ratio, t.weight_decay, t.epochs) == (2e-5, "cosine", 0.03, 0.0, 1.0)
    assert (t.global_batch_size, t.micro_batch_size, t.precision, t.deepspeed) == (128, 16, "bf16", "zero3")
    assert t.gradient_checkpointing and d.group_by_modality_length
    assert (d.template, d.max_length) == ("vicuna_v1", 2048)
    assert m.freeze_vision_tower and m.train_projector and m.train_llm and not cfg.lora.enabled
    assert cfg.libra["layers"] == [7, 15, 23] and cfg.libra["ratio"] == 0.5


def test_llava15_lora_is_llava_finetune_lora_sh():
    cfg = load_recipe("llava15_libra_lora", dummy_overrides("llava15_libra_lora"))
    lora = cfg.lora
    assert lora.enabled and (lora.r, lora.alpha, lora.dropout, lora.projector_lr) == (128, 256, 0.05, 2e-5)
    assert cfg.train.lr == 2e-4 and not cfg.model.train_llm and cfg.model.train_projector


def test_demo_lora_adapts_the_demo_model_on_the_demo_data():
    demo = load_recipe("demo")
    cfg = load_recipe("demo_libra_lora", ["model.path=exports/demo_full"])
    assert (
        cfg.model.tiny is None and cfg.model.path == "exports/demo_full" and cfg.data.demo == demo.data.demo
    )
    assert cfg.lora.enabled and not cfg.model.train_llm and cfg.model.freeze_vision_tower
    assert cfg.libra["layers"] == demo.libra["layers"] and cfg.libra["ratio"] == 0.8


def test_other_families():
    nxt = load_recipe("llava_next_libra", dummy_overrides("llava_next_libra"))
    assert (nxt.model.family, nxt.data.template, nxt.libra["layers"]) == (
        "llava_next",
        "chat_template",
        [7, 15, 23],
    )
    qwen = load_recipe("qwen2vl_libra", dummy_overrides("qwen2vl_libra"))
    assert (qwen.model.family, qwen.data.template) == ("qwen2_vl", "chat_template")
    assert qwen.libra["layers"] == [6, 13, 20] and qwen.libra["ratio"] == 0.5


@pytest.mark.parametrize(
    ("recipe", "family", "layers"),
    [
        ("qwen25vl_libra", "qwen2_5_vl", [6, 13, 20]),
        ("qwen3vl_libra", "qwen3_vl", [8, 17, 26]),
        ("llava_ov_libra", "llava_onevision", [6, 13, 20]),
    ],
)
def test_new_family_recipes(recipe, family, layers):
    cfg = load_recipe(recipe, dummy_overrides(recipe))
    assert (cfg.model.family, cfg.data.template) == (family, "chat_template")
    assert cfg.libra["layers"] == layers and cfg.libra["ratio"] == 0.5
    assert cfg.libra["unit"] == "frame"  # each family's default, written out
    assert cfg.model.freeze_vision_tower and cfg.model.train_projector and cfg.model.train_llm


def test_demo_recipe():
    cfg = load_recipe("demo")
    assert cfg.model.tiny == {} and cfg.model.path is None and not cfg.model.freeze_vision_tower
    assert cfg.data.demo == {"n_train": 3000, "n_val": 200, "image_size": 48, "grid": 2, "max_turns": 4}
    assert cfg.libra["layers"] == [1] and cfg.libra["query"] == "answer_starts"
    assert (cfg.train.precision, cfg.train.deepspeed, cfg.train.gradient_checkpointing) == (
        "fp32",
        "zero2",
        False,
    )
    assert cfg.logging.wandb is False


def test_save_recipe_round_trip(tmp_path):
    cfg = load_recipe("demo", ["train.lr=5e-4", "libra.layers=[1,2]"])
    saved = save_recipe(cfg, tmp_path / "ckpt" / "recipe.yaml")
    text = saved.read_text()
    assert "${" not in text  # resolved
    again = load_recipe(saved)
    assert again.recipe_name == "demo" and again.train.output_dir == "outputs/demo"
    assert dataclasses.replace(again, recipe_path=None) == dataclasses.replace(cfg, recipe_path=None)


def test_save_recipe_from_dictconfig(tmp_path):
    saved = save_recipe(compose("demo", ["train.seed=7"]), tmp_path / "recipe.yaml")
    again = load_recipe(saved)
    assert again.train.seed == 7 and again.train.output_dir == "outputs/demo"
