"""Fair comparisons: trials at matched steps, means with 95% t-intervals over seeds, each (format,
optimizer) at its best learning rate.

A trial stopped at step 200 has seen two thirds of the data of one that ran to 300, so its loss is
compared with the others' at step 200: the val loss of each trial's last evaluation at or before the
matched step. Seeds are the only replicates: every other matrix axis (lr, ulp_lr, layers, ...) keeps its
cells apart (:func:`~altgrad.analysis.tables.cell_keys`). A spread or interval from one seed is null.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from altgrad.analysis.tables import BASELINE, STOPPED, Results, _sort, cell_keys, nullable, with_axes

LR_AXES = ("lr", "ulp_lr")
CONFIDENCE = 0.95


def lr_axis(optimizer: str) -> str:
    """The learning rate that sets an optimizer's step on the quantized weights."""
    return "lr" if optimizer == BASELINE else "ulp_lr"


def t_interval(values) -> tuple[float | None, float | None, float | None, int]:
    """(mean, low, high, n) of the finite values: a 95% Student-t interval for their mean; the interval is
    null for fewer than two values, and everything is null for none."""
    values = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return None, None, None, 0
    mean = float(values.mean())
    if n == 1:
        return mean, None, None, 1
    half = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def welch_interval(a, b) -> tuple[float | None, float | None, float | None]:
    """(mean(a) - mean(b), low, high): Welch's 95% interval for a difference of means; null interval where
    a side has fewer than two finite values."""
    (mean_a, *_, n_a), (mean_b, *_, n_b) = t_interval(a), t_interval(b)
    if n_a == 0 or n_b == 0:
        return None, None, None
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return diff, None, None
    var = [pd.to_numeric(pd.Series(x, dtype=object), errors="coerce").astype(float) for x in (a, b)]
    parts = [v[np.isfinite(v)].var(ddof=1) / n for v, n in zip(var, (n_a, n_b))]
    se = math.sqrt(sum(parts))
    if se == 0:
        return diff, diff, diff
    df = se ** 4 / sum(p ** 2 / (n - 1) for p, n in zip(parts, (n_a, n_b)))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, df) * se
    return diff, diff - half, diff + half


