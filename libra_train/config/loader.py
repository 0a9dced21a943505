"""Load a recipe: YAML + ``key=value`` overrides -> schema-checked ``DictConfig`` -> typed ``RecipeConfig``.

Values are merged onto ``OmegaConf.structured(RecipeConfig)`` one key at a time (not with
``OmegaConf.merge``) so that every error names the key, the recipe file and, for an override, the
override itself; OmegaConf's own exceptions never reach the user. Override values are parsed as YAML
(``train.lr=2e-5`` is a float, ``libra.layers=[1,3]`` a list, ``model.tiny=null`` None); nothing is
``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from libra_train.config.errors import RecipeError
from libra_train.config.paths import display_path, resolve_recipe
from libra_train.config.schema import RecipeConfig
from libra_train.config.validate import validate

Validator = Callable[[RecipeConfig], object]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LLAVA_DATA = (
    "LLaVA-1.5's instruction data: llava_v1_5_mix665k.json from the dataset liuhaotian/LLaVA-Instruct-150K "
    "(huggingface-cli download liuhaotian/LLaVA-Instruct-150K llava_v1_5_mix665k.json --repo-type dataset "
    "--local-dir data/llava), then data.train=data/llava/llava_v1_5_mix665k.json"
)
_LLAVA_IMAGES = (
    "the images of llava_v1_5_mix665k.json (COCO train2017, GQA, OCR-VQA, TextVQA, VisualGenome) laid out "
    "as in https://github.com/haotian-liu/LLaVA#visual-instruction-tuning (coco/ gqa/ ocr_vqa/ textvqa/ vg/ "
    "under one folder), then data.image_folder=<that folder>"
)
# What to do about a "???" value, per key and per model.family ("*" = any family).
MISSING_HINTS: dict[str, dict[str, str]] = {
    "model.path": {
        "llava": "get LLaVA-1.5-7B in HF format: huggingface-cli download llava-hf/llava-1.5-7b-hf "
        "--local-dir checkpoints/llava-1.5-7b-hf, then model.path=checkpoints/llava-1.5-7b-hf",
        "llava_next": "get a LLaVA-NeXT checkpoint in HF format, e.g. huggingface-cli download "
        "llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-v1.6-vicuna-7b-hf (or "
        "llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llama3-llava-next-8b-hf), then model.path=<that dir>",
        "qwen2_vl": "get Qwen2-VL-7B-Instruct: huggingface-cli download Qwen/Qwen2-VL-7B-Instruct "
        "--local-dir checkpoints/Qwen2-VL-7B-Instruct, then model.path=checkpoints/Qwen2-VL-7B-Instruct",
        "qwen2_5_vl": "get Qwen2.5-VL-7B-Instruct: huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct "
        "--local-dir checkpoints/Qwen2.5-VL-7B-Instruct, then model.path=checkpoints/Qwen2.5-VL-7B-Instruct",
        "qwen3_vl": "get Qwen3-VL-8B-Instruct: huggingface-cli download Qwen/Qwen3-VL-8B-Instruct "
        "--local-dir checkpoints/Qwen3-VL-8B-Instruct, then model.path=checkpoints/Qwen3-VL-8B-Instruct",
        "llava_onevision": "get LLaVA-OneVision-7B in HF format: huggingface-cli download "
        "llava-hf/llava-onevision-qwen2-7b-ov-hf --local-dir checkpoints/llava-onevision-qwen2-7b-ov-hf, then "
        "model.path=checkpoints/llava-onevision-qwen2-7b-ov-hf",
    },
    "data.train": {"*": _LLAVA_DATA},
    "data.image_folder": {"*": _LLAVA_IMAGES},
}


@dataclasses.dataclass
class _Source:
    """Where values come from, for error messages."""

    path: str  # the recipe file as displayed
    override: str | None = None  # the override being applied, if any

    def error(self, message: str) -> RecipeError:
        where = f" (in override {self.override!r})" if self.override else ""
        return RecipeError(f"{self.path}: {message}{where}")


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    """Resolved type hints of a schema dataclass."""
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """``float | None`` -> ``a float or null``: the type as a user reads it."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    origin = typing.get_origin(base) or base
    names = {float: "a float", int: "an integer", bool: "a boolean (true/false)", str: "a string"}
    name = "a mapping" if origin is dict or dataclasses.is_dataclass(origin) else names.get(origin, str(base))
    return f"{name} or null" if optional else name


def _is_mapping_type(tp: Any) -> bool:
    """A section (dataclass) or a free mapping field (``dict[str, Any]``, optionally ``| None``)."""
    args = typing.get_args(tp) if typing.get_origin(tp) is not dict else ()
    return any(typing.get_origin(t) is dict or t is dict or dataclasses.is_dataclass(t) for t in (tp, *args))


