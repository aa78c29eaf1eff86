"""From the result tables to answers: which format and optimizer train best, whether the ULP optimizers
beat AdamW, how early a rank warning comes before a stop, the plots, and one markdown report.

Every function takes the :class:`Results` of :func:`load_results` and works on a partial sweep: a trial
that has written steps but no summary row yet joins ``Results.trials`` with status "running" and what its
own rows tell, so a report can be written while the sweep still runs. A missing value stays NaN.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from altgrad import results as tables
from altgrad.config import ConfigError
from altgrad.formats import NAMES
from altgrad.optim import OPTIMIZERS

BASELINE = "adamw"
STOPPED = ("stopped", "error")
RANK_DROP = "rank_drop:"  # column prefix: one column per critical layer kind
_ORDER = {"format": NAMES, "optimizer": OPTIMIZERS}  # reading order of rows, panels and colours


@dataclass(frozen=True)
class Results:
    """The three tables of one run or sweep (``DIR/<name>``). ``trials`` also holds a derived row, status
    "running", for each trial that has steps but no summary yet."""

    path: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    layers: pd.DataFrame

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
            "final_train_loss": own["train_loss"].iloc[-1], "final_val_loss": val.iloc[-1] if len(val) else math.nan,
            "best_val_loss": val.min(), "first_warning_step": int(warned.min()) if len(warned) else None,
        })
    return tables.to_table("trials", rows).to_pandas()


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


def cell_keys(trials: pd.DataFrame) -> list[str]:
    """What makes a cell: format and optimizer, plus the layer policy where the sweep varies it (seeds
    are what a cell aggregates over)."""
    return ["format", "optimizer"] + (["layers"] if trials["layers"].nunique() > 1 else [])


def _identity(trials: pd.DataFrame) -> list[str]:
    return ["trial_id", *cell_keys(trials), "seed"]


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
    table = results.trials.merge(derived, left_on="trial_id", right_index=True, how="left")
    return _sort(table, [*cell_keys(table), "seed", "trial_id"])


def _rank_drops(results: Results) -> pd.DataFrame:
    """Per trial and critical layer kind: stable rank at the last check / at the first check from the
    rank detector's warm-up on (the first check where there is none), averaged over blocks. 1 = kept,
    0.5 = halved."""
    layers = results.layers[results.layers["critical"].eq(True)]
    if layers.empty:
        return pd.DataFrame(index=pd.Index([], name="trial_id"))
    warmup = results.trials.set_index("trial_id")["config"].map(_rank_warmup)
    before_warmup = layers["step"] < layers["trial_id"].map(warmup).fillna(0)
    key = ["trial_id", "layer"]
    reference = (layers.assign(before=before_warmup).sort_values(["before", "step"])
                 .drop_duplicates(key).set_index(key)["stable_rank"])
    last = layers.drop_duplicates(key, keep="last").set_index(key)["stable_rank"]  # rows are sorted by step
    ratio = (last / reference).rename("ratio").reset_index()
    ratio["kind"] = ratio["layer"].map(layer_kind)
    drops = ratio.pivot_table(index="trial_id", columns="kind", values="ratio", aggfunc="mean", dropna=False)
    return drops.add_prefix(RANK_DROP).rename_axis(columns=None)


def _rank_warmup(config) -> int:
    """The trial's rank-detector warm-up in steps, from its config; 0 where the config is unknown."""
    if not isinstance(config, str):
        return 0
    return json.loads(config).get("rank_trend", {}).get("warmup_steps", 0)


def _count(labels: pd.Series) -> str:
    return ", ".join(f"{label} {n}" for label, n in labels.value_counts().items())


