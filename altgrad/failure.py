"""Whether a run failed, when the failure began, and how: labels fixed before the run, from its loss alone.

A warning signal is only worth something if it fires *before* a failure, so the failure needs a date that
does not depend on the signals: :func:`label_failure` reads the train-loss series and nothing else. The
date is the onset, the step the loss left its best for good, not the step the failure became obvious (a
NaN, a loss at twice its best), so that a warning is credited with the lead it actually gave.

The loss is smoothed by a trailing mean (one noisy batch is not a failure). Kinds, checked in this order:

* ``"non_finite"``: some loss is NaN or infinite;
* ``"divergence"``: the smoothed loss exceeds ``loss_factor`` × its running best;
* ``"spike"``: at the run's end the smoothed loss is still above ``spike_factor`` × its best (a spike that
  recovers is healthy).

A run stopped early that is healthy so far is not failed: the labels judge the steps that exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class FailureRules:
    """The knobs of :func:`label_failure`; a sweep file writes them down before the runs."""

    window: int = 25  # steps in the trailing mean that smooths the train loss
    loss_factor: float = 2.0  # divergence: smoothed loss above this × its running best
    spike_factor: float = 1.3  # unrecovered spike: smoothed loss at the end above this × its best
    onset_tolerance: float = 0.05  # the onset follows the last step within (1 + this) × the running best

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"failure rules: {field.name} must be a finite number, got {value!r}")
        limits = {"window": (self.window >= 1 and float(self.window).is_integer(), "an integer >= 1"),
                  "loss_factor": (self.loss_factor > 1, "> 1"), "spike_factor": (self.spike_factor > 1, "> 1"),
                  "onset_tolerance": (0 <= self.onset_tolerance < self.spike_factor - 1,
                                      "in [0, spike_factor - 1)")}
        for key, (ok, limit) in limits.items():
            if not ok:
                raise ValueError(f"failure rules: {key} must be {limit}, got {getattr(self, key)!r}")


class Failure(NamedTuple):
    failed: bool
    failure_step: int | None  # the onset; None for a healthy run
    failure_kind: str | None  # "non_finite" | "divergence" | "spike"; None for a healthy run


HEALTHY = Failure(False, None, None)


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start): O(n) by a cumulative sum."""
    total = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (total[ends] - total[starts]) / (ends - starts)


def label_failure(steps: Sequence[int], losses: Sequence[float], rules: FailureRules = FailureRules()) -> Failure:
    """The failure label of one run from its train losses at ``steps`` (increasing). O(len(steps)).

    A null loss counts as non-finite: a loss that was not computed is no sign of health."""
    steps = np.asarray(steps, dtype=np.int64)
    losses = np.array([math.nan if loss is None or loss != loss else loss for loss in losses], dtype=float)
    if len(steps) != len(losses):
        raise ValueError(f"label_failure: {len(steps)} steps but {len(losses)} losses")
    if not len(steps):
        return HEALTHY
    bad = np.flatnonzero(~np.isfinite(losses))
    end = int(bad[0]) if len(bad) else len(losses)  # the finite prefix; a NaN's index is its trigger
    smoothed = _trailing_mean(losses[:end], rules.window)
    best = np.minimum.accumulate(smoothed)
    if len(bad):
        kind, trigger = "non_finite", end
    else:
        above = np.flatnonzero(smoothed > rules.loss_factor * best)
        if len(above):
            kind, trigger = "divergence", int(above[0])
        elif smoothed[-1] > rules.spike_factor * best[-1]:
            kind, trigger = "spike", len(smoothed) - 1
        else:
            return HEALTHY
    near_best = np.flatnonzero(smoothed[:trigger] <= (1 + rules.onset_tolerance) * best[:trigger])
    onset = int(near_best[-1]) + 1 if len(near_best) else 0
    return Failure(True, int(steps[onset]), kind)
