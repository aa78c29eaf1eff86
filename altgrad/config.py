"""The cell: one format × optimizer × layer policy × seed, as the YAML of ``altgrad train`` and a sweep's
``trial:`` describe it, with every section's knobs (scaling, rank_trend, protection). Parsing checks
every key and value up front, so a bad file fails in milliseconds with one line naming the file, the
key and the value, before anything runs or is written. Importing this module loads no torch (see below);
only the checks that build the model (protection layers) or look at the machine (check_runtime) do.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import re
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from altgrad.failure import FailureRules
from altgrad.formats import get_format


class ConfigError(ValueError):
    """Bad user input: the CLI reports it as one line and exits 2."""

    def __init__(self, source: str, key: str, message: str):
        super().__init__(f"{source}: {key}: {message}")


# ---- the sections' knobs -------------------------------------------------------------------------
# Each cell section's dataclass lives here, beside the cell, and not in the module that implements it:
# checking a cell then needs no torch, so the driver of a sweep on a cluster (which only checks cells and
# schedules them) never imports it. The implementing modules import their config and names from here,
# and re-export them under their old names.

OPTIMIZERS = ("adamw", "manifold_adamw", "grid")  # altgrad.optim.build_optimizer's names
LAYER_POLICIES = ("all", "attention", "mlp", "no_head")  # altgrad.layers.apply_policy's names
RANK_TREND_METRICS = ("stable_rank", "effective_rank")  # altgrad.diagnostics.rank_metrics keys a trend follows
RECIPES = ("delayed", "current", "none")
AMAX_ALGOS = ("max", "most_recent")
GRANULARITIES = ("tensor", "row", "block")
SCALE_FORMATS = ("e8m0", "fp32")
SCALE_ROUNDINGS = ("floor", "ceil")
PROTECTION_MODES = ("off", "adaptive_svd")
PROTECTION_TRIGGERS = ("alignment", "rank_warning")


def block_tile(block, ndim: int) -> tuple[int, int]:
    """``block`` as (rows, cols) over the trailing two dims; a 1-D block is one row high."""
    if (not isinstance(block, (tuple, list)) or len(block) not in (1, 2)
            or not all(isinstance(size, numbers.Integral) and not isinstance(size, bool) and size > 0
                       for size in block)):
        raise ValueError(f"block={block!r} is not one or two positive integers, e.g. (32,), (1, 32), (128, 128)")
    if len(block) > ndim:
        raise ValueError(f"block={tuple(block)!r} spans {len(block)} dims, but the tensor has {ndim}")
    return (1, int(block[0])) if len(block) == 1 else (int(block[0]), int(block[1]))


@dataclass(frozen=True)
class ScalingConfig:
    """How one quantization point picks its scale."""

    recipe: str = "delayed"
    history_len: int = 16
    amax_compute: str = "max"  # over the history: "max" or "most_recent"
    margin: int = 0  # extra power-of-two headroom: scale / 2**margin
    power_of_two: bool = False
    granularity: str = "tensor"  # tensor | row | block: one scale per tensor, per row, per block
    block: tuple = (1, 32)  # granularity block: (rows, cols) of an operand laid out (other dim, reduction dim)
    scale_format: str = "e8m0"  # row/block scales: e8m0 (powers of two) or fp32
    scale_rounding: str = "floor"  # e8m0 scales: floor (OCP MX) or ceil (TE MXFP8, nothing overflows)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"scaling recipe {self.recipe!r} is not one of {', '.join(RECIPES)}")
        if self.amax_compute not in AMAX_ALGOS:
            raise ValueError(f"amax_compute {self.amax_compute!r} is not one of {', '.join(AMAX_ALGOS)}")
        if self.history_len < 1:
            raise ValueError(f"history_len must be at least 1, got {self.history_len}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        object.__setattr__(self, "block", block_tile(self.block, 2))  # checked; (32,) is (1, 32)
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r} is not one of {', '.join(SCALE_FORMATS)}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"scale_rounding={self.scale_rounding!r} is not one of {', '.join(SCALE_ROUNDINGS)}")
        if self.granularity != "tensor":
            per_tensor = {"recipe": self.recipe == "none", "margin": self.margin != 0, "power_of_two": self.power_of_two}
            for key, set_ in per_tensor.items():
                if set_:
                    raise ValueError(f"{key}={getattr(self, key)!r} does not go with granularity={self.granularity}: "
                                     f"row and block scales come from each block's own amax (scale_format e8m0 "
                                     f"makes them powers of two)")

    @property
    def per_tensor(self) -> bool:
        return self.granularity == "tensor"


@dataclass(frozen=True)
class RankTrendConfig:
    """Knobs of :class:`altgrad.diagnostics.RankTrendDetector`. Every duration is in training steps,
    whatever the check interval, so ``rank_every`` changes how often the detector looks, not when it
    may warn."""

    warmup_steps: int = 200  # no warning before this step, and the values before it are not looked at
    ema_beta: float = 0.98  # EMA decay per training step: a memory of about 1 / (1 - beta) = 50 steps
    drop_threshold: float = 0.5  # warn when the EMA falls below (1 - this) x its peak since warm-up
    critical_drop_threshold: float = 0.3  # the same for critical layers: smaller, so they warn sooner
    critical_patterns: tuple[str, ...] = ("lm_head", "c_proj")  # globs matched anywhere in the name
    metric: str = "stable_rank"  # the rank_metrics key the trainer feeds to update()

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        for key in ("drop_threshold", "critical_drop_threshold"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if isinstance(self.critical_patterns, str):
            raise ValueError(f"critical_patterns must be a sequence of patterns, got the string "
                             f"{self.critical_patterns!r}")
        if self.metric not in RANK_TREND_METRICS:
            raise ValueError(f"metric must be one of {', '.join(RANK_TREND_METRICS)}, got {self.metric!r}")


@dataclass(frozen=True)
class ProtectionConfig:
    """The cell's ``protection`` key: what is watched, how often, and when a layer switches."""

    mode: str = "off"  # off | adaptive_svd
    layers: tuple[str, ...] = ("lm_head", "*.c_proj")  # fnmatch patterns of full layer names: the critical ones
    every: int = 50  # steps between checks
    k: int = 8  # the principal subspace the alignment measures: the top-k left singular vectors
    principal_threshold: float = 0.4  # protect when the principal alignment exceeds this
    release_threshold: float = 0.2  # release a protected layer when it falls below this (<= the above)
    min_rank: int = 1  # the trained factor's rank never goes below this
    trigger: str = "alignment"  # alignment (above principal_threshold) | rank_warning (the rank detector warns)

    def __post_init__(self):
        if self.mode not in PROTECTION_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(PROTECTION_MODES)}")
        if self.trigger not in PROTECTION_TRIGGERS:
            raise ValueError(f"trigger={self.trigger!r} is not one of {', '.join(PROTECTION_TRIGGERS)}")
        if isinstance(self.layers, str) or not all(isinstance(p, str) for p in self.layers) or not self.layers:
            raise ValueError(f"layers={self.layers!r} must be a non-empty list of name patterns")
        object.__setattr__(self, "layers", tuple(self.layers))
        for key in ("every", "k", "min_rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be >= 1")
        if not 0 <= self.principal_threshold <= 1:
            raise ValueError(f"principal_threshold={self.principal_threshold!r} must lie in [0, 1]")
        if not 0 <= self.release_threshold <= self.principal_threshold:
            raise ValueError(f"release_threshold={self.release_threshold!r} must lie in [0, principal_threshold="
                             f"{self.principal_threshold!r}]")

    def check_optimizer(self, optimizer: str) -> None:
        """Raise ValueError for an optimizer protection cannot work with."""
        if self.mode != "off" and optimizer == "grid":
            raise ValueError(f"mode={self.mode!r} with optimizer=grid: grid keeps every weight on its format's "
                             f"grid, and a frozen W_p plus trained factors is not on it (use adamw or "
                             f"manifold_adamw)")


