"""Which split is best under per-tensor and under block scaling? The same format and optimizer at each
``scaling.granularity`` of the matrix, side by side: val loss and rank among the formats per granularity,
and each finer granularity against per tensor.

Each cell is at its best learning rate (:func:`~altgrad.analysis.compare.best_lr_cells`) and compared at
the sweep's final step over the seeds that reached it, as :func:`~altgrad.analysis.compare.best_split`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from altgrad.analysis.compare import (LR_AXES, _final_step, best_lr_cells, best_split, reached_step, t_interval,
                                      val_loss_at, welch_interval)
from altgrad.analysis.tables import Results, _ordered, _sort, cell_keys, nullable
from altgrad.config import GRANULARITIES

GRANULARITY = "scaling.granularity"
REFERENCE = "tensor"


def has_granularities(results: Results) -> bool:
    """Whether the sweep varied the scaling granularity (an axis of its matrix)."""
    return len(results.trials) > 0 and GRANULARITY in cell_keys(results.trials)


def granularity_table(results: Results) -> pd.DataFrame:
    """One row per format × optimizer (× every other axis but the granularity and the learning rates):
    per granularity ``g`` its val loss at the final step (``g mean``, ``g ci_low``, ``g ci_high``, ``g n``,
    95% t-interval over the seeds that reached it) and the format's rank among the formats under ``g``
    (``g rank``, 1 = best), and for each ``g`` but tensor ``g - tensor`` with Welch's 95% interval
    (negative: the finer scaling trains better). Empty without a granularity axis."""
    if not has_granularities(results):
        return pd.DataFrame()
    keys = [k for k in cell_keys(results.trials) if k not in (*LR_AXES, GRANULARITY)]
    best = best_lr_cells(results)
    final = _final_step(results.trials)
    reached = best[reached_step(best) >= final]  # a trial stopped earlier is compared at its own step elsewhere
    values = val_loss_at(results, pd.Series(final, index=reached["trial_id"]))
    ranks = best_split(results).set_index([*keys, GRANULARITY])["rank"]
    present = [g for g in GRANULARITIES if g in set(best[GRANULARITY])]
    rows = []
    for cell, own in best.groupby(keys, dropna=False, sort=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        row, losses = dict(zip(keys, cell)), {}
        for g in present:
            losses[g] = values.reindex(own.loc[own[GRANULARITY].eq(g), "trial_id"]).dropna()
            mean, low, high, n = t_interval(losses[g])
            row |= {f"{g} mean": mean, f"{g} ci_low": low, f"{g} ci_high": high, f"{g} n": n,
                    f"{g} rank": ranks.get((*cell, g), pd.NA)}
        for g in present:
            if g != REFERENCE and REFERENCE in present:
                diff, low, high = (welch_interval(losses[g], losses[REFERENCE])
                                   if len(losses[g]) and len(losses[REFERENCE]) else (None, None, None))
                row |= {f"{g} - {REFERENCE}": diff, f"{g} - {REFERENCE} ci_low": low,
                        f"{g} - {REFERENCE} ci_high": high}
        rows.append(row)
    table = pd.DataFrame(rows)
    floats = [c for c in table if c.endswith((" mean", " ci_low", " ci_high", f" - {REFERENCE}"))]
    table = table.astype({**dict.fromkeys(floats, "Float64"),
                          **{c: "Int64" for c in table if c.endswith((" n", " rank"))}})
    return nullable(_sort(table, keys).reset_index(drop=True))


def plot_granularity(results: Results) -> Figure | None:
    """Val loss per format at the final step, one panel per optimizer, one series per granularity (mean and
    95% interval over seeds): where the lines cross, the best split depends on the scaling."""
    table = granularity_table(results)
    if table.empty:
        return None
    present = [g for g in GRANULARITIES if f"{g} mean" in table]
    optimizers = _ordered(table["optimizer"])
    formats = list(dict.fromkeys(table["format"]))
    fig = Figure(figsize=(max(6.0, 0.7 * len(formats) + 2), 3.4 * len(optimizers)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(optimizers), 1, sharex=True))
    for ax, optimizer in zip(axes, optimizers):
        own = table[table["optimizer"].eq(optimizer)].groupby("format", sort=False).first()  # first of other axes
        x = np.array([formats.index(f) for f in own.index])
        means = np.concatenate([own[f"{g} mean"].to_numpy(dtype=float, na_value=np.nan) for g in present])
        top = np.nanmedian(means) * 1.3 if np.isfinite(means).any() else None  # a diverged cell stays off-scale
        for i, g in enumerate(present):
            mean = own[f"{g} mean"].to_numpy(dtype=float, na_value=np.nan)
            low = mean - own[f"{g} ci_low"].to_numpy(dtype=float, na_value=np.nan)
            high = own[f"{g} ci_high"].to_numpy(dtype=float, na_value=np.nan) - mean
            ax.errorbar(x + (i - (len(present) - 1) / 2) * 0.15, mean, yerr=np.nan_to_num([low, high]), fmt="o-",
                        ms=4, capsize=3, color=f"C{i}", label=f"granularity {g}")
        off_scale = int((means > top).sum()) if top else 0
        ax.set(title=optimizer + (f" ({off_scale} off-scale above)" if off_scale else ""),
               ylabel="val loss at the final step")
        if off_scale:
            low = np.nanmin(means)
            ax.set_ylim(max(0.0, low - (top - low)), top)
        ax.legend(fontsize="small")
    axes[-1].set_xticks(range(len(formats)), formats, rotation=30 if len(formats) > 6 else 0)
    return fig
