"""The result tables as one :class:`Results`, the cells a sweep's matrix made, and the per-trial and
per-cell tables.

Every function takes the :class:`Results` of :func:`load_results` and works on a partial sweep: a trial
that has written steps but no summary row yet joins ``Results.trials`` with status "running" and what its
own rows tell, so a report can be written while the sweep still runs. Results written before a column
existed get that column as all-null, and :attr:`Results.missing` names it, so a report can say "not
recorded" instead of "none".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from altgrad import results as tables
from altgrad.config import OPTIMIZERS, ConfigError, RankTrendConfig
from altgrad.formats import NAMES

BASELINE = "adamw"
STOPPED = ("stopped", "error")
RANK_DROP = "rank_drop:"  # column prefix: one column per critical layer kind
_ORDER = {"format": NAMES, "optimizer": OPTIMIZERS}  # reading order of rows, panels and colours
NOT_AXES = ("seed", "name")  # config keys that never make a cell: seeds are what a cell aggregates over

# Columns the analysis reads beyond those results.SCHEMAS may still lack (older writers), with their types.
_EXPECTED = {
    "trials": {"would_stop_step": "Int64", "would_stop_reason": "string", "failed": "boolean",
               "failure_step": "Int64", "failure_kind": "string", "config": "string", "steps_planned": "Int64",
               "lr": "Float64", "ulp_lr": "Float64", "seed": "Int64", "started_at": "datetime64[ms, UTC]",
               "ended_at": "datetime64[ms, UTC]", "node_id": "string", "layers": "string"},
    "steps": {"recoded": "Float64", "rank_warnings": "Int64"},
    "layers": {name: "Float64" for name in (
        "master_stable_rank", "master_effective_rank", "master_spectral_norm", "weight_amax", "weight_kurtosis",
        "input_amax", "input_kurtosis", "grad_norm", "adam_ratio", "recode_rate", "subspace_angle_deg",
        "grad_topk_share")} | {"critical": "boolean", "rank_warning": "boolean"},
}
_PANDAS_TYPES = {pa.int64(): "Int64", pa.float64(): "Float64", pa.bool_(): "boolean", pa.string(): "string"}


def _expected_columns(table: str) -> dict[str, str]:
    schema = {f.name: _PANDAS_TYPES.get(f.type, "object") for f in tables.SCHEMAS[table]}
    return schema | _EXPECTED[table]


@dataclass(frozen=True)
class Results:
    """The three tables of one run or sweep (``DIR/<name>``). ``trials`` also holds a derived row, status
    "running", for each trial that has steps but no summary yet."""

    path: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame
    missing: frozenset = field(default=frozenset(), compare=False)  # "table.column" filled in as all-null

    def __post_init__(self):
        missing = set(self.missing)
        for table in tables.TABLES:
            frame = getattr(self, table)
            absent = {c: t for c, t in _expected_columns(table).items() if c not in frame}
            if absent:
                filled = pd.DataFrame({c: pd.Series(pd.NA, index=frame.index, dtype=t) for c, t in absent.items()})
                object.__setattr__(self, table, pd.concat([frame, filled], axis=1))
                missing |= {f"{table}.{c}" for c in absent}
        object.__setattr__(self, "missing", frozenset(missing))

    def recorded(self, table: str, column: str) -> bool:
        """Whether these results have the column at all (it may still hold only nulls)."""
        return f"{table}.{column}" not in self.missing

    @property
    def name(self) -> str:
        if "://" in self.path:
            return self.path.rstrip("/").rsplit("/", 1)[-1]
        return Path(self.path).resolve().name


def load_results(path: str | os.PathLike) -> Results:
    """The tables under ``path``: a local directory or an ``s3://`` / ``gs://`` URI. Raises
    :class:`~altgrad.config.ConfigError` (a ValueError) naming the path when it holds no results."""
    root = str(path)
    if not tables.has_results(root):
        raise ConfigError(root, "(path)", "holds no results (no Parquet files under trials/, steps/ or layers/)")
    steps = tables.read_table(root, "steps").sort_values(["trial_id", "step"], ignore_index=True)
    layers = tables.read_table(root, "layers").sort_values(["trial_id", "step", "layer"], ignore_index=True)
    trials = tables.read_table(root, "trials")
    running = _running_trials(steps, set(trials["trial_id"]))
    if len(running):
        trials = pd.concat([trials, running], ignore_index=True)
    return Results(root, trials, steps, layers)


def _running_trials(steps: pd.DataFrame, known: set) -> pd.DataFrame:
    """Summary rows, from their own steps, for trials that have not written one yet."""
    rows = []
    for trial_id, own in steps[~steps["trial_id"].isin(known)].groupby("trial_id"):
        val = own["val_loss"].dropna()
        warned = own.loc[own["rank_warnings"] > 0, "step"]
        rows.append({
            "trial_id": trial_id, "format": own["format"].iloc[0], "optimizer": own["optimizer"].iloc[0],
            "status": "running", "steps_completed": int(own["step"].iloc[-1]),
            "final_train_loss": own["train_loss"].iloc[-1], "final_val_loss": val.iloc[-1] if len(val) else None,
            "best_val_loss": val.min() if len(val) else None,
            "first_warning_step": int(warned.min()) if len(warned) else None,
        })
    return tables.to_table("trials", rows).to_pandas()


def is_true(values: pd.Series) -> pd.Series:
    """A plain bool mask where null counts as False (a nullable mask cannot index)."""
    return values.astype("boolean").fillna(False).astype(bool)


def nullable(frame: pd.DataFrame) -> pd.DataFrame:
    """A table for readers: nullable dtypes, so an undefined value (0/0, one seed's spread) is null, not NaN."""
    floats = frame.select_dtypes("float64").columns
    return frame.astype(dict.fromkeys(floats, "Float64"))


# ---- ordering and grouping ----------------------------------------------------------------------
def _ordered(values: pd.Series) -> list:
    """Distinct values in reading order: formats and optimizers as altgrad lists them, others sorted."""
    known = _ORDER.get(values.name, ())

    def key(value):
        base = str(value).split(":")[0]  # "E3M4:bias=1" sorts with E3M4
        return (known.index(base) if base in known else len(known), value)

    return sorted(values.dropna().unique(), key=key)


def _sort(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys, key=lambda c: c.map({v: i for i, v in enumerate(_ordered(c))}),
                             ignore_index=True)


def trial_config(config) -> dict:
    """A trial's cell from its ``config`` JSON as one flat dict with dotted keys ("rank_trend.metric");
    {} where the config is unknown (a running trial, older results). Lists become JSON text, so that every
    value can key a group."""
    return _flatten(json.loads(config)) if isinstance(config, str) else {}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def rank_trend(trial_config: dict) -> RankTrendConfig:
    """The trial's rank-detector settings (warm-up, EMA decay, metric); the defaults where unknown."""
    known = {f: trial_config[f"rank_trend.{f}"] for f in ("warmup_steps", "ema_beta", "metric")
             if f"rank_trend.{f}" in trial_config}
    return RankTrendConfig(**known)


def with_axes(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with one column per matrix axis, named by its dotted key (see :func:`cell_keys`).

    A trial without a config (still running) takes each axis from its own column where it has one, else
    from the other trials of its format and optimizer where they all agree."""
    configs = pd.DataFrame([trial_config(c) for c in trials["config"]], index=trials.index)
    out = trials.copy()
    for key in configs:
        own = out[key] if key in out else pd.Series(None, index=out.index, dtype=object)
        out[key] = configs[key].where(configs[key].notna(), own)
    unknown = trials["config"].isna()
    if unknown.any() and (~unknown).any():
        for key in configs:
            agreed = out[~unknown].groupby(["format", "optimizer"])[key].agg(lambda v: v.iloc[0] if v.nunique() == 1
                                                                                 else None)
            fill = pd.MultiIndex.from_frame(out[["format", "optimizer"]]).map(agreed.to_dict().get)
            out[key] = out[key].where(out[key].notna() | ~unknown, pd.Series(fill, index=out.index, dtype=object))
    return out


def cell_keys(trials: pd.DataFrame) -> list[str]:
    """What makes a cell: format, optimizer and every other matrix axis, i.e. every config key whose value
    differs between trials (and the layers, lr and ulp_lr columns where there is no config), except the
    seed, which is what a cell aggregates over, and the name."""
    axes = with_axes(trials)
    candidates = [*{k: None for s in trials["config"] for k in trial_config(s)}, "layers", "lr", "ulp_lr"]
    varying = sorted({k for k in candidates if k in axes and k not in (*NOT_AXES, "format", "optimizer")
                      and axes[k].nunique() > 1})
    return ["format", "optimizer", *varying]


def layer_kind(layer: str) -> str:
    """A layer's role without its block, so blocks can be averaged: "transformer.h.3.attn.c_proj" ->
    "attn.c_proj"; "lm_head" stays."""
    return re.sub(r"^(?:.*\.)?h\.\d+\.", "", layer)


# ---- tables -------------------------------------------------------------------------------------
def trial_table(results: Results) -> pd.DataFrame:
    """One row per trial: its summary plus what the cell table averages over seeds: mean stall ratio and
    overflow/underflow fractions over its steps, mean flip rate over its layers and checks, and the rank
    drop of each critical layer kind."""
    per_step = results.steps.groupby("trial_id")[["stall_ratio", "overflow_frac", "underflow_frac"]].mean()
    flip_rate = results.layers.groupby("trial_id")["flip_rate"].mean()
    derived = per_step.join(flip_rate, how="outer").join(_rank_drops(results), how="outer")
    table = with_axes(results.trials).merge(derived, left_on="trial_id", right_index=True, how="left")
    return _sort(table, [*cell_keys(results.trials), "seed", "trial_id"])


def _rank_drops(results: Results) -> pd.DataFrame:
    """Per trial and critical layer kind: stable rank at the last check / at the first check from the
    rank detector's warm-up on (the first check where there is none), averaged over blocks. 1 = kept,
    0.5 = halved."""
    layers = results.layers[is_true(results.layers["critical"])]
    if layers.empty:
        return pd.DataFrame(index=pd.Index([], name="trial_id"))
    warmup = results.trials.set_index("trial_id")["config"].map(lambda c: rank_trend(trial_config(c)).warmup_steps)
    before_warmup = layers["step"] < layers["trial_id"].map(warmup).fillna(0)
    key = ["trial_id", "layer"]
    reference = (layers.assign(before=before_warmup).sort_values(["before", "step"])
                 .drop_duplicates(key).set_index(key)["stable_rank"])
    last = layers.drop_duplicates(key, keep="last").set_index(key)["stable_rank"]  # rows are sorted by step
    ratio = (last / reference).rename("ratio").reset_index()
    ratio["kind"] = ratio["layer"].map(layer_kind)
    drops = ratio.pivot_table(index="trial_id", columns="kind", values="ratio", aggfunc="mean", dropna=False)
    return drops.add_prefix(RANK_DROP).rename_axis(columns=None)


def _count(labels: pd.Series) -> str:
    return ", ".join(f"{label} {n}" for label, n in labels.value_counts().items())


def format_optimizer_table(results: Results) -> pd.DataFrame:
    """The cross-format table: one row per cell (format × optimizer × every other matrix axis) aggregated
    over its seeds: n_seeds; losses as mean and std over seeds (std null for one seed; a seed without a
    finite loss is left out of both); mean steps completed; outcomes (stop reason, else status, with counts); and the
    per-trial means of :func:`trial_table`, averaged over seeds."""
    trials = trial_table(results)
    keys = cell_keys(trials)
    trials = trials.assign(outcome=trials["stop_reason"].fillna(trials["status"]))
    means = ["stall_ratio", "flip_rate", "overflow_frac", "underflow_frac",
             *sorted(c for c in trials if c.startswith(RANK_DROP))]
    cells = trials.groupby(keys, dropna=False, sort=False).agg(
        n_seeds=("trial_id", "size"),
        best_val_loss_mean=("best_val_loss", "mean"), best_val_loss_std=("best_val_loss", "std"),
        final_val_loss_mean=("final_val_loss", "mean"), final_val_loss_std=("final_val_loss", "std"),
        steps_completed=("steps_completed", "mean"), outcomes=("outcome", _count),
        **{column: (column, "mean") for column in means},
    )
    return nullable(_sort(cells.reset_index(), keys))