@dataclass(frozen=True)
class ModelSettings:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = False


@dataclass(frozen=True)
class DiagnosticSettings:
    flips_every: int = 1  # steps between flip/stall measurements; 0 turns it off
    rank_every: int = 50  # steps between rank checks (and rank-collapse warnings); 0 turns it off
    stats: bool = True  # overflow/underflow counting at every quantization point


@dataclass(frozen=True)
class CellConfig:
    """Every key a cell understands. The first block is the contract's; the rest are additions."""

    format: str = "E5M2"
    optimizer: str = "adamw"
    layers: object = "all"  # all | attention | mlp | no_head | {name-pattern: format}
    lr: float = 3.0e-3  # AdamW's lr, and the lr of non-quantized parameters under the other optimizers
    steps: int = 300
    seed: int = 0
    batch_size: int = 16
    model: ModelSettings = field(default_factory=ModelSettings)
    data: str = "builtin"
    eval_every: int = 50
    diagnostics: DiagnosticSettings = field(default_factory=DiagnosticSettings)
    # --- additions ---
    name: str | None = None
    ulp_lr: float = 0.5  # manifold_adamw / grid: the step of quantized weights, in ULPs (rungs)
    weight_decay: float = 0.0
    warmup_steps: int = 20  # linear lr warm-up, then cosine decay to lr / 10
    grad_clip: float = 1.0  # global grad-norm clip; 0 turns it off
    eval_iters: int = 8  # val batches per evaluation
    grad_format: str | None = "E5M2"  # output-gradient format of 8-bit layers; null = not quantized
    scaling: ScalingConfig = field(default_factory=ScalingConfig)  # every point's scaling: per tensor, row or block
    rank_trend: RankTrendConfig = field(default_factory=RankTrendConfig)  # rank-collapse warnings
    failure: FailureRules = field(default_factory=FailureRules)  # what counts as a failed run, fixed beforehand
    protection: ProtectionConfig = field(default_factory=ProtectionConfig)  # adaptive low-rank protection
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at every evaluation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cell_columns(cell: CellConfig, trial_id: str, sweep: str | None) -> dict:
    """The columns of a trial's ``trials`` row that its cell decides, known before it runs."""
    return {"trial_id": trial_id, "format": cell.format, "optimizer": cell.optimizer,
            "layers": cell.layers if isinstance(cell.layers, str) else json.dumps(cell.layers, sort_keys=True),
            "seed": cell.seed, "lr": cell.lr, "ulp_lr": cell.ulp_lr, "steps_planned": cell.steps, "sweep": sweep,
            "config": json.dumps(cell.to_dict(), sort_keys=True, default=list)}


