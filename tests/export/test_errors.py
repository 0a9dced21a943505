"""Bad input: clear errors that name the file, and nothing written half-way."""

from __future__ import annotations

import json
import shutil

import pytest

import libra_train.export as export_module
from libra_train import LibraConfig
from libra_train.data.records import DataError
from libra_train.export import export_checkpoint
from libra_train.infer import Query, evaluate, generate, load, load_qa
from tests.export.export_helpers import TRAIN_CONFIG, load_script, queries, save_checkpoint


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nope does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_merge_config(tiny, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny[0], tiny[1], libra=None, recipe=None)
    with pytest.raises(ValueError, match=r"ckpt has no merge config \(libra_config.json\).*--libra-config"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # an explicit config is accepted
    (tmp_path / "cfg").mkdir()
    TRAIN_CONFIG.save_pretrained(tmp_path / "cfg")
    out = export_checkpoint(checkpoint, tmp_path / "out", libra_config=tmp_path / "cfg" / "libra_config.json")
    assert LibraConfig.from_pretrained(out) == TRAIN_CONFIG


def test_merge_config_beyond_the_model(checkpoint, tmp_path):
    with pytest.raises(
        ValueError, match=r"does not fit the model of .*checkpoint-7.*\[3\] are beyond this model's 4"
    ):
        export_checkpoint(checkpoint, tmp_path / "out", libra_config=LibraConfig(layers=[1, 3]))
    assert not (tmp_path / "out").exists()


def test_load_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory .*missing does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match=r"noconfig/config.json not found"):
        load(tmp_path / "noconfig")
    with pytest.raises(ValueError, match=r"does not fit the model in .*demo.*\[3\] are beyond"):
        load(exported, libra={"layers": [3]})
    with pytest.raises(ValueError, match="unknown LibraConfig field"):
        load(exported, libra={"ratios": 0.3})
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        load(exported, dtype="bf16")


def test_export_without_merge_config_needs_off(exported, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / "libra_config.json").unlink()
    config = json.loads((bare / "config.json").read_text())
    del config["libra_merging"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bare has no merge config.*libra='off'"):
        load(bare)
    load(bare, libra="off")
    load(bare, libra={"layers": [1]})  # an explicit config


def test_disagreeing_merge_configs(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    LibraConfig(layers=[2]).save_pretrained(bad)
    with pytest.raises(
        ValueError, match=r"libra_config.json and the 'libra_merging' key of .*config.json disagree"
    ):
        load(bad)
    (bad / "libra_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="libra_config.json is not valid JSON"):
        load(bad)


def test_bad_images(exported, demo, tmp_path, capsys):
    model, processor = load(exported)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*broken.png"):
        generate(model, processor, [Query.single("q ?", str(broken))], template="vicuna_v1")
    with pytest.raises(DataError, match=r"image file .*absent.png not found"):
        generate(model, processor, [Query.single("q ?", str(tmp_path / "absent.png"))], template="vicuna_v1")
    examples = load_qa(demo / "val.json")
    with pytest.raises(FileNotFoundError, match=r"(?s)8 image file\(s\) not found .*wrong/val_00000.png"):
        evaluate(
            model, processor, examples, template="vicuna_v1", image_folder=tmp_path / "wrong", progress=False
        )
    argv = [str(exported), "--image", str(broken), "--prompt", "q ?"]
    assert load_script("generate").main(argv) == 2
    assert "broken.png" in capsys.readouterr().err
    argv = [str(exported), "--data", str(demo / "val.json"), "--image-folder", str(tmp_path)]
    assert load_script("evaluate").main(argv) == 2
    assert "val_00000.png" in capsys.readouterr().err


def test_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="out exists and is not empty; .*--overwrite"):
        export_checkpoint(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    argv = ["--checkpoint", str(checkpoint), "--out", str(out)]
    assert load_script("export").main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert load_script("export").main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "libra_config.json").is_file()
    assert "| 2-3 | 19 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="would replace the checkpoint"):
        export_checkpoint(checkpoint, checkpoint.parent, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        export_checkpoint(checkpoint, tmp_path / "file", overwrite=True)


def test_failure_mid_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "model_card", boom)  # after weights and configs were written
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # with --overwrite, the previous export survives a failed one
    monkeypatch.undo()
    export_checkpoint(checkpoint, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(export_module, "model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_queries_need_a_final_user_turn(exported, demo):
    model, processor = load(exported)
    bad = Query([("user", "q"), ("assistant", "a")], [], "x")
    with pytest.raises(ValueError, match="must end with a user turn"):
        generate(
            model, processor, [*queries(demo, 1), bad], template="vicuna_v1", image_folder=demo / "images"
        )
