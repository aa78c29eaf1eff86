"""Candidate early-warning signals, replayed offline from the steps and layers tables.

Each signal is one registered :class:`Signal`: a column of a table, the direction that means trouble
(ranks fall; norms, outliers, bursts rise), which layers count, and a threshold on the relative change
from the signal's own reference after warm-up. The detector is :class:`altgrad.diagnostics.
RankTrendDetector`'s, in both directions: an EMA with decay ``rank_trend.ema_beta`` per training step
starts at the first finite value at or after ``rank_trend.warmup_steps`` (both from the trial's config);
a falling signal is measured against the EMA's running peak (``1 - ema / peak``), a rising one against
its running trough (``ema / trough - 1``, the trough floored at ``floor`` so that a fraction that starts
at zero does not make every rise infinite). A signal fires at the first step where that change exceeds
the threshold in any counted layer.

:func:`firing_steps` replays every threshold of a sweep in one pass: the running maximum of a trial's
change is monotone, so the first step past each threshold is a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from altgrad.analysis.tables import Results, is_true, rank_trend, trial_config

FALLS, RISES = "falls", "rises"
_FALL_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_RISE_THRESHOLDS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 9.0)


@dataclass(frozen=True)
class Signal:
    """One candidate warning: ``table``.``column`` moving in ``direction`` by more than ``threshold``."""

    name: str
    table: str  # "layers" (one series per layer) or "steps" (one per trial)
    column: str
    direction: str  # FALLS or RISES
    threshold: float  # the default: relative change that fires it
    critical_only: bool = False  # layers signals: only layers flagged critical count
    floor: float = 0.0  # RISES: the reference never counts as lower than this
    what: str = ""

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The sweep behind :func:`~altgrad.analysis.warnings.warning_curve`, the default included."""
        grid = _FALL_THRESHOLDS if self.direction == FALLS else _RISE_THRESHOLDS
        return tuple(sorted({*grid, self.threshold}))


SIGNALS: dict[str, Signal] = {}


def register(signal: Signal) -> Signal:
    if signal.name in SIGNALS:
        raise ValueError(f"signal {signal.name!r} is registered twice")
    if signal.direction not in (FALLS, RISES) or signal.table not in ("steps", "layers"):
        raise ValueError(f"signal {signal.name!r}: bad direction {signal.direction!r} or table {signal.table!r}")
    SIGNALS[signal.name] = signal
    return signal


for _rank in ("stable_rank", "effective_rank"):
    for _weight, _prefix in (("quantized weight (what the forward sees)", ""), ("fp32 master weight", "master_")):
        register(Signal(f"{_prefix}{_rank}_fall", "layers", f"{_prefix}{_rank}", FALLS, 0.3, critical_only=True,
                        what=f"{_rank.replace('_', ' ')} of the {_weight} falls, critical layers"))
        register(Signal(f"{_prefix}{_rank}_rise", "layers", f"{_prefix}{_rank}", RISES, 0.5, critical_only=True,
                        what=f"{_rank.replace('_', ' ')} of the {_weight} rises, critical layers"))
register(Signal("spectral_norm_rise", "layers", "spectral_norm", RISES, 1.0, what="spectral norm grows, any layer"))
register(Signal("master_spectral_norm_rise", "layers", "master_spectral_norm", RISES, 1.0,
                what="spectral norm of the master weight grows, any layer"))
for _tensor in ("weight", "input"):
    register(Signal(f"{_tensor}_amax_rise", "layers", f"{_tensor}_amax", RISES, 1.0,
                    what=f"largest |{_tensor}| grows (outliers), any layer"))
    register(Signal(f"{_tensor}_kurtosis_rise", "layers", f"{_tensor}_kurtosis", RISES, 1.0,
                    what=f"{_tensor} kurtosis grows (heavy tails), any layer"))
register(Signal("layer_grad_norm_rise", "layers", "grad_norm", RISES, 2.0, what="a layer's gradient norm grows"))
register(Signal("adam_ratio_rise", "layers", "adam_ratio", RISES, 1.0,
            what="g² / v̂ grows: Adam's second moment under-estimates the gradient, any layer"))
