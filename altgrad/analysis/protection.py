"""Does protection help? Each cell run with ``protection.mode: off`` against the same cell, same seeds,
protected: failure rate and val loss side by side, and one protected layer over time.

The pairs come from the matrix: every axis but ``protection.mode`` and the seed makes a pair
(:func:`~altgrad.analysis.tables.cell_keys`), so the two modes are never pooled as replicates.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from altgrad.analysis.compare import t_interval, welch_interval
from altgrad.analysis.tables import Results, _sort, cell_keys, is_true, nullable, trial_config, with_axes
from altgrad.analysis.warnings import failure_labels
from altgrad.config import ProtectionConfig

MODE = "protection.mode"
OFF = "off"
LOSSES = ("final_val_loss", "best_val_loss")


def _pairs(results: Results) -> tuple[pd.DataFrame, list[str]]:
    """The ended trials with their axes and failure label, and the keys that make a pair."""
    labels = failure_labels(results)
    trials = with_axes(results.trials)
    trials = trials[trials["trial_id"].isin(labels.index)]
    if MODE not in trials:
        return trials.iloc[:0], []
    trials = trials.assign(**{MODE: trials[MODE].fillna(OFF),
                              "failed": is_true(trials["trial_id"].map(labels["failed"]))})
    keys = [key for key in cell_keys(results.trials) if key != MODE]
    return _sort(trials, [*keys, "seed", "trial_id"]), keys


def has_protection(results: Results) -> bool:
    """Whether the results compare protected trials with unprotected ones."""
    trials, _ = _pairs(results)
    return MODE in trials and trials[MODE].eq(OFF).any() and (~trials[MODE].eq(OFF)).any()


def protection_table(results: Results) -> pd.DataFrame:
    """One row per pair (format × optimizer × every other axis but ``protection.mode``) and mode, off
    first: ``n_seeds``, ``n_failed``, ``failure_rate`` (the trainer's failure labels), and per loss in
    :data:`LOSSES` its mean over the seeds with a finite one, 95% t-interval and count (``n_<loss>``); on
    the protected rows ``final_val_loss_vs_off``: protected minus off, Welch's 95% interval (negative =
    protection helps). A trial that failed has no finite final loss, and is in the failure rate only."""
    trials, keys = _pairs(results)
    rows = []
    for pair, own in trials.groupby(keys, dropna=False, sort=False):
        off = own[own[MODE].eq(OFF)]
        modes = [OFF, *sorted(set(own[MODE]) - {OFF})] if len(off) else sorted(set(own[MODE]))
        for mode in modes:
            mine = own[own[MODE].eq(mode)]
            row = {**dict(zip(keys, pair if isinstance(pair, tuple) else (pair,))), MODE: mode,
                   "n_seeds": len(mine), "n_failed": int(mine["failed"].sum()),
                   "failure_rate": float(mine["failed"].mean())}
            for loss in LOSSES:
                mean, low, high, n = t_interval(mine[loss])
                row |= {f"{loss}_mean": mean, f"{loss}_ci_low": low, f"{loss}_ci_high": high, f"n_{loss}": n}
            diff, low, high = (welch_interval(mine["final_val_loss"], off["final_val_loss"])
                               if mode != OFF and len(off) else (None, None, None))
            row |= {"final_val_loss_vs_off": diff, "final_val_loss_vs_off_ci_low": low,
                    "final_val_loss_vs_off_ci_high": high}
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*keys, MODE, "n_seeds", "n_failed", "failure_rate"])
    table = pd.DataFrame(rows)
    floats = [c for c in table if c.endswith(("_mean", "_ci_low", "_ci_high", "_vs_off"))]
    return nullable(table.astype(dict.fromkeys(floats, "Float64")))


def protected_example(results: Results) -> tuple[str, str, str | None] | None:
    """A protected trial and layer worth picturing, and the same cell's unprotected trial (same seed):
    preferably one whose unprotected twin failed and it did not, then the layer protected at the most
    checks. None when no layer was ever protected."""
    trials, keys = _pairs(results)
    layers = results.layers
    if trials.empty or layers.empty or not layers["protected_rank"].notna().any():
        return None
    protected = layers[layers["protected_rank"].fillna(0).gt(0)]
    held = protected.groupby(["trial_id", "layer"]).size().rename("checks").reset_index()
    if held.empty:
        return None
    twin = {}
    for _, own in trials.groupby([*keys, "seed"], dropna=False, sort=False):
        off = own[own[MODE].eq(OFF)]
        for trial in own[~own[MODE].eq(OFF)].itertuples():
            twin[trial.trial_id] = (off["trial_id"].iloc[0] if len(off) else None,
                                    bool(len(off)) and bool(off["failed"].iloc[0]) and not trial.failed)
    held["baseline"] = held["trial_id"].map(lambda t: twin.get(t, (None, False))[0])
    held["prevented"] = held["trial_id"].map(lambda t: twin.get(t, (None, False))[1])
    best = held.sort_values(["prevented", "checks", "trial_id", "layer"], ascending=[False, False, True, True]).iloc[0]
    return best["trial_id"], best["layer"], best["baseline"]


def plot_protected_layer(results: Results, trial_id: str, layer: str, path: str | os.PathLike | None = None,
                         baseline: str | None = None) -> Figure | None:
    """One protected layer over training, in four panels: the trained factor's rank r (0: the whole
    weight trains; shaded while protected), the gradient's principal and minor alignment at the checks
    with the switching and release thresholds, the stable rank of the quantized weight and of the fp32
    master (x: rank warning), and the trial's train loss (with ``baseline``'s, the unprotected twin,
    dashed). Saved to ``path`` when given; None for a layer protection never checked (not watched)."""
    rows = results.layers[results.layers["trial_id"].eq(trial_id) & results.layers["layer"].eq(layer)]
    rows = rows.sort_values("step")
    if not rows["spectral_concentration"].notna().any():  # never checked: not a watched layer
        return None
    configs = results.trials.set_index("trial_id")["config"]
    config = trial_config(configs.get(trial_id))
    defaults = ProtectionConfig()
    thresholds = {name: config.get(f"protection.{name}", getattr(defaults, name))
                  for name in ("principal_threshold", "release_threshold")}
    step = rows["step"].to_numpy()
    rank = rows["protected_rank"].astype("float64").to_numpy()

    fig = Figure(figsize=(8, 8.4), layout="constrained")
    ax_rank, ax_align, ax_stable, ax_loss = fig.subplots(4, 1, sharex=True)
    fig.suptitle(f"{trial_id}: {layer}", fontsize="medium")
    ax_rank.step(step, rank, where="post", color="C3")
    ax_rank.fill_between(step, 0, np.nan_to_num(rank), step="post", where=np.nan_to_num(rank) > 0, color="C3",
                         alpha=0.15, label="protected")
    ax_rank.set(ylabel="r (trained rank)", title="mode: protected where r > 0 (shaded), else the whole weight trains")
    ax_rank.set_ylim(bottom=0)

    measured = rows.dropna(subset=["principal_alignment"])
    ax_align.plot(measured["step"], measured["principal_alignment"].astype("float64"), "o-", ms=3, color="C0",
                  label="principal")
    ax_align.plot(measured["step"], measured["minor_alignment"].astype("float64"), "o-", ms=3, color="C1",
                  label="minor")
    for name, style in (("principal_threshold", "--"), ("release_threshold", ":")):
        ax_align.axhline(thresholds[name], color="grey", ls=style, lw=1, label=name.replace("_", " "))
    ax_align.set(ylabel="share of ‖G‖²", ylim=(-0.02, 1.02), title="gradient alignment with the top-k subspace")
    ax_align.legend(fontsize="small", ncols=4)

    ax_stable.plot(step, rows["stable_rank"].astype("float64"), color="C2", label="quantized")
    if rows["master_stable_rank"].notna().any():
        ax_stable.plot(step, rows["master_stable_rank"].astype("float64"), color="C2", ls="--", lw=1, label="fp32 master")
    warned = rows[is_true(rows["rank_warning"])]
    ax_stable.plot(warned["step"], warned["stable_rank"].astype("float64"), "x", color="black", ms=6,
                   label="rank warning")
    ax_stable.set(ylabel="stable rank")
    ax_stable.legend(fontsize="small", ncols=3)

    steps = results.steps
    for trial, style, label in ((trial_id, "-", "protected"), (baseline, "--", "unprotected (same seed)")):
        own = steps[steps["trial_id"].eq(trial)] if trial else steps.iloc[:0]
        if len(own):
            loss = own["train_loss"].astype("float64")
            ax_loss.plot(own["step"], loss.where(np.isfinite(loss)), style, color="C4", lw=1, label=label)
    ax_loss.set(ylabel="train loss", xlabel="step")
    if ax_loss.lines:
        ax_loss.legend(fontsize="small")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