def format_optimizer_table(results: Results) -> pd.DataFrame:
    """The cross-format table: one row per cell (format × optimizer [× layer policy]) aggregated over its
    seeds: n_seeds; losses as mean and std over seeds (std NaN for one seed; a seed without a finite loss
    is left out of both); mean steps completed; outcomes (stop reason, else status, with counts); and the
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
    return _sort(cells.reset_index(), keys)


def benefit_table(results: Results) -> pd.DataFrame:
    """Best val loss of each ULP optimizer minus AdamW's, per format (and layer policy where it varies):
    negative = the ULP optimizer trains better. ``... se`` is the standard error of that difference of
    seed means, sqrt(s1²/n1 + s2²/n2): NaN where a side has fewer than two finite seeds."""
    trials = trial_table(results)
    keys = [k for k in cell_keys(trials) if k != "optimizer"]
    stats = (trials.groupby([*keys, "optimizer"], dropna=False)["best_val_loss"]
             .agg(["mean", "std", "count"]).unstack("optimizer"))
    mean = stats["mean"].reindex(columns=list(OPTIMIZERS))
    var_of_mean = (stats["std"] ** 2 / stats["count"]).reindex(columns=list(OPTIMIZERS))
    table = pd.DataFrame({f"{BASELINE} best_val_loss": mean[BASELINE]})
    for optimizer in OPTIMIZERS:
        if optimizer != BASELINE:
            table[f"{optimizer} - {BASELINE}"] = mean[optimizer] - mean[BASELINE]
            table[f"{optimizer} - {BASELINE} se"] = np.sqrt(var_of_mean[optimizer] + var_of_mean[BASELINE])
    return _sort(table.reset_index(), keys)


def warning_lead_times(results: Results) -> pd.DataFrame:
    """Every stopped or failed trial with the steps from its first rank warning to its stop
    (``lead_time_steps``): how much notice the detector gave. NaN where no warning came first."""
    trials = trial_table(results)
    stopped = trials[trials["status"].isin(STOPPED)]
    warned_first = stopped["first_warning_step"] <= stopped["steps_completed"]
    lead = (stopped["steps_completed"] - stopped["first_warning_step"]).where(warned_first)
    columns = [*_identity(trials), "status", "stop_reason", "first_warning_step", "steps_completed",
               "lead_time_steps"]
    return stopped.assign(lead_time_steps=lead)[columns].reset_index(drop=True)


def false_alarms(results: Results) -> pd.DataFrame:
    """Trials that completed healthy although a rank warning fired, with their first warning step."""
    trials = trial_table(results)
    alarmed = trials[trials["status"].eq("completed") & trials["first_warning_step"].notna()]
    columns = [*_identity(trials), "first_warning_step", "steps_completed", "best_val_loss"]
    return alarmed[columns].reset_index(drop=True)


# ---- plots (matplotlib Figures without pyplot: no global state, PNG through Agg) ----------------
def _format_colors(results: Results) -> dict[str, str]:
    return {fmt: f"C{i % 10}" for i, fmt in enumerate(_ordered(results.trials["format"]))}


def _smooth(values: pd.Series) -> pd.Series:
    return values.rolling(max(1, len(values) // 20), min_periods=1).mean()


def _trial_label(trial) -> str:
    label = trial.trial_id if pd.isna(trial.seed) else f"seed {int(trial.seed)}"
    return label if trial.status == "completed" else f"{label} ({trial.stop_reason or trial.status})"


def _loss_range(steps: pd.DataFrame) -> tuple[float | None, float | None]:
    """From just below the best loss to a little above the starting loss: a diverging run leaves
    through the top instead of squashing every other curve."""
    losses = pd.concat([steps["train_loss"], steps["val_loss"]])
    losses = losses[np.isfinite(losses)]
    start = steps.groupby("trial_id")["train_loss"].first().median()
    if losses.empty or not math.isfinite(start):
        return None, None
    low = 0.95 * losses.min()
    return low, max(1.15 * start, low + 1e-3)


def plot_loss_curves(results: Results) -> dict[str, Figure]:
    """One figure per format, one panel per optimizer: each trial's smoothed train loss (line) and its
    val losses (dots)."""
    trials = _sort(results.trials, ["format", "optimizer", "seed", "trial_id"])
    optimizers = _ordered(trials["optimizer"])
    by_trial = dict(tuple(results.steps.groupby("trial_id")))
    low, high = _loss_range(results.steps)
    figures = {}
    for fmt in _ordered(trials["format"]):
        fig = Figure(figsize=(4 * len(optimizers), 3.2), layout="constrained")
        axes = fig.subplots(1, len(optimizers), sharey=True, squeeze=False)[0]
        for ax, optimizer in zip(axes, optimizers):
            cell = trials[trials["format"].eq(fmt) & trials["optimizer"].eq(optimizer)]
            for i, trial in enumerate(cell.itertuples()):
                own = by_trial.get(trial.trial_id)
                if own is None:
                    continue
                color = f"C{i % 10}"
                ax.plot(own["step"], _smooth(own["train_loss"]), color=color, lw=1, label=_trial_label(trial))
                val = own.dropna(subset=["val_loss"])
                ax.plot(val["step"], val["val_loss"], "o", color=color, ms=3)
            ax.set(title=f"{fmt} / {optimizer}", xlabel="step", ylim=(low, high))
            if ax.lines:
                ax.legend(fontsize="small")
        axes[0].set_ylabel("loss: train (line), val (dots)")
        figures[fmt] = fig
    return figures


def plot_dynamics(results: Results) -> Figure | None:
    """Stall ratio (smoothed; share of updates that round back to the same weight) and flip rate over
    training: one row per optimizer, one line per format averaged over its seeds (and layers)."""
    if results.steps.empty:
        return None
    colors = _format_colors(results)
    optimizers = _ordered(results.trials["optimizer"])
    fig = Figure(figsize=(10, 2.6 * len(optimizers) + 0.4), layout="constrained")
    axes = fig.subplots(len(optimizers), 2, sharex=True, squeeze=False)
    curves = (results.steps.groupby(["optimizer", "format", "step"])["stall_ratio"].mean(),
              results.layers.groupby(["optimizer", "format", "step"])["flip_rate"].mean())
    for column, (what, series) in enumerate(zip(("stall ratio", "flip rate"), curves)):
        for (optimizer, fmt), curve in series.groupby(level=["optimizer", "format"]):
            values = _smooth(curve) if what == "stall ratio" else curve
            axes[optimizers.index(optimizer)][column].plot(curve.index.get_level_values("step"), values.to_numpy(),
                                                           color=colors[fmt], lw=1, label=fmt)
        for row, optimizer in enumerate(optimizers):
            axes[row][column].set_title(f"{optimizer}: {what}")
        axes[-1][column].set_xlabel("step")
    handles = [Line2D([], [], color=color, label=fmt) for fmt, color in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def plot_ranks(results: Results) -> Figure | None:
    """Stable rank of the critical layers over training (one column per layer kind, averaged over
    blocks; one row per optimizer), one line per trial coloured by format; x marks a rank warning, a
    black square the last check of a trial that was stopped or failed."""
    trials = results.trials.set_index("trial_id")
    layers = results.layers[results.layers["critical"].eq(True) & results.layers["trial_id"].isin(trials.index)]
    if layers.empty:
        return None
    layers = layers.assign(kind=layers["layer"].map(layer_kind), warning=layers["rank_warning"].eq(True))
    curves = layers.groupby(["trial_id", "kind", "step"]).agg(stable_rank=("stable_rank", "mean"),
                                                              warning=("warning", "any"))
    kinds = sorted(layers["kind"].unique())
    optimizers = _ordered(results.trials["optimizer"])
    colors = _format_colors(results)
    fig = Figure(figsize=(3.6 * len(kinds) + 1.2, 2.6 * len(optimizers) + 0.4), layout="constrained")
    axes = fig.subplots(len(optimizers), len(kinds), sharex=True, squeeze=False)
    for (trial_id, kind), curve in curves.groupby(level=["trial_id", "kind"]):
        trial, curve = trials.loc[trial_id], curve.droplevel(["trial_id", "kind"])
        ax, color = axes[optimizers.index(trial["optimizer"])][kinds.index(kind)], colors[trial["format"]]
        ax.plot(curve.index, curve["stable_rank"], color=color, lw=1, alpha=0.8)
        warned = curve[curve["warning"]]
        ax.plot(warned.index, warned["stable_rank"], "x", color=color, ms=6)
        if trial["status"] in STOPPED:
            ax.plot(curve.index[-1], curve["stable_rank"].iloc[-1], "s", mfc="none", mec="black", ms=8)
    for row, optimizer in enumerate(optimizers):
        for column, kind in enumerate(kinds):
            axes[row][column].set_title(f"{optimizer}: {kind}")
        axes[row][0].set_ylabel("stable rank")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    handles = [Line2D([], [], color=color, label=fmt) for fmt, color in colors.items()]
    handles += [Line2D([], [], marker="x", ls="none", color="grey", label="rank warning"),
                Line2D([], [], marker="s", ls="none", mfc="none", mec="black", label="stopped")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def plot_benefit(results: Results) -> Figure | None:
    """:func:`benefit_table` as bars per format with ±1 standard error; below zero = better than AdamW."""
    table = benefit_table(results)
    differences = [c for c in table if c.endswith(f" - {BASELINE}")]
    if table[differences].isna().all(axis=None):
        return None
    keys = [k for k in cell_keys(results.trials) if k != "optimizer"]
    labels = table[keys].astype(str).agg(" / ".join, axis=1)
    x, width = np.arange(len(table)), 0.8 / len(differences)
    fig = Figure(figsize=(max(5.0, 1.1 * len(table) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    for i, column in enumerate(differences):
        ax.bar(x + (i - (len(differences) - 1) / 2) * width, table[column], width,
               yerr=table[f"{column} se"], capsize=3, label=column)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, labels, rotation=30 if len(table) > 6 else 0)
    ax.set_ylabel("Δ best val loss (< 0: better)")
    ax.legend(fontsize="small")
    return fig


def trial_lanes(trials: pd.DataFrame) -> pd.Series:
    """A lane per trial within its node, as a slot would have run them: in start order, each trial takes
    the lane that freed up first. Trials without both stamps (running, or written before the stamps
    existed) get none (NaN)."""
    lanes = pd.Series(np.nan, index=trials.index)
    stamped = trials.dropna(subset=["started_at", "ended_at"]).sort_values("started_at")
    ends: dict[object, list] = {}
    for index, trial in stamped.iterrows():
        node = ends.setdefault(trial["node_id"], [])
        free = [lane for lane, end in enumerate(node) if end <= trial["started_at"]]
        lane = min(free, key=node.__getitem__) if free else len(node)
        node[lane:lane + 1] = [trial["ended_at"]]
        lanes[index] = lane
    return lanes


def plot_timeline(results: Results) -> Figure | None:
    """Each trial as a bar from its start to its end, one row per slot of each node, coloured by how it
    ended: where the cluster sat idle, and which trials early stopping cut short."""
    trials = results.trials.assign(lane=trial_lanes(results.trials)).dropna(subset=["lane"])
    if trials.empty:
        return None
    origin = trials["started_at"].min()
    slots = trials.groupby(["node_id", "lane"])
    rows = slots.ngroup()  # numbered in the order of slots.groups' sorted keys
    fig = Figure(figsize=(10, 0.35 * (rows.max() + 1) + 1.2), layout="constrained")
    ax = fig.subplots()
    colors = {"completed": "C2", "stopped": "C1", "error": "C3"}
    for row, trial in zip(rows, trials.itertuples()):
        start = (trial.started_at - origin).total_seconds()
        ax.barh(row, (trial.ended_at - origin).total_seconds() - start, left=start, height=0.8,
                color=colors.get(trial.status, "C7"), edgecolor="white", lw=0.5)
    ax.set_yticks(range(slots.ngroups), [f"{str(node)[:8]} / {int(lane)}" for node, lane in slots.groups],
                  fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first trial started")
    ax.set_ylabel("node / slot")
    handles = [Line2D([], [], color=color, lw=6, label=status) for status, color in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


# ---- the report ---------------------------------------------------------------------------------
def _pm(value: float, spread: float) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.4g}" if pd.isna(spread) else f"{value:.4g} ± {spread:.2g}"


def _merge_spread(table: pd.DataFrame, pairs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A display copy with each (value, spread) column pair as one "value ± spread" text column."""
    shown = table.drop(columns=[spread for _, spread, _ in pairs])
    for value, spread, _ in pairs:
        shown[value] = [_pm(v, s) for v, s in zip(table[value], table[spread])]
    return shown.rename(columns={value: name for value, _, name in pairs})


