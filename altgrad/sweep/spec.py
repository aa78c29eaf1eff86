"""A sweep file: a base cell (``trial:``), the ``matrix`` axes whose Cartesian product gives one cell per
trial, cells left out (``exclude:``), early stopping and per-trial resources.

Everything is validated here, before Ray starts: every expanded cell goes through the same parser as
``altgrad train``, layer patterns are matched against the model's real layer names, and each error is
one line naming the file, the key and the value.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field

from altgrad.config import CellConfig, ConfigError, known_key, load_yaml, parse_cell, set_dotted, yaml_value
from altgrad.sweep.scheduler import MODES

SWEEP_KEYS = ("name", "trial", "matrix", "exclude", "early_stopping", "resources")
EARLY_STOPPING_KEYS = {"rank_collapse": {"patience", "action"}, "divergence": {"loss_factor"},
                       "asha": {"grace_period", "reduction_factor", "max_t"}}
RESOURCE_KEYS = ("cpu", "gpu")
RANK_COLLAPSE_ACTIONS = ("stop", "protect")  # what the rank-collapse rule does: stop the trial, or protect the layers
# What action: protect sets in every cell: the trial protects a watched layer when its rank detector warns.
PROTECT_ON_RANK_WARNING = {"protection.mode": "adaptive_svd", "protection.trigger": "rank_warning"}


@dataclass(frozen=True)
class Cell:
    """One trial of the sweep: a stable id (also its result files' name), its axis values, its config."""

    cell_id: str
    axes: dict
    raw: dict
    config: CellConfig


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str
    cells: list[Cell]
    axes: dict  # axis (dotted key) -> its values, in file order
    early_stopping: dict = field(default_factory=dict)
    resources: dict | None = None  # None: one GPU per trial on a GPU cluster, else one CPU

    @property
    def cell_ids(self) -> list[str]:
        return [cell.cell_id for cell in self.cells]


def _slug(value) -> str:
    if isinstance(value, (dict, list)):
        return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._+-]+", "", str(value).replace(":", "+").replace("=", "")) or "x"


def _cell_id(axes: dict) -> str:
    """``E5M2_adamw_s0``: the axis values in file order (seeds prefixed with s); stable across runs."""
    parts = [("s" if key == "seed" else "") + _slug(value) for key, value in axes.items()]
    return "_".join(parts) or "cell"


def _matches(axes: dict, rule: dict) -> bool:
    return all(key in axes and axes[key] == value for key, value in rule.items())


def _check_sections(raw: dict, source: str) -> None:
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(source, key, f"unknown key (known: {', '.join(SWEEP_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        raise ConfigError(source, "name", f"{name!r} must be a non-empty name of letters, digits, '.', '_', '-'")
    if not isinstance(raw.get("trial", {}), dict):
        raise ConfigError(source, "trial", f"{raw['trial']!r} is not a mapping of cell keys")
    matrix = raw.get("matrix", {})
    if not isinstance(matrix, dict):
        raise ConfigError(source, "matrix", f"{matrix!r} is not a mapping of axis: [values]")
    for axis, values in matrix.items():
        if not known_key(str(axis)):
            raise ConfigError(source, f"matrix.{axis}", "is not a cell key (a matrix axis is a cell key, dotted "
                                                       "for nested ones: lr, seed, model.n_layer, ...)")
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"matrix.{axis}", f"{values!r} must be a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(source, f"matrix.{axis}", f"{values!r} repeats a value")
    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(rule, dict) and rule for rule in exclude):
        raise ConfigError(source, "exclude", f"{exclude!r} must be a list of non-empty mappings axis: value")
    for rule in exclude:
        for key, value in rule.items():
            if key not in matrix:
                raise ConfigError(source, f"exclude.{key}", f"is not a matrix axis (axes: {', '.join(matrix)})")
            if value not in matrix[key]:
                raise ConfigError(source, f"exclude.{key}", f"{value!r} is not among the axis values {matrix[key]}")


