"""key=value overrides, ~key deletion, and the error messages of unknown keys, wrong types, missing values."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from libra_train.config import RecipeError, compose, load_recipe, validate


def _error(recipe: str, overrides: list[str], **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides, **kwargs)
    return str(info.value)


def test_values_are_yaml_typed():
    cfg = load_recipe(
        "demo",
        ["train.lr=2e-5", "train.epochs=2", "train.max_steps=10", "logging.wandb=true", "data.eval=null"],
    )
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.max_steps == 10 and cfg.logging.wandb is True and cfg.data.eval is None


def test_nested_and_list_values():
    cfg = load_recipe(
        "demo",
        ["model.tiny.image_size=32", "data.demo.grid=4", "libra.layers=[1,2]", "libra.ratio=[0.5,0.25]"],
    )
    assert cfg.model.tiny == {"image_size": 32}
    assert cfg.data.demo == {"n_train": 3000, "n_val": 200, "image_size": 48, "grid": 4, "max_turns": 4}
    assert cfg.libra["layers"] == [1, 2] and cfg.libra["ratio"] == [0.5, 0.25]
    assert load_recipe("demo", ["model.tiny={image_size: 32, vision_layers: 1}"]).model.tiny == {
        "image_size": 32,
        "vision_layers": 1,
    }


def test_later_override_wins():
    assert load_recipe("demo", ["train.lr=1e-4", "train.lr=3e-4"]).train.lr == 3e-4


def test_tilde_deletes_or_resets_to_schema_default():
    cfg = load_recipe("demo", ["~libra.theta", "~train.lr", "~model.tiny", "model.path=/ckpt"])
    assert "theta" not in cfg.libra and cfg.libra["layers"] == [1]
    assert cfg.train.lr == 2e-5  # the schema default, not the demo's 3e-4
    assert cfg.model.tiny is None and cfg.model.path == "/ckpt"
    assert load_recipe("demo", ["~libra"]).libra == {}
    assert load_recipe("demo", ["~train"]).train.output_dir == "outputs/demo"


def test_deleting_an_unset_key_is_an_error():
    assert "cannot delete 'libra.nope'" in _error("demo", ["~libra.nope"])


def test_values_are_never_evaluated():
    cfg = load_recipe("demo", ["logging.wandb_project=__import__('os').getcwd()"])
    assert cfg.logging.wandb_project == "__import__('os').getcwd()"


def test_unknown_key_names_key_and_recipe():
    msg = _error("demo", ["train.lrr=1e-4"])
    assert msg.startswith("recipes/demo.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)")
    assert "train.lrr=1e-4" in msg
    assert "did you mean 'train.lr'" in _error("demo", ["lr=1e-4"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model:\n  tiny: {}\ndata:\n  demo: {}\ntrain:\n  micro_batch_size: 4\n  global_batch: 8\n"
    )
    with pytest.raises(
        RecipeError,
        match=r"mine\.yaml: unknown key 'train\.global_batch' \(did you mean 'train\.global_batch_size'\?\)",
    ):
        load_recipe(path)


def test_wrong_types_name_key_type_and_value():
    assert _error("demo", ["train.lr=abc"]).startswith(
        "recipes/demo.yaml: train.lr must be a float, got 'abc'"
    )
    assert "train.micro_batch_size must be an integer, got 2.5" in _error(
        "demo", ["train.micro_batch_size=2.5"]
    )
    assert "model.tiny must be a mapping or null, got [1]" in _error("demo", ["model.tiny=[1]"])
    assert "logging.wandb must be a boolean" in _error("demo", ["logging.wandb=maybe"])
    assert "libra must be a mapping" in _error("demo", ["libra=5"])
    assert "train must be a mapping" in _error("demo", ["train=3"])
    assert "'train.lr' is a single value" in _error("demo", ["train.lr.x=1"])


def test_bad_yaml(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "list.yaml: a recipe is a YAML mapping" in _error(str(tmp_path / "list.yaml"), [])
    (tmp_path / "broken.yaml").write_text("train: {lr: [\n")
    assert "broken.yaml: cannot read the YAML" in _error(str(tmp_path / "broken.yaml"), [])
    assert "recipe 'nope' not found" in _error("nope", [])
    assert "cannot parse '[1,' as a YAML value" in _error("demo", ["libra.layers=[1,"])
    assert "overrides look like key=value" in _error("demo", ["train.lr"])


def test_missing_mandatory_value_says_how_to_get_it():
    msg = _error("llava15_libra", [])
    assert msg.startswith("recipes/llava15_libra.yaml: these values are ??? in the recipe")
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir checkpoints/llava-1.5-7b-hf" in msg
    assert "llava_v1_5_mix665k.json" in msg and "data.image_folder=" in msg
    msg = _error("qwen2vl_full", ["data.train=a.json", "data.image_folder=img"])
    assert "model.path=" in msg and "Qwen/Qwen2-VL-7B-Instruct" in msg and "data.train" not in msg


def test_interpolations():
    cfg = compose("demo")
    assert isinstance(cfg, DictConfig)
    assert OmegaConf.to_container(cfg)["train"]["output_dir"] == "outputs/${recipe_name}"  # not resolved yet
    assert load_recipe("demo", ["recipe_name=exp1"]).train.output_dir == "outputs/exp1"
    assert "train.output_dir: Interpolation key 'nope' not found" in _error(
        "demo", ["train.output_dir=${nope}"]
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.precision=bf61"], "train.precision must be one of bf16, fp16, fp32, got 'bf61'"),
        (["train.scheduler=step"], "train.scheduler must be one of cosine, linear, constant"),
        (
            ["train.deepspeed=zero4"],
            "train.deepspeed must be one of zero2, zero3, zero3_offload or an existing .json",
        ),
        (
            ["train.resume=/no/such/dir"],
            "train.resume must be null, 'latest' or an existing checkpoint directory",
        ),
        (["model.path=/ckpt"], "set exactly one of model.path"),
        (["~model.tiny"], "set exactly one of model.path"),
        (["data.demo=null"], "set data.train"),
        (["data.template=alpaca"], "data.template must be one of vicuna_v1, chat_template"),
        (["model.family=blip"], "model.family must be one of llava, llava_next, qwen2_vl"),
        (
            ["train.global_batch_size=40"],
            "train.global_batch_size (40) must be divisible by train.micro_batch_size (16)",
        ),
        (["lora.enabled=true"], "set model.train_llm=false"),
        (["lora.target_regex=(q_proj"], "lora.target_regex is not a valid regular expression"),
        (["train.warmup_ratio=1.5"], "train.warmup_ratio must be in [0, 1)"),
        (["logging.wandb_mode=cloud"], "logging.wandb_mode must be one of online, offline, disabled"),
    ],
)
def test_semantic_validation(overrides, expected):
    msg = _error("demo", overrides)
    assert msg.startswith("recipes/demo.yaml: ") and expected in msg


def test_all_problems_are_reported_together():
    msg = _error("demo", ["train.precision=bf61", "train.scheduler=step"])
    assert "2 problems" in msg and "train.precision" in msg and "train.scheduler" in msg


def test_valid_alternatives(tmp_path):
    ds = tmp_path / "my_ds.json"
    ds.write_text("{}")
    (tmp_path / "ckpt").mkdir()
    cfg = load_recipe("demo", [f"train.deepspeed={ds}", f"train.resume={tmp_path / 'ckpt'}"])
    assert cfg.train.deepspeed == str(ds)
    assert load_recipe("demo", ["train.resume=latest"]).train.resume == "latest"


def test_world_size_divisibility():
    cfg = load_recipe("demo")
    validate(cfg, world_size=1)
    with pytest.raises(
        RecipeError, match=r"recipes/demo\.yaml: train\.global_batch_size \(16\) must be divisible .* = 32"
    ):
        validate(cfg, world_size=2)
    assert "world size (2)" in _error("demo", [], world_size=2)
    validate(load_recipe("demo", ["train.micro_batch_size=8"]), world_size=2)


def test_validators_are_called_and_prefixed():
    seen = []

    def libra_config(cfg):
        seen.append(cfg.libra["layers"])
        if cfg.libra["ratio"] >= 1:
            raise ValueError("LibraConfig.ratio must be in [0, 1)")

    load_recipe("demo", validators=[libra_config])
    assert seen == [[1]]
    with pytest.raises(
        RecipeError, match=r"^recipes/demo\.yaml: libra_config: LibraConfig\.ratio must be"
    ) as info:
        load_recipe("demo", ["libra.ratio=1.5"], validators=[libra_config])
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("key", ["train", "eval", "image_folder"])
def test_demo_data_keys_are_not_silently_replaced(key):
    # recipe=demo generates its data and points data.train/eval/image_folder there: a value of the user's would
    # be ignored, so it is an error that says how to use it.
    msg = _error("demo", [f"data.{key}=mine.json"])
    assert f"data.{key}=mine.json is set, but data.demo generates the data" in msg and "~data.demo" in msg
    cfg = load_recipe("demo", ["~data.demo", "data.train=my.json", f"data.{key}=mine.json"])
    assert cfg.data.demo is None and getattr(cfg.data, key) == "mine.json"


def test_demo_paths_written_back_by_a_run_still_load(tmp_path):
    # A run resolves data.train/eval/image_folder to the generated set and saves that recipe in its checkpoints.
    from libra_train.config import save_recipe
    from libra_train.config.schema import demo_data_paths

    out = str(tmp_path / "run")
    cfg = load_recipe("demo", [f"train.output_dir={out}"])
    for key, value in demo_data_paths(out).items():
        setattr(cfg.data, key, value)
    again = load_recipe(save_recipe(cfg, tmp_path / "recipe.yaml"))
    assert again.data.train == f"{out}/demo_data/train.json" and again.data.demo == cfg.data.demo


def test_tiny_model_ignores_no_family():
    msg = _error("demo", ["model.family=qwen2_vl"])
    assert "model.family=qwen2_vl is set, but model.tiny builds a tiny LLaVA-1.5" in msg
    assert (
        load_recipe("demo", ["model.tiny=null", "model.path=ckpt", "model.family=qwen2_vl"]).model.path
        == "ckpt"
    )