def _display_cells(cells: pd.DataFrame) -> pd.DataFrame:
    return _merge_spread(cells, [(f"{m}_mean", f"{m}_std", m) for m in ("best_val_loss", "final_val_loss")])


def _display_benefit(benefit: pd.DataFrame) -> pd.DataFrame:
    differences = [c for c in benefit if c.endswith(f" - {BASELINE}")]
    return _merge_spread(benefit, [(c, f"{c} se", c) for c in differences])


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table with four significant digits; NaN shows as "—"."""
    return tables.markdown_table(frame, floatfmt=".4g")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _overview(results: Results) -> str:
    trials = results.trials
    statuses = _count(trials["status"]) or "none"
    lines = [f"Source: `{results.path}`. Trials: {len(trials)} ({statuses}). "
             f"Formats: {', '.join(_ordered(trials['format'])) or '—'}. "
             f"Optimizers: {', '.join(_ordered(trials['optimizer'])) or '—'}."]
    running = int(trials["status"].eq("running").sum())
    if running:
        lines.append(f"\n{running} trial(s) have no summary yet (still running, or ended without one): their "
                     f"numbers come from the steps written so far.")
    return "\n".join(lines)


_CELL_GLOSSARY = (
    "One row per cell, over its seeds: losses as mean ± std over the seeds that have one (no std for one "
    "seed); *outcomes* counts stop reasons (else statuses). *stall_ratio*: share of weight updates that left "
    "the 8-bit weight unchanged; *flip_rate*: share of weights whose 8-bit value changed, per step; "
    "*overflow/underflow_frac*: share of quantized values beyond the format's range / flushed to zero. "
    "*rank_drop:&lt;layer&gt;*: stable rank at the last check ÷ at the first check after the rank detector's "
    "warm-up (1 = kept, 0.5 = halved), averaged over blocks."
)


def write_report(path: str | os.PathLike | Results, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.md``: the cross-format table, the benefit of the ULP optimizers, rank-warning
    lead times and false alarms, and PNG plots beside it, linked relatively so the folder travels whole.
    Returns the report's path."""
    results = path if isinstance(path, Results) else load_results(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def image(name: str, fig: Figure | None, alt: str) -> str:
        if fig is None:
            return f"*No data for this plot ({alt}).*"
        fig.savefig(out / name, dpi=110)
        return f"![{alt}]({name})"

    def table(frame: pd.DataFrame, empty: str) -> str:
        return _markdown(frame) if len(frame) else f"*{empty}*"

    benefit = benefit_table(results)
    parts = [
        f"# altgrad report: {results.name}", _overview(results),
        "## Formats × optimizers", _CELL_GLOSSARY,
        table(_display_cells(format_optimizer_table(results)), "No trials."),
        f"## Do the ULP optimizers beat {BASELINE}?",
        f"Best val loss minus {BASELINE}'s, per format (negative = better), ± standard error over seeds.",
        table(_display_benefit(benefit), "No trials."),
        image("benefit.png", plot_benefit(results), f"benefit over {BASELINE}"),
        "## Rank warnings",
        "### Lead time: first warning to stop",
        table(warning_lead_times(results), "No trial was stopped or failed."),
        "### False alarms: completed trials that warned",
        table(false_alarms(results), "None."),
        "## Loss curves",
        *[image(f"loss_{_slug(fmt)}.png", fig, f"loss curves, {fmt}")
          for fmt, fig in plot_loss_curves(results).items()],
        "## Stall ratio and flip rate", image("dynamics.png", plot_dynamics(results), "stall ratio and flip rate"),
        "## Stable rank of the critical layers",
        image("ranks.png", plot_ranks(results), "stable rank of critical layers"),
        "## Timeline", "Each trial from start to end, per node and slot.",
        image("timeline.png", plot_timeline(results), "trials over time per node and slot"),
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report


def default_report_dir(path: str) -> Path:
    """``<path>/report`` for a local path; ``./<name>-report`` for an object-store URI, since the
    report is written locally."""
    if "://" in path:
        return Path(f"{path.rstrip('/').rsplit('/', 1)[-1]}-report")
    return Path(path) / "report"


def report_main(path: str, out: str | None = None) -> int:
    """``altgrad report PATH [--out DIR]``: print the cross-format table, write the report, say where.
    A path without results raises ConfigError (a ValueError, one line): the CLI exits 2."""
    results = load_results(path)
    print(_markdown(_display_cells(format_optimizer_table(results))))
    report = write_report(results, out or default_report_dir(path))
    print(f"\nreport: {report}")
    return 0
