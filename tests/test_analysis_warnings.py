"""Warning quality, threshold curves and failure order on a constructed results set: every number by hand."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from altgrad import analysis
from altgrad.analysis.signals import FALLS, RISES
from altgrad.diagnostics import RankTrendConfig, RankTrendDetector

# warm-up 0 and no EMA memory: the detector sees each value as it is, so its firings are plain to read.
CONFIG = json.dumps({"format": "E4M3", "optimizer": "adamw", "rank_trend": {"warmup_steps": 0, "ema_beta": 0.0}})
CHECKS = range(10, 201, 10)

# trial: (failed, onset, would-stop reason, would-stop step, critical stable rank: {from step: value})
TRIALS = {
    "A": (True, 100, "rank_collapse", 60, {50: 5.0}),  # rule in time (lead 40), signal in time (lead 50)
    "B": (True, 100, "rank_collapse", 120, {110: 3.0}),  # both only after the onset: late
    "C": (True, 50, "diverged", 80, {}),  # late rule, no signal
    "D": (False, None, "rank_collapse", 70, {}),  # a false alarm of the rule; its non-critical layer drops
    "E": (False, None, None, None, {}),  # healthy and quiet
    "F": (True, 200, "rank_collapse", 100, {}),  # rule in time (lead 100)
}


def _rank(drops: dict, step: int) -> float:
    return next((value for start, value in sorted(drops.items(), reverse=True) if step >= start), 10.0)


@pytest.fixture
def constructed():
    trials = pd.DataFrame([{"trial_id": t, "format": "E4M3", "optimizer": "adamw", "status": "completed",
                            "steps_completed": 200, "config": CONFIG, "failed": failed, "failure_step": onset,
                            "failure_kind": "divergence" if failed else None, "would_stop_reason": reason,
                            "would_stop_step": stop}
                           for t, (failed, onset, reason, stop, _) in TRIALS.items()])
    trials = trials.astype({"failure_step": "Int64", "would_stop_step": "Int64"})
    steps = pd.DataFrame([{"trial_id": t, "step": s, "train_loss": 2.0, "val_loss": None}
                          for t in TRIALS for s in range(1, 201)])
    layers = pd.DataFrame(
        [{"trial_id": t, "step": s, "layer": "h.0.attn.c_proj", "critical": True, "stable_rank": _rank(drops, s)}
         for t, (*_, drops) in TRIALS.items() for s in CHECKS]
        + [{"trial_id": t, "step": s, "layer": "h.0.mlp.c_fc", "critical": False,
            "stable_rank": 1.0 if t == "D" and s >= 30 else 10.0} for t in TRIALS for s in CHECKS])
    return analysis.Results("constructed", trials, steps, layers)


def test_warning_quality_by_hand(constructed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quality = analysis.warning_quality(constructed).set_index("rule")
    assert list(quality.index) == ["rule:rank_collapse", "rule:diverged", "rule:asha",
                                   "signal:stable_rank_fall", "signal:stable_rank_rise"]  # columns recorded
    collapse = quality.loc["rule:rank_collapse"]  # fired A B D F; in time A (40) and F (100); B late
    assert (collapse["n_fired"], collapse["n_in_time"], collapse["n_late"]) == (4, 2, 1)
    assert (collapse["precision"], collapse["recall"], collapse["false_alarm_rate"]) == (0.5, 0.5, 0.5)
    assert collapse["median_lead_steps"] == 70 and (collapse["n_failed"], collapse["n_healthy"]) == (4, 2)
    diverged = quality.loc["rule:diverged"]  # fired on C only, 30 steps after its onset
    assert (diverged["precision"], diverged["recall"], diverged["false_alarm_rate"], diverged["n_late"]) == (0, 0, 0, 1)
    assert pd.isna(diverged["median_lead_steps"])
    asha = quality.loc["rule:asha"]  # never fired: precision is 0/0
    assert pd.isna(asha["precision"]) and asha["recall"] == 0 and asha["n_fired"] == 0
    fall = quality.loc["signal:stable_rank_fall"]  # A at 50 (in time), B at 110 (late); D's drop is not critical
    assert (fall["threshold"], fall["n_fired"], fall["precision"], fall["recall"]) == (0.3, 2, 0.5, 0.25)
    assert (fall["false_alarm_rate"], fall["median_lead_steps"], fall["n_late"]) == (0, 50, 1)
    assert quality.loc["signal:stable_rank_rise", "n_fired"] == 0
    assert quality["precision"].dtype == "Float64"  # nulls, not NaN
    assert not np.isnan(quality["precision"].to_numpy(dtype=float, na_value=0.0)).any()


def test_warning_curve_sweeps_the_threshold(constructed):
    curve = analysis.warning_curve(constructed, "stable_rank_fall", thresholds=[0.2, 0.5, 0.6]).set_index("threshold")
    # A falls by 0.5 (10 -> 5), B by 0.7: the detector fires on a change strictly above the threshold.
    assert curve["n_fired"].tolist() == [2, 1, 1]
    assert curve["recall"].tolist() == [0.25, 0, 0] and curve["precision"].tolist() == [0.5, 0, 0]
    assert curve.loc[0.2, "median_lead_steps"] == 50 and pd.isna(curve.loc[0.5, "median_lead_steps"])
    default = analysis.warning_curve(constructed, "signal:stable_rank_fall")
    assert 0.3 in set(default["threshold"]) and len(default) > 3


def test_failure_order_lists_what_fired_before_each_onset(constructed):
    order = analysis.failure_order(constructed)
    rows = [tuple(r) for r in order[["trial_id", "signal", "first_fired_step", "steps_before_onset", "rank"]]
            .itertuples(index=False)]
    assert rows == [("A", "signal:stable_rank_fall", 50, 50, 1), ("A", "rule:rank_collapse", 60, 40, 2),
                    ("F", "rule:rank_collapse", 100, 100, 1)]  # B and C: nothing before the onset


def test_results_without_labels_are_labelled_from_their_train_loss():
    losses = [2.0] * 100 + [math.nan]  # a NaN at step 101 after a flat run: onset at 101
    steps = pd.DataFrame({"trial_id": "x", "step": range(1, 102), "train_loss": losses})
    trials = pd.DataFrame([{"trial_id": "x", "format": "E5M2", "optimizer": "adamw", "status": "stopped",
                            "steps_completed": 101}])
    results = analysis.Results("old", trials, steps, pd.DataFrame({"trial_id": [], "step": [], "layer": []}))
    assert not results.recorded("trials", "would_stop_step") and not results.recorded("trials", "failed")
    labels = analysis.failure_labels(results)
    assert labels.loc["x", ["failed", "failure_step", "failure_kind", "labelled_by"]].tolist() == [
        True, 101, "non_finite", "analysis"]
    assert analysis.warning_quality(results).empty  # no rule decisions and no signal recorded


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_offline_fall_detector_fires_exactly_where_the_online_one_warns(seed):
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.integers(1, 30, 60))
    values = 10 * np.exp(np.cumsum(rng.normal(-0.03, 0.08, 60)))
    values[rng.integers(0, 60, 4)] = np.nan  # skipped by both
    config = RankTrendConfig(warmup_steps=int(steps[10]) + 1, ema_beta=0.95, critical_drop_threshold=0.3)
    online = RankTrendDetector(config)
    warned = [online.update("lm_head", int(s), float(v)) for s, v in zip(steps, values)]
    change = analysis.relative_change(steps, values, FALLS, config.warmup_steps, config.ema_beta)
    assert any(warned)  # the series does collapse
    assert warned == [bool(c > 0.3) for c in np.nan_to_num(change, nan=0.0)]


def test_a_rising_signal_is_measured_from_its_floored_trough():
    steps = np.array([0, 10, 20, 30, 40])
    change = analysis.relative_change(steps, np.array([0.0, 0.0, 0.002, 0.004, 0.0]), RISES, 10, 0.0, floor=0.001)
    # warm-up skips step 0; trough 0 floored at 0.001: 0 / 0.001 - 1 = -1, then 1, 3, and back to -1.
    assert np.isnan(change[0]) and change[1:].tolist() == pytest.approx([-1, 1, 3, -1])


def test_the_report_shows_what_fails_first_and_the_warning_quality(constructed, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = analysis.write_report(constructed, tmp_path).read_text()
    fails_first = text.split("## What fails first")[1].split("\n## ")[0]
    assert "4 of 6 ended trials failed (divergence 4); the trainer's labels" in fails_first
    assert "(failure_order.png)" in fails_first and (tmp_path / "failure_order.png").stat().st_size > 0
    quality = text.split("## How good the warnings are")[1].split("\n## ")[0]
    assert "| rule:rank_collapse" in quality and "(warning_curves.png)" in quality
    assert (tmp_path / "warning_curves.png").stat().st_size > 0
