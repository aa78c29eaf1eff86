"""Early stopping driven by the trainer's own diagnostics."""

from __future__ import annotations

import math
from typing import Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

RANK_COLLAPSE, DIVERGED, ASHA = "rank_collapse", "diverged", "asha"


def _number(value) -> float | None:
    """A reported metric as a float, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class RankCollapseScheduler(FIFOScheduler):
    """Stops a trial whose critical layers keep warning of rank collapse, or whose loss diverges.

    Each report of a trial carries ``rank_warnings`` (critical layers warning now) and ``train_loss``.

    Args:
        patience: STOP after this many consecutive rank checks with ``rank_warnings > 0`` (stop reason
            ``"rank_collapse"``). Reports between two checks repeat the last one's warnings; when they
            carry ``rank_check_step``, a repeat is not counted twice. A report without the metric
            neither counts nor resets.
        loss_factor: STOP when ``train_loss`` is NaN or infinite, or above ``loss_factor`` times the
            lowest train loss the trial has reported (``"diverged"``). A missing loss decides nothing.
        asha: an optional ASHAScheduler (on val loss) asked about trials these rules let continue
            (``"asha"``).
        on_stop: called with ``(trial_id, reason, result)`` at each STOP, so the reason can be kept
            where Ray saves state (a scheduler's own state is not saved across a driver restart).
    """

    def __init__(self, patience: int = 2, loss_factor: float = 4.0, asha: ASHAScheduler | None = None,
                 on_stop: Callable[[str, str, dict], None] | None = None):
        super().__init__()
        if patience < 1 or loss_factor <= 1:
            raise ValueError(f"patience must be >= 1 and loss_factor > 1, got {patience} and {loss_factor}")
        self.patience, self.loss_factor, self.asha, self.on_stop = patience, loss_factor, asha, on_stop
        self._streak: dict[str, int] = {}
        self._best_loss: dict[str, float] = {}
        self._last_check: dict[str, object] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.asha.set_search_properties(metric, mode, **spec) if self.asha else True

    def on_trial_add(self, tune_controller, trial) -> None:
        if self.asha:
            self.asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        reason = self.stop_reason(trial.trial_id, result)
        if reason is None and self.asha and self.asha.on_trial_result(tune_controller, trial, result) == self.STOP:
            reason = ASHA
        if reason is None:
            return TrialScheduler.CONTINUE
        if self.on_stop:
            self.on_stop(trial.trial_id, reason, result)
        return TrialScheduler.STOP

    def stop_reason(self, trial_id: str, result: dict) -> str | None:
        """This rule's verdict on one report (and its memory of the trial's earlier ones)."""
        loss = _number(result.get("train_loss"))
        if loss is not None:
            if not math.isfinite(loss) or loss > self.loss_factor * self._best_loss.get(trial_id, math.inf):
                return DIVERGED
            self._best_loss[trial_id] = min(loss, self._best_loss.get(trial_id, math.inf))
        warnings = _number(result.get("rank_warnings"))
        check = result.get("rank_check_step")
        if check is not None and self._last_check.get(trial_id) == check:
            return None  # the same rank check as the previous report
        self._last_check[trial_id] = check
        if warnings is not None and math.isfinite(warnings):
            self._streak[trial_id] = self._streak.get(trial_id, 0) + 1 if warnings > 0 else 0
            if self._streak[trial_id] >= self.patience:
                return RANK_COLLAPSE
        return None

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._forget(trial.trial_id)
        if self.asha:
            self.asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._forget(trial.trial_id)
        if self.asha:
            self.asha.on_trial_remove(tune_controller, trial)

    def _forget(self, trial_id: str) -> None:
        self._streak.pop(trial_id, None)
        self._best_loss.pop(trial_id, None)
        self._last_check.pop(trial_id, None)

    def debug_string(self) -> str:
        return f"RankCollapseScheduler(patience={self.patience}, loss_factor={self.loss_factor}, asha={bool(self.asha)})"
