"""The merge config: what compression a model applies, saved next to its weights as ``libra_config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from libra_train.compress.types import MERGE_METHODS, SELECT_METHODS

CONFIG_NAME = "libra_config.json"

# method -> (select, merge); explicit ``select=`` / ``merge=`` override the preset.
METHOD_PRESETS: dict[str, tuple[str, str]] = {
    "libra": ("interval", "igm"),
    "fastv": ("topk", "prune"),
    "turbo": ("turbo", "mean"),
}
QUERY_RULES = ("answer_starts", "last_instruction")
UNITS = ("sample", "image", "frame")


@dataclass
class LibraConfig:
    """Libra-Merging (and baselines) inside the language model.

    A compression point ``l`` means layers ``0..l`` see the full sequence, layer ``l``'s attention supplies the
    importance, and layer ``l``'s output is compressed before layer ``l + 1`` (shared/DESIGN.md section 1).

    Args:
        method: ``libra`` (interval + igm), ``fastv`` (topk + prune) or ``turbo`` (turbo + mean).
        layers: compression points, sorted, unique, each below the model's last layer.
        ratio: fraction of the visual tokens each point removes, one float for all points or one per point.
        select: overrides the method's target selection (``interval`` | ``topk`` | ``turbo``).
        merge: overrides the method's merge (``igm`` | ``prune`` | ``mean`` | ``igm_pos`` | ``igm_neg``).
        theta: cosine threshold for positive (merged) tokens in ``igm``.
        lam: importance weight of ``turbo`` selection.
        query: which tokens' attention is the importance when labels are given (training):
            ``answer_starts`` averages the last token before every answer span, ``last_instruction`` uses the
            one before the first answer only. Without labels (inference) the query is the last prompt token.
        enabled: False makes the model behave exactly as without the plug-in.
        unit: what is compressed as one span: ``sample`` (all visual tokens of a sample together), ``image``
            (each image or video its own span: own intervals, targets, temperature and compensation token at its
            end) or ``frame`` (also each video frame). None: the model family's default, fixed by ``apply_libra``
            (and then saved with the config, so inference applies what training used). A config saved before
            this field existed meant ``sample``.

    Fixed by the spec and therefore not fields: ``tau = mean(alpha)`` over the visual span of the point; a
    merged target keeps its target's position, a compensation token takes the last position of the visual span
    it came from.
    """

    method: str = "libra"
    layers: list[int] = field(default_factory=lambda: [7, 15, 23])
    ratio: float | list[float] = 0.5
    select: str | None = None
    merge: str | None = None
    theta: float = 0.7
    lam: float = 1.0
    query: str = "answer_starts"
    enabled: bool = True
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"LibraConfig.method={self.method!r} is not one of {sorted(METHOD_PRESETS)}")
        self.layers = [int(layer) for layer in self.layers]
        if not self.layers:
            raise ValueError(
                "LibraConfig.layers is empty: give at least one compression point (or enabled=False)"
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 0:
            raise ValueError(
                f"LibraConfig.layers={self.layers} must be non-negative, sorted and without duplicates"
            )
        ratios = self.ratios
        if len(ratios) != len(self.layers):
            raise ValueError(
                f"LibraConfig.ratio has {len(ratios)} values for {len(self.layers)} layers {self.layers}"
            )
        for r in ratios:
            if not 0.0 <= r < 1.0:
                raise ValueError(
                    f"LibraConfig.ratio={self.ratio}: each ratio must be in [0, 1) (fraction removed)"
                )
        if self.select is not None and self.select not in SELECT_METHODS:
            raise ValueError(f"LibraConfig.select={self.select!r} is not one of {SELECT_METHODS}")
        if self.merge is not None and self.merge not in MERGE_METHODS:
            raise ValueError(f"LibraConfig.merge={self.merge!r} is not one of {MERGE_METHODS}")
        if self.query not in QUERY_RULES:
            raise ValueError(f"LibraConfig.query={self.query!r} is not one of {QUERY_RULES}")
        if self.unit is not None and self.unit not in UNITS:
            raise ValueError(
                f"LibraConfig.unit={self.unit!r} is not one of {UNITS} (or None: the family's default)"
            )

    @property
    def ratios(self) -> list[float]:
        """One ratio per compression point."""
        if isinstance(self.ratio, (list, tuple)):
            return [float(r) for r in self.ratio]
        return [float(self.ratio)] * len(self.layers)

    @property
    def select_method(self) -> str:
        return self.select or METHOD_PRESETS[self.method][0]

    @property
    def merge_method(self) -> str:
        return self.merge or METHOD_PRESETS[self.method][1]

    def check_num_layers(self, num_layers: int) -> None:
        """Raise if a compression point does not leave at least one layer after it."""
        bad = [layer for layer in self.layers if layer > num_layers - 2]
        if bad:
            raise ValueError(
                f"LibraConfig.layers={self.layers}: point(s) {bad} are beyond this model's {num_layers} layers "
                f"(a point l compresses the output of layer l for layers l+1.., so l <= {num_layers - 2})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LibraConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LibraConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> LibraConfig:
        """A config read back from a checkpoint or export (``libra_config.json``, ``config.json``'s
        ``libra_merging``). One saved before ``unit`` existed compressed all visual tokens of a sample as one
        span, so it reads as ``unit="sample"``; a recipe's ``libra`` block goes through :meth:`from_dict`."""
        return cls.from_dict({"unit": "sample", **data})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``libra_config.json`` into ``save_directory`` (atomically) and return its path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LibraConfig:
        """Read a directory holding ``libra_config.json`` (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no merge config at {file}: a libra-train checkpoint or export holds {CONFIG_NAME}; "
                "pass LibraConfig(...) explicitly for a model trained without one"
            )
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        try:
            return cls.from_saved(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: {err}") from err