def _schema_type(node: DictConfig) -> type | None:
    """The dataclass behind a structured node, None for a plain mapping (``libra``, ``model.tiny``)."""
    cls = OmegaConf.get_type(node)
    return cls if dataclasses.is_dataclass(cls) else None


def _unknown(cls: type, key: str, prefix: str, src: _Source) -> RecipeError:
    fields = _fields(cls)
    guess: list[str] = []
    if not prefix:  # a section-less key such as "lr": find the section that has it
        guess = [
            f"{name}.{key}"
            for name, tp in fields.items()
            if dataclasses.is_dataclass(tp) and key in _fields(tp)
        ]
    guess = guess or difflib.get_close_matches(key, list(fields), n=1)
    hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else f" (known: {', '.join(fields)})"
    return src.error(f"unknown key '{prefix}{key}'{hint}")


def _set(node: DictConfig, key: str, value: Any, full_key: str, src: _Source) -> None:
    """``node[key] = value`` with a type error that names the key and the expected type."""
    if isinstance(value, DictConfig):  # a schema default (``~key``): copy it without resolving ${...}
        value = OmegaConf.to_container(value, resolve=False)
    cls = _schema_type(node)
    if cls is not None:
        tp = _fields(cls)[key]
        if dataclasses.is_dataclass(tp):  # a whole section: merge it key by key
            if not isinstance(value, Mapping):
                raise src.error(f"{full_key} must be a mapping (a section of the recipe), got {value!r}")
            _merge(node[key], value, f"{full_key}.", src)
            return
    else:  # a free mapping (libra, model.tiny, ...): any key, any value
        node[key] = value
        return
    try:
        # update() rather than node[key] = value: an explicit conversion (3 -> 3.0 for a float field),
        # which OmegaConf 2.4 no longer does silently on plain assignment.
        OmegaConf.update(node, key, value, merge=False)
    except ValidationError:
        raise src.error(f"{full_key} must be {_describe(_fields(cls)[key])}, got {value!r}") from None


def _merge(node: DictConfig, raw: Mapping[str, Any], prefix: str, src: _Source) -> None:
    """Assign every key of ``raw`` into ``node``, recursing into sections; unknown keys are errors."""
    cls = _schema_type(node)
    for key, value in raw.items():
        if cls is not None and key not in _fields(cls):
            raise _unknown(cls, str(key), prefix, src)
        _set(node, key, value, f"{prefix}{key}", src)


