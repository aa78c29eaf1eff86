"""The report's figures: matplotlib Figures without pyplot (no global state; PNG through Agg). Each returns
None where the results hold nothing to draw."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from altgrad.analysis.compare import benefit_table
from altgrad.analysis.signals import SIGNALS, available
from altgrad.analysis.tables import BASELINE, STOPPED, Results, _ordered, _sort, is_true, layer_kind
from altgrad.analysis.warnings import failure_labels, failure_order, quality, rule_firings, warning_curve

MAX_FAILURE_PANELS = 8


def _format_colors(results: Results) -> dict[str, str]:
    return {fmt: f"C{i % 10}" for i, fmt in enumerate(_ordered(results.trials["format"]))}


def _smooth(values: pd.Series) -> pd.Series:
    return values.rolling(max(1, len(values) // 20), min_periods=1).mean()


def _trial_label(trial) -> str:
    label = trial.trial_id if pd.isna(trial.seed) else f"seed {int(trial.seed)}"
    if trial.status == "completed":
        return label
    return f"{label} ({trial.stop_reason if pd.notna(trial.stop_reason) else trial.status})"


def _loss_range(steps: pd.DataFrame) -> tuple[float | None, float | None]:
    """From just below the best loss to a little above the starting loss: a diverging run leaves
    through the top instead of squashing every other curve."""
    losses = pd.concat([steps["train_loss"], steps["val_loss"]]).astype("float64")  # null -> NaN: dropped next
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
    """Stable rank of the quantized weight (what the forward sees) of the critical layers over training
    (one column per layer kind, averaged over blocks; one row per optimizer), one line per trial coloured by
    format; x marks a rank warning, a black square the last check of a trial that was stopped or failed."""
    trials = results.trials.set_index("trial_id")
    layers = results.layers[is_true(results.layers["critical"]) & results.layers["trial_id"].isin(trials.index)]
    if layers.empty:
        return None
    layers = layers.assign(kind=layers["layer"].map(layer_kind), warning=is_true(layers["rank_warning"]))
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
    """:func:`benefit_table` as bars per format with their 95% intervals; below zero = better than AdamW.
    A hatched bar was compared at an earlier step than the sweep's last (a stopped trial)."""
    table = benefit_table(results)
    if table.empty or table["difference"].isna().all():
        return None
    optimizers = _ordered(table["optimizer"])
    groups = table.drop(columns="optimizer").iloc[:, :table.columns.get_loc("optimizer")].astype(str).agg(
        " / ".join, axis=1)
    labels = list(dict.fromkeys(groups))
    width = 0.8 / len(optimizers)
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    for i, optimizer in enumerate(optimizers):
        own = table[table["optimizer"].eq(optimizer)]
        x = np.array([labels.index(g) for g in groups[own.index]]) + (i - (len(optimizers) - 1) / 2) * width
        diff = own["difference"].to_numpy(dtype=float, na_value=np.nan)
        low = (diff - own["ci_low"].to_numpy(dtype=float, na_value=np.nan))
        high = (own["ci_high"].to_numpy(dtype=float, na_value=np.nan) - diff)
        bars = ax.bar(x, diff, width, yerr=np.nan_to_num([low, high]), capsize=3, color=f"C{i}",
                      label=f"{optimizer} - {BASELINE}")
        for bar, full in zip(bars, own["at_final_step"]):
            if not full:
                bar.set_hatch("//")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 6 else 0)
    ax.set_ylabel("Δ val loss at matched step (< 0: better)")
    ax.legend(fontsize="small")
    return fig


def plot_warning_curves(results: Results) -> Figure | None:
    """Recall against false-alarm rate per signal as its threshold sweeps (a dot per threshold, the
    default ringed), and each stopping rule as one square: up and left is better."""
    curves = {name: warning_curve(results, signal) for name, signal in SIGNALS.items() if available(results, signal)}
    labels = failure_labels(results)
    if not curves or not labels["failed"].astype(bool).any():
        return None
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        curve = curve.dropna(subset=["recall", "false_alarm_rate"])
        style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--")
        ax.plot(curve["false_alarm_rate"], curve["recall"], marker="o", ms=3, lw=1, label=name, **style)
        default = curve[curve["threshold"].eq(SIGNALS[name].threshold)]
        ax.plot(default["false_alarm_rate"], default["recall"], "o", mfc="none", ms=9, color=style["color"])
    for name, first in rule_firings(results).items():
        q = quality(first, labels)
        if q["recall"] is not None and q["false_alarm_rate"] is not None:
            ax.plot(q["false_alarm_rate"], q["recall"], "s", ms=8, mec="black", label=name)
    ax.set(xlabel="false-alarm rate (healthy trials that fired)", ylabel="recall (failures warned before onset)",
           xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))
    fig.legend(loc="outside right upper", fontsize="x-small")
    return fig


def plot_failure_order(results: Results) -> Figure | None:
    """One panel per failed trial (up to 8): its train loss, the failure onset (black), and the first
    firing of each rule or signal before it as a labelled vertical line."""
    labels = failure_labels(results)
    failed = labels[labels["failed"].astype(bool)].head(MAX_FAILURE_PANELS)
    if failed.empty:
        return None
    order = failure_order(results)
    columns = min(2, len(failed))
    rows = math.ceil(len(failed) / columns)
    fig = Figure(figsize=(6 * columns, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (trial_id, label) in zip(axes, failed.iterrows()):
        own = results.steps[results.steps["trial_id"].eq(trial_id)]
        ax.plot(own["step"], own["train_loss"], color="C7", lw=0.8)
        ax.axvline(label["failure_step"], color="black", lw=1.5)
        ax.annotate(f"onset ({label['failure_kind']})", (label["failure_step"], 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize="x-small")
        for i, fired in enumerate(order[order["trial_id"].eq(trial_id)].itertuples()):
            ax.axvline(fired.first_fired_step, color=f"C{i % 10}", lw=1, ls="--")
            ax.annotate(fired.signal.split(":", 1)[1], (fired.first_fired_step, 0.02),
                        xycoords=("data", "axes fraction"),
                        rotation=90, va="bottom", ha="right", fontsize="x-small", color=f"C{i % 10}")
        ax.set(title=trial_id, xlabel="step", ylabel="train loss")
    for ax in axes[len(failed):]:
        ax.set_visible(False)
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