def _check_early_stopping(raw: dict, source: str) -> dict:
    early = raw.get("early_stopping") or {}
    if not isinstance(early, dict):
        raise ConfigError(source, "early_stopping", f"{early!r} is not a mapping")
    mode = early.get("mode", "act")
    if mode not in MODES:
        raise ConfigError(source, "early_stopping.mode", f"{mode!r} is not one of {', '.join(MODES)}")
    for rule, settings in early.items():
        if rule == "mode":
            continue
        if rule not in EARLY_STOPPING_KEYS:
            raise ConfigError(source, f"early_stopping.{rule}",
                              f"unknown rule (known: mode, {', '.join(EARLY_STOPPING_KEYS)})")
        settings = settings or {}
        if not isinstance(settings, dict):
            raise ConfigError(source, f"early_stopping.{rule}", f"{settings!r} is not a mapping")
        for key, value in settings.items():
            if key not in EARLY_STOPPING_KEYS[rule]:
                raise ConfigError(source, f"early_stopping.{rule}.{key}",
                                  f"unknown setting (known: {', '.join(sorted(EARLY_STOPPING_KEYS[rule]))})")
            if key == "action":
                if value not in RANK_COLLAPSE_ACTIONS:
                    raise ConfigError(source, f"early_stopping.{rule}.{key}",
                                      f"{value!r} is not one of {', '.join(RANK_COLLAPSE_ACTIONS)}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(source, f"early_stopping.{rule}.{key}", f"{value!r} must be a positive number")
        if rule == "divergence" and settings.get("loss_factor", 2.0) <= 1:
            raise ConfigError(source, "early_stopping.divergence.loss_factor", "must be above 1")
    return {rule: settings if rule == "mode" else dict(settings or {}) for rule, settings in early.items()}


def _check_resources(raw: dict, source: str) -> dict | None:
    resources = raw.get("resources")
    if resources is None:
        return None
    if not isinstance(resources, dict):
        raise ConfigError(source, "resources", f"{resources!r} is not a mapping cpu/gpu")
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            raise ConfigError(source, f"resources.{key}", f"unknown resource (known: {', '.join(RESOURCE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(source, f"resources.{key}", f"{value!r} must be a number >= 0")
    if not resources.get("cpu", 1) and not resources.get("gpu", 0):
        raise ConfigError(source, "resources", "a trial needs at least some cpu or gpu")
    return {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)}


def _skeleton(config: CellConfig):
    """A model with the cell's layer names (they depend only on the layer count), built tiny."""
    from altgrad.model import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=config.model.n_layer, n_head=1, n_embd=4,
                         tie_weights=config.model.tie_weights))


def _check_layer_patterns(cell: Cell, source: str, checked: set) -> None:
    """A layer map whose pattern selects no layer is an error in the file, not a silent fp32 run."""
    config = cell.config
    if not isinstance(config.layers, dict):
        return
    key = (json.dumps(config.layers, sort_keys=True), config.model.n_layer, config.model.tie_weights)
    if key in checked:
        return
    from altgrad.layers import apply_policy

    try:
        apply_policy(_skeleton(config), config.format, config.layers)
    except ValueError as error:
        raise ConfigError(source, "layers", str(error)) from None
    checked.add(key)


def _protect_on_rank_warning(cell_raw: dict, axes: dict, source: str) -> dict:
    """The cell with the protection ``action: protect`` asks for; a cell that says otherwise, or cannot
    be protected (grid), is an error in the file rather than a rule that silently does nothing."""
    where = "early_stopping.rank_collapse.action"
    cell = f"cell {', '.join(f'{k}={v}' for k, v in axes.items())}" if axes else "the trial"
    if cell_raw.get("optimizer") == "grid":
        raise ConfigError(source, where, f"protect with optimizer=grid ({cell}): grid keeps every weight on its "
                                         f"format's grid, which a protected layer's W_p + B·A is not; exclude "
                                         f"the grid cells or use action: stop")
    protection = cell_raw.get("protection") if isinstance(cell_raw.get("protection"), dict) else {}
    for dotted, wanted in PROTECT_ON_RANK_WARNING.items():
        value = yaml_value(dotted, protection.get(dotted.split(".")[1], wanted))
        if value != wanted:
            raise ConfigError(source, where, f"protect sets {dotted}={wanted}, and {cell} has {dotted}={value}: "
                                             f"leave {dotted} out of trial and matrix")
        cell_raw = set_dotted(cell_raw, dotted, wanted)
    return cell_raw


def parse_sweep(raw: dict, source: str = "<sweep>") -> SweepSpec:
    """Validate a sweep mapping and expand it into cells."""
    _check_sections(raw, source)
    early_stopping = _check_early_stopping(raw, source)
    resources = _check_resources(raw, source)
    base = raw.get("trial", {}) or {}
    matrix = raw.get("matrix", {}) or {}
    exclude = raw.get("exclude", []) or []
    protect = early_stopping.get("rank_collapse", {}).get("action") == "protect"
    cells, seen, checked = [], {}, set()
    for values in itertools.product(*matrix.values()):
        axes = dict(zip(matrix, values))
        if any(_matches(axes, rule) for rule in exclude):
            continue
        cell_raw = copy.deepcopy(base)
        for axis, value in axes.items():
            cell_raw = set_dotted(cell_raw, axis, value)
        axes = {axis: yaml_value(axis, value) for axis, value in axes.items()}  # as cell ids show them
        if protect:
            cell_raw = _protect_on_rank_warning(cell_raw, axes, source)
        where = f"{source} (cell {', '.join(f'{k}={v}' for k, v in axes.items())})" if axes else source
        config = parse_cell(cell_raw, where)
        cell_id = _cell_id(axes)
        if cell_id in seen:
            raise ConfigError(source, "matrix", f"cells {seen[cell_id]} and {axes} get the same id {cell_id!r}")
        seen[cell_id] = axes
        cell = Cell(cell_id, axes, cell_raw, config)
        _check_layer_patterns(cell, where, checked)
        cells.append(cell)
    if not cells:
        raise ConfigError(source, "exclude", "leaves no cell to run")
    return SweepSpec(raw["name"], source, cells, dict(matrix), early_stopping, resources)


def load_sweep(path: str) -> SweepSpec:
    return parse_sweep(load_yaml(path), str(path))