register(Signal("grad_norm_rise", "steps", "grad_norm", RISES, 2.0, what="global gradient norm grows"))
register(Signal("overflow_burst", "steps", "overflow_frac", RISES, 4.0, floor=1e-4,
                what="share of quantized values beyond the format's range rises"))
register(Signal("underflow_burst", "steps", "underflow_frac", RISES, 1.0, floor=1e-3,
                what="share of quantized values flushed to zero rises"))
register(Signal("stall_ratio_rise", "steps", "stall_ratio", RISES, 0.25, floor=0.01,
                what="share of updates lost to rounding rises"))


def relative_change(steps: np.ndarray, values: np.ndarray, direction: str, warmup: int, beta: float,
                    floor: float = 0.0) -> np.ndarray:
    """The detector's relative change at each step of one series (NaN where it does not look: warm-up,
    non-finite values). Mirrors RankTrendDetector.update: the EMA's decay counts steps since the last
    finite value, warm-up values included."""
    change = np.full(len(values), np.nan)
    ema = reference = None
    last = None
    for i, (step, value) in enumerate(zip(steps, values)):
        if not np.isfinite(value):
            continue
        if step >= warmup:
            if ema is None:
                ema = reference = value
            else:
                keep = beta ** (step - last)
                ema = keep * ema + (1 - keep) * value
                reference = max(reference, ema) if direction == FALLS else min(reference, ema)
            if direction == FALLS:
                change[i] = 1 - ema / reference if reference > 0 else 0.0
            else:
                base = max(reference, floor)
                change[i] = ema / base - 1 if base > 0 else (np.inf if ema > base else 0.0)
        last = step
    return change


def _trial_settings(results: Results) -> dict[str, tuple[int, float]]:
    settings = {}
    for trial_id, config in zip(results.trials["trial_id"], results.trials["config"]):
        trend = rank_trend(trial_config(config))
        settings[trial_id] = (trend.warmup_steps, trend.ema_beta)
    return settings


def available(results: Results, signal: Signal) -> bool:
    """Whether these results recorded the signal's column with any value."""
    return results.recorded(signal.table, signal.column) and getattr(results, signal.table)[signal.column].notna().any()


def firing_steps(results: Results, signal: Signal, thresholds) -> pd.DataFrame:
    """First step each trial's signal fired at each threshold: index trial_id (every trial of
    ``results.trials``), one nullable Int64 column per threshold, null where it never fired."""
    thresholds = list(thresholds)
    index = pd.Index(results.trials["trial_id"], name="trial_id")
    fired = pd.DataFrame({t: pd.Series(pd.NA, index=index, dtype="Int64") for t in thresholds})
    if not available(results, signal):
        return fired
    frame = getattr(results, signal.table)
    if signal.table == "layers" and signal.critical_only:
        frame = frame[is_true(frame["critical"])]
    series_keys = ["trial_id", "layer"] if signal.table == "layers" else ["trial_id"]
    settings = _trial_settings(results)
    for trial_id, own in frame.groupby("trial_id", sort=False):
        if trial_id not in settings:
            continue
        warmup, beta = settings[trial_id]
        changes = []
        for _, series in own.sort_values("step").groupby(series_keys[1:] or (lambda _: 0), sort=False):
            values = pd.to_numeric(series[signal.column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            change = relative_change(series["step"].to_numpy(), values, signal.direction, warmup, beta, signal.floor)
            changes.append(pd.Series(change, index=series["step"].to_numpy()))
        worst = pd.concat(changes, axis=1).max(axis=1).sort_index()  # the most-changed counted layer, per step
        running = np.fmax.accumulate(worst.fillna(-np.inf).to_numpy())
        for t in thresholds:
            first = np.searchsorted(running, t, side="right")  # first index where running > t
            if first < len(running):
                fired.loc[trial_id, t] = int(worst.index[first])
    return fired