def reached_step(trials: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(trials["steps_completed"], errors="coerce")


def val_loss_at(results: Results, at: pd.Series) -> pd.Series:
    """Per trial (``at`` indexed by trial_id), the val loss of its last evaluation at or before ``at``; null
    where it had none by then."""
    evals = results.steps.loc[results.steps["val_loss"].notna(), ["trial_id", "step", "val_loss"]]
    limit = evals["trial_id"].map(at).astype("float64")  # a trial not asked about: NaN, dropped
    evals = evals[evals["step"] <= limit].sort_values("step")
    last = evals.groupby("trial_id")["val_loss"].last().astype("Float64")
    return last.reindex(at.index)


def _final_step(trials: pd.DataFrame) -> int:
    planned = pd.to_numeric(trials["steps_planned"], errors="coerce")
    return int(max(planned.max(skipna=True) if planned.notna().any() else 0, reached_step(trials).max()))


def matched_comparison(results: Results, step: int | None = None) -> pd.DataFrame:
    """Every cell's val loss at matched steps, over its seeds that reached the step: mean, 95% interval, and
    the cell's rank among the cells at that step (1 = lowest loss).

    At ``step`` when given; else at the sweep's final step and at each step where a trial was stopped
    early, so that a stopped trial is compared with the others at the step it reached: its cell's row at
    that step is flagged ``stopped_here`` and names it in ``stopped_trials``."""
    trials = with_axes(results.trials)
    keys = cell_keys(results.trials)
    if trials.empty:
        return pd.DataFrame(columns=["step", *keys, "n_seeds", "val_loss_mean"])
    reached = reached_step(trials)
    final = _final_step(trials) if step is None else int(step)
    early = trials["status"].isin(STOPPED) & (reached < final)
    at_steps = [final] if step is not None else sorted({final, *reached[early].astype(int)})
    rows = []
    for at in at_steps:
        members = trials[reached >= at]
        values = val_loss_at(results, pd.Series(at, index=members["trial_id"]))
        members = members.assign(value=values.to_numpy(), stopped_here=early & (reached == at))
        for cell, own in members.groupby(keys, dropna=False, sort=False):
            mean, low, high, n = t_interval(own["value"])
            stopped = own.loc[own["stopped_here"], "trial_id"]
            rows.append({"step": at, **dict(zip(keys, cell)), "n_seeds": n, "val_loss_mean": mean,
                         "val_loss_ci_low": low, "val_loss_ci_high": high, "stopped_here": bool(len(stopped)),
                         "stopped_trials": ", ".join(stopped) if len(stopped) else None})
    table = pd.DataFrame(rows)
    table["val_loss_mean"] = table["val_loss_mean"].astype("Float64")
    table["rank"] = table.groupby("step")["val_loss_mean"].rank(method="min").astype("Int64")
    table["n_cells"] = table.groupby("step")["val_loss_mean"].transform("count").astype("Int64")
    return nullable(_sort(table, ["step", *keys]).astype({"val_loss_ci_low": "Float64",
                                                          "val_loss_ci_high": "Float64"}))


def best_lr_cells(results: Results) -> pd.DataFrame:
    """The trials of each cell at its best learning rate: among the cells that differ only in lr and
    ulp_lr, the one with the lowest mean best val loss over seeds. ``lr_chosen`` is the learning rate that
    matters for the optimizer (lr for adamw, ulp_lr for the ULP optimizers)."""
    trials = with_axes(results.trials)
    keys = cell_keys(results.trials)
    varied = [k for k in keys if k in LR_AXES]
    if not varied:
        return trials.assign(lr_chosen=[t[lr_axis(t["optimizer"])] for _, t in trials.iterrows()])
    rest = [k for k in keys if k not in LR_AXES]
    score = trials.groupby(keys, dropna=False)["best_val_loss"].mean().rename("score").reset_index()
    score = score.assign(score=score["score"].fillna(np.inf)).sort_values("score", kind="stable")
    chosen = score.drop_duplicates(rest)[keys]
    best = trials.merge(chosen, on=keys, how="inner")
    return best.assign(lr_chosen=[t[lr_axis(t["optimizer"])] for _, t in best.iterrows()])


def best_split(results: Results) -> pd.DataFrame:
    """Per optimizer, every format at its best learning rate, ranked by val loss at the sweep's final step
    (over the seeds that reached it), with 95% intervals. A cell whose trials all stopped earlier is
    missing here; :func:`matched_comparison` compares it at its own step."""
    keys = cell_keys(results.trials)
    best = best_lr_cells(results)
    final = matched_comparison(results).pipe(lambda t: t[t["step"].eq(t["step"].max())])
    table = final.merge(best[[*keys, "lr_chosen"]].drop_duplicates(keys), on=keys, how="inner")
    table = table.drop(columns=["rank", "n_cells", "stopped_here", "stopped_trials"])
    within = [k for k in keys if k not in (*LR_AXES, "format")]
    table["rank"] = table.groupby(within, dropna=False)["val_loss_mean"].rank(method="min").astype("Int64")
    return _sort(table, [*within, "rank"])


def benefit_table(results: Results) -> pd.DataFrame:
    """Each ULP optimizer against adamw, both at their best learning rate, per format (and every other
    axis): val loss minus adamw's at the matched step (the last step every trial of both cells reached),
    with Welch's 95% interval; negative = the ULP optimizer trains better. ``at_final_step`` is False where
    a stopped trial forced an earlier step."""
    best = best_lr_cells(results)
    keys = [k for k in cell_keys(results.trials) if k not in (*LR_AXES, "optimizer")]
    final = _final_step(results.trials) if len(results.trials) else 0
    rows = []
    for cell, own in best.groupby(keys, dropna=False, sort=False):
        base = own[own["optimizer"].eq(BASELINE)]
        for optimizer, mine in own[~own["optimizer"].eq(BASELINE)].groupby("optimizer", sort=False):
            pair = pd.concat([base, mine])
            at = int(reached_step(pair).min())
            values = val_loss_at(results, pd.Series(at, index=pair["trial_id"]))
            diff, low, high = welch_interval(values[mine["trial_id"]], values[base["trial_id"]])
            rows.append({**dict(zip(keys, cell)), "optimizer": optimizer,
                         f"{BASELINE} lr": base["lr_chosen"].iloc[0] if len(base) else None,
                         "ulp_lr": mine["lr_chosen"].iloc[0], "step": at, "at_final_step": at >= final,
                         f"n_{BASELINE}": t_interval(values[base["trial_id"]])[3],
                         "n_seeds": t_interval(values[mine["trial_id"]])[3],
                         f"{BASELINE} val_loss": t_interval(values[base["trial_id"]])[0],
                         "val_loss": t_interval(values[mine["trial_id"]])[0],
                         "difference": diff, "ci_low": low, "ci_high": high})
    if not rows:
        return pd.DataFrame(columns=[*keys, "optimizer", "step", "difference", "ci_low", "ci_high"])
    floats = {c: "Float64" for c in (f"{BASELINE} val_loss", "val_loss", "difference", "ci_low", "ci_high")}
    return _sort(pd.DataFrame(rows).astype(floats), [*keys, "optimizer"])