def _parse_value(text: str, src: _Source) -> Any:
    """Parse an override's value as YAML (OmegaConf's loader: ``2e-5`` is a float), never ``eval``."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"_={text}"]))["_"]
    except Exception as exc:  # yaml's and OmegaConf's parse errors
        raise src.error(f"cannot parse {text!r} as a YAML value: {str(exc).splitlines()[0]}") from None


def _walk(cfg: DictConfig, parts: list[str], src: _Source, create: bool) -> DictConfig | None:
    """The node holding ``parts[-1]``; with ``create`` missing mappings on the way are made."""
    node, prefix = cfg, ""
    for part in parts[:-1]:
        cls = _schema_type(node)
        if cls is not None and part not in _fields(cls):
            raise _unknown(cls, part, prefix, src)
        full = f"{prefix}{part}"
        if cls is not None and not _is_mapping_type(_fields(cls)[part]):
            raise src.error(f"'{full}' is a single value, not a mapping with keys")
        child = node.get(part)
        if child is None:
            if not create:
                return None
            node[part] = {}
            child = node[part]
        if not isinstance(child, DictConfig):
            raise src.error(f"'{full}' is a single value ({child!r}), not a mapping with keys")
        node, prefix = child, f"{full}."
    return node


def _apply_override(cfg: DictConfig, item: str, defaults: DictConfig, src: _Source) -> None:
    """Apply one ``key=value`` or ``~key`` to ``cfg`` in place."""
    delete = item.startswith("~")
    key, eq, text = item[1:].partition("=") if delete else item.partition("=")
    if not _KEY.match(key) or delete == bool(eq):
        raise src.error("overrides look like key=value (train.lr=2e-5) or ~key (~libra.layers)")
    parts = key.split(".")
    node = _walk(cfg, parts, src, create=not delete)
    leaf = parts[-1]
    cls = _schema_type(node) if node is not None else None
    if cls is not None and leaf not in _fields(cls):
        raise _unknown(cls, leaf, key[: -len(leaf)], src)
    if not delete:
        _set(node, leaf, _parse_value(text, src), key, src)
    elif cls is not None:  # a schema field: back to its default
        _set(node, leaf, OmegaConf.select(defaults, key), key, src)
    elif node is None or leaf not in node:
        raise src.error(f"cannot delete '{key}': the recipe does not set it")
    else:
        del node[leaf]


def compose(recipe: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The recipe YAML with the overrides applied, checked against the schema (keys and types).

    Interpolations (``${recipe_name}``) are not resolved yet and ``???`` values may remain; use
    ``load_recipe`` for the checked, typed result.

    Args:
        recipe: a bundled recipe name (``demo``) or a path to a YAML file.
        overrides: ``key=value`` and ``~key`` items, applied in order after the YAML.

    Raises:
        RecipeError: unknown recipe, unreadable YAML, unknown key or wrong type.
    """
    path = resolve_recipe(recipe)
    src = _Source(display_path(path))
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # YAML syntax errors and duplicate keys come in several types
        raise src.error(f"cannot read the YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise src.error("a recipe is a YAML mapping of sections (model:, data:, libra:, train:, ...)")

    defaults = OmegaConf.structured(RecipeConfig)
    cfg = defaults.copy()
    cfg.recipe_name = path.stem
    _merge(cfg, raw, "", src)
    cfg.recipe_path = str(path)
    for item in overrides:
        _apply_override(cfg, item, defaults, _Source(src.path, item))
    return cfg


def _missing_message(cfg: DictConfig, missing: list[str], src: _Source) -> RecipeError:
    """One line per ``???`` key, with what to download/pass (``MISSING_HINTS``)."""
    family = OmegaConf.select(cfg, "model.family", default="llava", throw_on_missing=False)
    lines = []
    for key in [k for k in MISSING_HINTS if k in missing] + [k for k in missing if k not in MISSING_HINTS]:
        hints = MISSING_HINTS.get(key, {})
        hint = hints.get(family) or hints.get("*")
        lines.append(f"  {key}=...  " + (hint or "this recipe has no default for it"))
    return src.error(
        "these values are ??? in the recipe and must be given on the command line:\n" + "\n".join(lines)
    )


def load_recipe(
    recipe: str | Path,
    overrides: Sequence[str] = (),
    *,
    validators: Sequence[Validator] = (),
    world_size: int = 1,
) -> RecipeConfig:
    """Load, override, type-check and validate a recipe.

    Args:
        recipe: a bundled recipe name (``demo`` -> ``recipes/demo.yaml``) or a path to a YAML file
            (a recipe saved by ``save_recipe`` included).
        overrides: ``key=value`` / ``~key`` items (see ``libra_train.config.cli``).
        validators: extra checks called with the typed config, e.g. ``lambda c: LibraConfig(**c.libra)``;
            what they raise is re-raised as ``RecipeError`` prefixed with the recipe file.
        world_size: number of data-parallel processes, for the batch-size divisibility check.

    Returns:
        The typed recipe; ``train.output_dir`` and other interpolations are resolved.

    Raises:
        RecipeError: anything wrong with the recipe, the overrides or a value (one message, printable).
    """
    cfg = compose(recipe, overrides)
    src = _Source(display_path(cfg.recipe_path))
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        typed = None if missing else OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # e.g. an interpolation to an unknown key
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise src.error(f"{key}: {first}" if key else first) from None
    if missing:
        raise _missing_message(cfg, missing, src)
    assert isinstance(typed, RecipeConfig)
    validate(typed, world_size=world_size)
    for check in validators:
        try:
            check(typed)
        except Exception as exc:
            name = getattr(check, "__name__", "<lambda>")
            raise src.error(str(exc) if name == "<lambda>" else f"{name}: {exc}") from exc
    return typed


def recipe_to_dict(cfg: RecipeConfig | DictConfig) -> dict[str, Any]:
    """The recipe as plain, resolved Python containers (for wandb's ``config=`` and JSON logs)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict)
    return out


def save_recipe(cfg: RecipeConfig | DictConfig, path: str | Path) -> Path:
    """Write the resolved recipe as YAML (into a checkpoint); ``load_recipe(path)`` reads it back.

    Args:
        cfg: the typed recipe (what the run actually used, including changes made after loading) or a
            composed ``DictConfig``.
        path: the file to write; parent directories are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    name = OmegaConf.select(node, "recipe_name", default="recipe")
    header = f"# Resolved recipe '{name}' as used by the run; reload with: python train.py recipe={path}\n"
    path.write_text(header + OmegaConf.to_yaml(node, resolve=True))
    return path