_NESTED = {"model": ModelSettings, "diagnostics": DiagnosticSettings, "scaling": ScalingConfig,
           "rank_trend": RankTrendConfig, "failure": FailureRules, "protection": ProtectionConfig}


def _field_types(cls) -> dict[str, object]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def _coerce(source: str, key: str, value, default):
    """Check one value against its default's type (ints accepted for floats; null where default is None)."""
    if default is None or key == "layers":
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"{value!r} is not true/false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"{value!r} is not an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"{value!r} is not a number")
        return float(value)
    if isinstance(default, tuple) and all(isinstance(v, int) for v in default):
        return value  # a block shape: its section checks it (ScalingConfig names the key and value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, f"{value!r} is not a list of strings")
        return tuple(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(source, key, f"{value!r} is not a string")
    return value


def yaml_value(dotted: str, value):
    """What a YAML value meant for the key ``dotted``: YAML reads a bare ``off`` as false, which for
    ``protection.mode`` is the mode off. The one place the config and the sweep files read it."""
    return "off" if dotted == "protection.mode" and value is False else value


def _build(cls, raw, source: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "(top level)", f"expected a mapping, got {raw!r}")
    defaults = _field_types(cls)
    values = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in defaults:
            raise ConfigError(source, dotted, f"unknown key (known: {', '.join(defaults)})")
        if cls is CellConfig and key in _NESTED:
            values[key] = _build(_NESTED[key], value, source, dotted + ".")
        else:
            values[key] = _coerce(source, dotted, yaml_value(dotted, value), defaults[key])
    try:
        return cls(**values)
    except ValueError as error:  # the section's own checks (ScalingConfig, RankTrendConfig, FailureRules)
        raise ConfigError(source, prefix.rstrip("."), str(error)) from None


def _check(cell: CellConfig, source: str) -> None:
    """Value checks that need more than a type."""

    def positive(key, value):
        if not value > 0:
            raise ConfigError(source, key, f"{value!r} must be positive")

    def non_negative(key, value):
        if value < 0:
            raise ConfigError(source, key, f"{value!r} must be >= 0")

    def format_spec(key, spec):
        try:
            get_format(spec)
        except ValueError as error:
            raise ConfigError(source, key, str(error)) from None

    format_spec("format", cell.format)
    if cell.grad_format is not None:
        format_spec("grad_format", cell.grad_format)
    if cell.optimizer not in OPTIMIZERS:
        raise ConfigError(source, "optimizer", f"unknown optimizer {cell.optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    if isinstance(cell.layers, str):
        if cell.layers not in LAYER_POLICIES:
            raise ConfigError(source, "layers", f"unknown layer policy {cell.layers!r} "
                                                f"(known: {', '.join(LAYER_POLICIES)}, or a map pattern: format)")
    elif isinstance(cell.layers, dict) and cell.layers:
        for pattern, spec in cell.layers.items():
            if not isinstance(spec, str):
                raise ConfigError(source, f"layers.{pattern}", f"{spec!r} is not a format name")
            format_spec(f"layers.{pattern}", spec)
    else:
        raise ConfigError(source, "layers", f"{cell.layers!r} is neither a policy name nor a map pattern: format")
    layer_formats = cell.layers.values() if isinstance(cell.layers, dict) else [cell.format]
    if cell.optimizer != "adamw" and all(get_format(spec).is_native for spec in layer_formats):
        raise ConfigError(source, "optimizer", f"{cell.optimizer} steps in rungs of an 8-bit grid, and format "
                                               f"{cell.format} has none: leave this cell out (exclude:)")
    for key in ("lr", "ulp_lr", "steps", "batch_size", "eval_every", "eval_iters"):
        positive(key, getattr(cell, key))
    for key in ("weight_decay", "warmup_steps", "grad_clip", "checkpoint_every", "seed"):
        non_negative(key, getattr(cell, key))
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        positive(f"model.{key}", getattr(cell.model, key))
    if cell.model.n_embd % cell.model.n_head:
        raise ConfigError(source, "model.n_embd", f"{cell.model.n_embd} is not a multiple of n_head={cell.model.n_head}")
    if not 0 <= cell.model.dropout < 1:
        raise ConfigError(source, "model.dropout", f"{cell.model.dropout!r} must lie in [0, 1)")
    for key in ("flips_every", "rank_every"):
        non_negative(f"diagnostics.{key}", getattr(cell.diagnostics, key))
    if cell.optimizer == "grid" and not cell.scaling.per_tensor and cell.scaling.scale_format != "e8m0":
        raise ConfigError(source, "scaling.scale_format", f"{cell.scaling.scale_format!r} with optimizer grid: its "
                                                          f"weights stay on the forward grid only under power-of-two "
                                                          f"(e8m0) block scales")
    try:
        cell.protection.check_optimizer(cell.optimizer)
    except ValueError as error:
        raise ConfigError(source, "protection.mode", str(error)) from None
    if cell.protection.mode != "off":
        _check_protected_layers(cell, source)
        if cell.protection.trigger == "rank_warning" and not cell.diagnostics.rank_every:
            raise ConfigError(source, "protection.trigger", "rank_warning switches at rank checks, and "
                                                            "diagnostics.rank_every is 0 (no rank checks)")
    if cell.device != "auto" and not (cell.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cell.device)):
        raise ConfigError(source, "device", f"{cell.device!r} is not auto, cpu, cuda or cuda:N")


def _check_protected_layers(cell: CellConfig, source: str) -> None:
    """Every protection.layers pattern names a linear layer of the model, and none a tied matrix (whose
    other use a protected layer's frozen weight would not train). The model is built on the meta device:
    names only, no memory."""
    import torch

    from altgrad.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=2, **dataclasses.asdict(cell.model)))
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for pattern in cell.protection.layers:
        matched = [name for name in names if fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(source, "protection.layers", f"{pattern!r} matches no linear layer "
                                                           f"(layers: {', '.join(names)})")
        if cell.model.tie_weights and "lm_head" in matched:
            raise ConfigError(source, "protection.layers", f"{pattern!r} takes lm_head, whose matrix is tied to "
                                                           f"the token embedding (model.tie_weights): leave it out")


def parse_cell(raw: dict, source: str = "<cell>") -> CellConfig:
    """A validated CellConfig from a plain mapping (a YAML document, or a sweep's trial + matrix cell).
    Format specs come back in canonical spelling ("e4m3" -> "E4M3"), as the result tables show them."""
    cell = _build(CellConfig, raw if raw is not None else {}, source)
    _check(cell, source)
    canonical = {"format": get_format(cell.format).name}
    if cell.grad_format is not None:
        canonical["grad_format"] = get_format(cell.grad_format).name
    if isinstance(cell.layers, dict):
        canonical["layers"] = {pattern: get_format(spec).name for pattern, spec in cell.layers.items()}
    return dataclasses.replace(cell, **canonical)


def check_runtime(cell: CellConfig, source: str) -> None:
    """What only the machine that runs the cell can check: the data is there and holds one batch
    window, and the device exists. ``altgrad train`` calls it, and a sweep on this machine; a sweep on a
    cluster leaves it to the nodes, whose disks and GPUs the driver cannot see."""
    from altgrad.data import data_problem

    problem = data_problem(cell.data, cell.model.block_size)
    if problem:
        raise ConfigError(source, "data", problem)
    if cell.device.startswith("cuda"):
        import torch

        index = int(cell.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            have = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA"
            raise ConfigError(source, "device", f"{cell.device!r}, but torch {torch.__version__} here has {have}")


def known_key(dotted: str) -> bool:
    """Whether ``dotted`` ("lr", "model.n_layer") names a cell key."""
    head, _, rest = dotted.partition(".")
    fields = {f.name for f in dataclasses.fields(CellConfig)}
    if head not in fields:
        return False
    if not rest:
        return True
    nested = _NESTED.get(head)
    return nested is not None and "." not in rest and rest in {f.name for f in dataclasses.fields(nested)}


def set_dotted(raw: dict, dotted: str, value) -> dict:
    """A copy of ``raw`` with ``a.b.c = value`` (creating the nested mappings on the way)."""
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        node[key] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[leaf] = value
    return out


def parse_overrides(items: list[str], source: str = "--set") -> list[tuple[str, object]]:
    """``key=value`` strings (values parsed as YAML: 3e-3, true, [a, b]) into (dotted key, value) pairs."""
    pairs = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(source, item, "expected key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(source, key, f"value {text!r} is not valid YAML ({error.problem})") from None
        pairs.append((key.strip(), value))
    return pairs


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(str(path), "(file)", f"cannot read it ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(str(path), where, f"is not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "(top level)", f"expected a mapping of keys, got {type(data).__name__}")
    return data


def load_cell(path: str | Path, overrides: list[str] = ()) -> CellConfig:
    raw = load_yaml(path)
    for key, value in parse_overrides(list(overrides)):
        raw = set_dotted(raw, key, value)
    return parse_cell(raw, str(path))
