"""Early stopping driven by the trainer's own diagnostics."""

from __future__ import annotations

import math
from typing import Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

RANK_COLLAPSE, DIVERGED, ASHA = "rank_collapse", "diverged", "asha"
RANK_COLLAPSE_PROTECTED = "rank_collapse (protected)"  # the rule fired, and the trial protected its layers
MODES = ("act", "observe")
ACTIONS = ("stop", "protect")


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
        action: ``"stop"`` acts on a rank collapse as ``mode`` says; ``"protect"`` never stops for it: the
            trials protect their warned layers themselves (``protection.trigger: rank_warning``, which the
            sweep file sets in every cell), and the decision is recorded as ``"rank_collapse (protected)"``.
        loss_factor: STOP when ``train_loss`` is NaN or infinite, or above ``loss_factor`` times the
            lowest train loss the trial has reported (``"diverged"``). A missing loss decides nothing.
        asha: an optional ASHAScheduler (on val loss) asked, at reports that carry a val loss, about
            trials these rules let continue (``"asha"``). It compares trials across the whole sweep:
            in a study of which formats fail, keep it off (it stops exactly the cells in question).
        mode: ``"act"`` stops trials; ``"observe"`` decides the same way and lets them run, so that a
            sweep measures how well the rules predict failure. A non-finite loss ends the trial in both.
        on_decision: called with ``(trial_id, reason, result, acted)`` at each decision to stop,
            whether or not it was acted on, so the decision can be kept where Ray saves state.

    A report at a step already judged (a trial replaying from an older checkpoint after a restart)
    decides nothing: the decision on it was taken. Ray restores no scheduler state when a sweep
    resumes (ray-project/ray#30838), so the driver saves :meth:`get_state` with the experiment.
    """

    def __init__(self, patience: int = 2, loss_factor: float = 4.0, asha: ASHAScheduler | None = None,
                 mode: str = "act", on_decision: Callable[[str, str, dict, bool], None] | None = None,
                 action: str = "stop"):
        super().__init__()
        if patience < 1 or loss_factor <= 1:
            raise ValueError(f"patience must be >= 1 and loss_factor > 1, got {patience} and {loss_factor}")
        if mode not in MODES or action not in ACTIONS:
            raise ValueError(f"mode must be one of {', '.join(MODES)} and action one of {', '.join(ACTIONS)}, "
                             f"got {mode!r} and {action!r}")
        self.patience, self.loss_factor, self.asha, self.mode = patience, loss_factor, asha, mode
        self.action = action
        self.on_decision = on_decision
        self._streak: dict[str, int] = {}
        self._best_loss: dict[str, float] = {}
        self._last_check: dict[str, object] = {}
        self._last_step: dict[str, float] = {}
        self._unended: dict = {}  # the trials not ended, in the order they were added (a dict as an ordered set)

    def get_state(self) -> dict:
        """Its memory of every live trial (streaks, best losses, last rank check and step, ASHA's rungs)."""
        return {"streak": dict(self._streak), "best_loss": dict(self._best_loss),
                "last_check": dict(self._last_check), "last_step": dict(self._last_step),
                "asha": dict(vars(self.asha)) if self.asha else None}

    def set_state(self, state: dict) -> None:
        self._streak.update(state.get("streak", {}))
        self._best_loss.update(state.get("best_loss", {}))
        self._last_check.update(state.get("last_check", {}))
        self._last_step.update(state.get("last_step", {}))
        if self.asha and state.get("asha"):
            vars(self.asha).update(state["asha"])  # as ASHAScheduler.restore does with its own file

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.asha.set_search_properties(metric, mode, **spec) if self.asha else True

    def on_trial_add(self, tune_controller, trial) -> None:
        self._unended.pop(trial, None)  # a retried trial is added again, last in Tune's order as in FIFO's
        self._unended[trial] = None
        if self.asha:
            self.asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        step = _number(result.get("step"))
        if step is not None:
            if step <= self._last_step.get(trial.trial_id, -math.inf):
                return TrialScheduler.CONTINUE  # a replay of a report already judged
            self._last_step[trial.trial_id] = step
        reason = self.stop_reason(trial.trial_id, result)
        if (reason is None and self.asha and _number(result.get("val_loss")) is not None
                and self.asha.on_trial_result(tune_controller, trial, result) == self.STOP):
            reason = ASHA
        if reason is None:
            return TrialScheduler.CONTINUE
        loss = _number(result.get("train_loss"))
        acted = reason != RANK_COLLAPSE_PROTECTED and (self.mode == "act" or (loss is not None
                                                                         and not math.isfinite(loss)))
        if self.on_decision:
            self.on_decision(trial.trial_id, reason, result, acted)
        return TrialScheduler.STOP if acted else TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller):
        """The first pending trial in the sweep's order, else the first paused one: FIFO's choice. FIFO
        scans every trial of the sweep at each step of Tune's loop, ended ones included (a cost quadratic
        in the sweep's size); this scans the trials not yet ended, dropping those that have."""
        for trial in [t for t in self._unended if t.is_finished()]:
            del self._unended[trial]
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in self._unended:
                if trial.status == status:
                    return trial
        return None

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
                return RANK_COLLAPSE_PROTECTED if self.action == "protect" else RANK_COLLAPSE
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
        self._last_step.pop(trial_id, None)

    def debug_string(self) -> str:
        return (f"RankCollapseScheduler(patience={self.patience}, loss_factor={self.loss_factor}, "
                f"asha={bool(self.asha)}, mode={self.mode}, action={self.action})")
