"""The merge config: what compression a model applies, saved next to its weights as ``libra_config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from libra_train.compress.types import MERGE_METHODS, SELECT_METHODS

CONFIG_NAME = "libra_config.json"

# method -> its switches; explicit ``select=`` / ``merge=`` / ``importance=`` / ``positions=`` override the preset.
METHOD_PRESETS: dict[str, dict[str, str]] = {
    "libra": {"select": "interval", "merge": "igm"},
    "fastv": {"select": "topk", "merge": "prune"},
    "turbo": {"select": "turbo", "merge": "mean"},
    # PyramidDrop (Cooperx521/PyramidDrop, `pdrop_rank_drop`): ranks with the next layer's own projections, keeps a
    # fraction of the ORIGINAL count at each point (`keep_fractions`) and renumbers the positions.
    "pdrop": {"select": "topk", "merge": "prune", "importance": "next_layer", "positions": "renumber"},
}
SWITCH_DEFAULTS = {"importance": "layer", "positions": "original"}
IMPORTANCE_SOURCES = ("layer", "next_layer")
POSITION_RULES = ("original", "renumber")
PDROP_LAMBDA = (
    0.5  # PyramidDrop's scripts: image_token_ratio_list = [0.5, 0.25, 0.125] for layer_list [8, 16, 24]
)
QUERY_RULES = ("answer_starts", "last_instruction")
UNITS = ("sample", "image", "frame")


@dataclass
class LibraConfig:
    """Libra-Merging (and baselines) inside the language model.

    A compression point ``l`` means layers ``0..l`` see the full sequence, layer ``l``'s attention supplies the
    importance, and layer ``l``'s output is compressed before layer ``l + 1`` (shared/DESIGN.md section 1).

    Args:
        method: ``libra`` (interval + igm), ``fastv`` (topk + prune), ``turbo`` (turbo + mean) or ``pdrop``
            (PyramidDrop: topk + prune + ``importance="next_layer"`` + ``positions="renumber"`` +
            ``keep_fractions``; its layer ``L`` is point ``L - 1``: ``layer_list=[8, 16, 24]`` is
            ``layers=[7, 15, 23]``).
        layers: compression points, sorted, unique, each below the model's last layer.
        ratio: fraction of the visual tokens each point removes, one float for all points or one per point
            (``N_t = max(1, round(N (1 - R)))`` of the ``N`` tokens the point receives). Not used when
            ``keep_fractions`` is set.
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
            end) or ``frame`` (each image, and each video frame, its own span). None: the model family's default,
            fixed by ``apply_libra`` (and then saved with the config, so inference applies what training used):
            ``image`` for LLaVA-1.5 / LLaVA-NeXT and text models (the paper's single image is one unit either
            way), ``frame`` for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision (video: every frame keeps its
            own intervals). How each family's units are found: ``libra_train.plugin.units``. A config saved
            before this field existed meant ``sample``.
        importance: where the importance comes from: ``layer`` (the attention of layer ``l`` itself, recorded
            by the hybrid attention) or ``next_layer`` (PyramidDrop: layer ``l + 1``'s own ``input_layernorm``,
            ``q_proj`` / ``k_proj`` (and ``q_norm`` / ``k_norm`` where it has them) and rotary embedding applied
            to layer ``l``'s output, computed before layer ``l + 1`` runs). None: the method's.
        positions: ``original`` (every surviving token keeps its RoPE position) or ``renumber`` (PyramidDrop:
            the layers after a point see positions ``0..L'-1`` of the compressed sequence, decode steps
            continue from there; 1-D RoPE only, refused for M-RoPE models). None: the method's.
        keep_fractions: keep ``max(1, floor(N0 * f_k))`` visual tokens of each unit's ORIGINAL count ``N0`` at
            point ``k`` (PyramidDrop's ``image_token_ratio_list``, floored as it does; non-increasing, each in
            ``(0, 1]``), instead of the chained ``ratio`` rule. Give the list itself, not a lambda:
            ``int(125 * 0.6**3) = 26`` but ``int(125 * 0.216) = 27``. None: the ``ratio`` rule, except for
            ``method="pdrop"``: ``[0.5, 0.25, 0.125, ...][:len(layers)]`` (lambda = 0.5, its scripts' setting).

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
    importance: str | None = None
    positions: str | None = None
    keep_fractions: list[float] | None = None

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
        if self.importance is not None and self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(
                f"LibraConfig.importance={self.importance!r} is not one of {IMPORTANCE_SOURCES} (or None: the "
                "method's)"
            )
        if self.positions is not None and self.positions not in POSITION_RULES:
            raise ValueError(
                f"LibraConfig.positions={self.positions!r} is not one of {POSITION_RULES} (or None: the method's)"
            )
        if self.keep_fractions is not None:
            self.keep_fractions = [float(f) for f in self.keep_fractions]
            fractions = self.keep_fractions
            if len(fractions) != len(self.layers):
                raise ValueError(
                    f"LibraConfig.keep_fractions has {len(fractions)} values for {len(self.layers)} layers "
                    f"{self.layers}: give one kept fraction of the original visual count per point"
                )
            if any(not 0.0 < f <= 1.0 for f in fractions) or any(
                b > a for a, b in zip(fractions, fractions[1:])
            ):
                raise ValueError(
                    f"LibraConfig.keep_fractions={fractions}: each must be in (0, 1] and none larger than the one "
                    "before (they are fractions of the ORIGINAL count, e.g. [0.5, 0.25, 0.125])"
                )

    @property
    def ratios(self) -> list[float]:
        """One ratio per compression point."""
        if isinstance(self.ratio, (list, tuple)):
            return [float(r) for r in self.ratio]
        return [float(self.ratio)] * len(self.layers)

    def _switch(self, name: str) -> str:
        value = getattr(self, name)
        return (
            value if value is not None else METHOD_PRESETS[self.method].get(name, SWITCH_DEFAULTS.get(name))
        )

    @property
    def select_method(self) -> str:
        return self._switch("select")

    @property
    def merge_method(self) -> str:
        return self._switch("merge")

    @property
    def importance_source(self) -> str:
        return self._switch("importance")

    @property
    def position_rule(self) -> str:
        return self._switch("positions")

    @property
    def kept_fractions(self) -> list[float] | None:
        """The kept fraction of the original visual count at each point, or None for the ``ratio`` rule."""
        if self.keep_fractions is not None:
            return list(self.keep_fractions)
        if self.method == "pdrop":
            return [PDROP_LAMBDA**k for k in range(1, len(self.layers) + 1)]
        return None

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
