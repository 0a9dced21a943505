"""One-paragraph errors where main printed tracebacks, ordinary permissions for exports, ``exports/`` ignored.

On main: ``model.path`` without a config.json ended in transformers' "should have a `model_type` key"
traceback, ``libra.layers`` beyond the model in a ValueError traceback from the plug-in, a typo inside
``libra:`` in "LibraConfig.__init__() got an unexpected keyword argument"; exports were 0700 (unreadable to
other users of a shared machine) and ``exports/`` was not in ``.gitignore``.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from libra_train.config import RecipeError, load_recipe
from libra_train.export import export_checkpoint
from libra_train.models import build_tiny_llava
from libra_train.plugin import LibraConfig
from libra_train.training.setup import check_libra_fits, hidden_size, libra_config
from tests.export.export_helpers import save_checkpoint
from tests.reliability.runs import BASE, ONE_PROCESS, REPO, run


def test_a_typo_inside_libra_names_the_key_and_the_closest_field():
    with pytest.raises(RecipeError, match=r"unknown key 'libra.ratoi' \(did you mean 'libra.ratio'\?\)"):
        load_recipe("demo", ["libra.ratoi=0.8"], validators=[libra_config])


def test_points_beyond_the_model_are_one_paragraph_with_the_key():
    model, _ = build_tiny_llava()  # 4 LLM layers: points 0..2
    with pytest.raises(RecipeError, match=r"libra.layers=\[3\] does not fit this model: .* 4 layers"):
        check_libra_fits(model, LibraConfig(layers=[3]))
    check_libra_fits(model, LibraConfig(layers=[2]))


def test_a_model_folder_without_config_json_is_left_to_the_loader(tmp_path: Path):
    cfg = load_recipe("demo", ["model.tiny=null", f"model.path={tmp_path}"])
    assert hidden_size(cfg) is None  # main: transformers' ValueError ("should have a `model_type` key")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.tiny=null", "model.path={empty}"],
            "has no config.json, so it is not a Hugging Face checkpoint",
        ),
        (["libra.layers=[5]"], "libra.layers=[5] does not fit this model"),
    ],
    ids=["model-without-config", "libra-layers-beyond"],
)
def test_train_py_prints_one_paragraph(tmp_path: Path, data, overrides: list[str], message: str):
    empty = tmp_path / "model"
    empty.mkdir()
    result = run(tmp_path / "run", [*data, *BASE, *ONE_PROCESS, *(o.format(empty=empty) for o in overrides)])
    assert result.rc == 1, result.describe()
    errors = [line for _, line in result.lines if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.describe()
    assert "Traceback" not in result.output


def test_exports_get_ordinary_permissions_and_clean_up_after_killed_exports(tmp_path: Path):
    model, processor = build_tiny_llava()
    checkpoint = save_checkpoint(
        tmp_path / "checkpoint-7", model, processor, libra=LibraConfig(layers=[1]), recipe=None
    )
    exports = tmp_path / "exports"
    exports.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = exports / f".demo.partial-{dead.pid}-0123abcd"  # what a killed export leaves
    leftover.mkdir()
    old = os.umask(0o022)
    try:
        out = export_checkpoint(checkpoint, exports / "demo")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # main: 0o700 (tempfile.mkdtemp)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}
    assert not leftover.exists() and sorted(p.name for p in exports.iterdir()) == ["demo"]


def test_exports_are_ignored_by_git():
    done = subprocess.run(["git", "check-ignore", "-q", "exports/demo/config.json"], cwd=REPO)
    assert done.returncode == 0
