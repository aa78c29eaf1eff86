"""Failure labels on constructed loss series, each onset placed by hand."""

import math

import numpy as np
import pytest

from altgrad.failure import Failure, FailureRules, label_failure

STEPS = np.arange(1, 301)
BEST = 2.0


def _descent():
    """Falls from 4 to BEST by step 100, then flat: the shape of a healthy run."""
    return np.where(STEPS < 100, BEST + 2.0 * (100 - STEPS) / 99, BEST)


def test_a_flat_run_is_healthy():
    assert label_failure(STEPS, np.full(300, 3.0)) == Failure(False, None, None)


def test_a_noisy_descent_is_healthy():
    noise = np.random.default_rng(0).normal(0, 0.1, 300)  # 5% of the loss per batch
    assert label_failure(STEPS, _descent() + noise) == Failure(False, None, None)


def test_a_slow_rise_to_three_times_the_best_diverges_from_where_it_left_its_best():
    rise = np.where(STEPS <= 150, 0, (STEPS - 150) / 150 * 2 * BEST)  # best until 150, 3 × best at 300
    failure = label_failure(STEPS, _descent() + rise)
    assert failure.failed and failure.failure_kind == "divergence"
    # The trailing mean of 25 lags the rise: it passes 1.05 × best once the raw loss has risen 5% on average
    # over its window, i.e. when (s - 150)² / 2 > 0.05 × 25 × 150 / 2 … about 14 steps in.
    assert 150 < failure.failure_step <= 150 + 25


def test_a_nan_after_a_rise_is_non_finite_with_its_onset_at_the_rise():
    losses = _descent() + np.where(STEPS <= 100, 0, (STEPS - 100) * 0.02)  # +1% of best per step from 100
    losses[130:] = math.nan  # step 131 on
    failure = label_failure(STEPS, losses)
    assert failure.failed and failure.failure_kind == "non_finite"
    assert 100 < failure.failure_step < 125  # at the rise, not at the NaN (131)


def test_a_nan_at_the_best_loss_has_its_onset_at_the_nan():
    losses = _descent()
    losses[200] = math.inf
    assert label_failure(STEPS, losses) == Failure(True, 201, "non_finite")


def test_a_spike_that_recovers_is_healthy_and_one_that_stays_is_a_spike():
    recovered = _descent().copy()
    recovered[200:210] = 3 * BEST  # smoothed: (15 + 10 × 3) / 25 = 1.8 × best, below loss_factor
    assert label_failure(STEPS, recovered) == Failure(False, None, None)
    stays = _descent().copy()
    stays[249:] = 1.5 * BEST  # from step 250 on; smoothed ends at 1.5 × best > spike_factor 1.3
    failure = label_failure(STEPS, stays)
    assert failure.failure_kind == "spike"
    # The smoothed loss passes 1.05 × best when 0.5 × best × k / 25 > 0.05 × best: at the 3rd step of the jump.
    assert failure.failure_step == 252


def test_a_run_stopped_early_and_healthy_so_far_is_not_failed():
    assert label_failure(STEPS[:120], _descent()[:120]) == Failure(False, None, None)
    assert label_failure([], []) == Failure(False, None, None)


def test_the_rules_change_the_label():
    stays = _descent().copy()
    stays[249:] = 1.5 * BEST
    assert not label_failure(STEPS, stays, FailureRules(spike_factor=1.6)).failed
    assert label_failure(STEPS, stays, FailureRules(loss_factor=1.4)).failure_kind == "divergence"


@pytest.mark.parametrize("key, value", [("window", 0), ("window", 2.5), ("loss_factor", 1.0),
                                        ("spike_factor", 0.9), ("onset_tolerance", -0.1),
                                        ("onset_tolerance", 0.5), ("loss_factor", math.nan), ("window", "25")])
def test_bad_rules_are_a_value_error_naming_key_and_value(key, value):
    with pytest.raises(ValueError) as error:
        FailureRules(**{key: value})
    assert f"{key} must" in str(error.value) and str(error.value).endswith(f"got {value!r}")


def test_mismatched_lengths_are_a_value_error():
    with pytest.raises(ValueError, match="3 steps but 2 losses"):
        label_failure([1, 2, 3], [1.0, 2.0])
