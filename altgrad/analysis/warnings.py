"""How good the warnings are: each stopping rule and each signal against the failure labels.

Over the trials that have ended: a rule or signal *fired* when it fired at some step of the trial; the
firing is *in time* when it came before the failure's onset (``failure_step``), and its lead is the steps
between them. A firing at or after the onset warned no one: it is a miss for recall, counted apart as
``n_late``. precision = in-time firings on failed trials / trials fired; recall = failed trials with an
in-time firing / failed trials; false_alarm_rate = healthy trials that fired / healthy trials. A ratio
with nothing to divide by is null.

Rules are the scheduler's decisions (``would_stop_step``, ``would_stop_reason``: what it stopped, or in
observe mode would have stopped); signals are replayed offline (:mod:`altgrad.analysis.signals`).
"""

from __future__ import annotations

import pandas as pd

from altgrad.analysis.signals import SIGNALS, Signal, available, firing_steps
from altgrad.analysis.tables import Results, nullable
from altgrad.failure import FailureRules, label_failure

RULES = ("rank_collapse", "diverged", "asha")  # the scheduler's stop reasons
LABELS = ("failed", "failure_step", "failure_kind")


def failure_labels(results: Results, rules: FailureRules = FailureRules()) -> pd.DataFrame:
    """Per ended trial (index trial_id): failed, failure_step, failure_kind, and ``labelled_by``: "trainer"
    where the trial recorded its labels (by the sweep's rules), else "analysis" (``rules`` applied to its
    steps' train loss, for results written before the trainer labelled runs)."""
    trials = results.trials[~results.trials["status"].eq("running")].set_index("trial_id")
    labels = trials[list(LABELS)].astype({"failed": "boolean", "failure_step": "Int64", "failure_kind": "object"})
    labels["labelled_by"] = "trainer"
    unlabelled = labels.index[labels["failed"].isna()]
    by_trial = dict(tuple(results.steps[results.steps["trial_id"].isin(unlabelled)].groupby("trial_id")))
    for trial_id in unlabelled:
        own = by_trial.get(trial_id, results.steps.iloc[:0]).sort_values("step")
        failure = label_failure(own["step"].to_numpy(), own["train_loss"].tolist(), rules)
        labels.loc[trial_id, [*LABELS, "labelled_by"]] = [*failure, "analysis"]
    return labels


def quality(first: pd.Series, labels: pd.DataFrame) -> dict:
    """The row of one rule or signal from its first firing step per trial (null: never fired)."""
    first = first.reindex(labels.index)
    failed = labels["failed"].astype(bool)
    fired = first.notna()
    in_time = fired & failed & (first < labels["failure_step"]).fillna(False).astype(bool)
    n_failed, n_healthy, n_fired = int(failed.sum()), int((~failed).sum()), int(fired.sum())
    lead = (labels["failure_step"] - first)[in_time]

    def ratio(a, b):
        return a / b if b else None

    return {"precision": ratio(int(in_time.sum()), n_fired), "recall": ratio(int(in_time.sum()), n_failed),
            "false_alarm_rate": ratio(int((fired & ~failed).sum()), n_healthy),
            "median_lead_steps": float(lead.median()) if len(lead) else None,
            "n_failed": n_failed, "n_healthy": n_healthy, "n_fired": n_fired,
            "n_in_time": int(in_time.sum()), "n_late": int((fired & failed & ~in_time).sum())}


_FLOATS = ("precision", "recall", "false_alarm_rate", "median_lead_steps", "threshold")


def _table(rows: list[dict]) -> pd.DataFrame:
    return nullable(pd.DataFrame(rows).astype({c: "Float64" for c in _FLOATS if rows and c in rows[0]}))


def rule_firings(results: Results) -> dict[str, pd.Series]:
    """Per stop reason, the step it stopped (or would have stopped) each trial; {} where not recorded."""
    if not results.recorded("trials", "would_stop_step"):
        return {}
    trials = results.trials.set_index("trial_id")
    reasons = list(dict.fromkeys([*RULES, *trials["would_stop_reason"].dropna()]))
    step = pd.to_numeric(trials["would_stop_step"], errors="coerce").astype("Int64")
    return {f"rule:{r}": step.where(trials["would_stop_reason"].eq(r).fillna(False).astype(bool)) for r in reasons}


def signal_firings(results: Results) -> dict[str, tuple[Signal, pd.Series]]:
    """Per recorded signal, its first firing step per trial at its default threshold."""
    return {f"signal:{s.name}": (s, firing_steps(results, s, [s.threshold])[s.threshold])
            for s in SIGNALS.values() if available(results, s)}


def warning_quality(results: Results, rules: FailureRules = FailureRules()) -> pd.DataFrame:
    """One row per stopping rule ("rule:<stop reason>") and recorded signal ("signal:<name>", at its
    default ``threshold``): precision, recall, false_alarm_rate, median_lead_steps, n_failed, n_healthy,
    n_fired, n_in_time, n_late (see the module docstring)."""
    labels = failure_labels(results, rules)
    rows = [{"rule": name, "threshold": None, **quality(first, labels)}
            for name, first in rule_firings(results).items()]
    rows += [{"rule": name, "threshold": signal.threshold, **quality(first, labels)}
             for name, (signal, first) in signal_firings(results).items()]
    return _table(rows) if rows else pd.DataFrame(columns=["rule", "threshold", "precision", "recall"])


def warning_curve(results: Results, signal: str | Signal, thresholds=None,
                  rules: FailureRules = FailureRules()) -> pd.DataFrame:
    """The threshold sweep behind a signal's row: threshold, recall, false_alarm_rate, precision,
    median_lead_steps (and the counts), one row per threshold (the signal's own grid by default)."""
    signal = SIGNALS[signal.removeprefix("signal:")] if isinstance(signal, str) else signal
    thresholds = list(signal.thresholds if thresholds is None else thresholds)
    labels = failure_labels(results, rules)
    fired = firing_steps(results, signal, thresholds)
    return _table([{"threshold": t, **quality(fired[t], labels)} for t in thresholds])


def failure_order(results: Results, rules: FailureRules = FailureRules()) -> pd.DataFrame:
    """For each failed trial, the rules and signals that fired before its onset, in order: trial_id,
    signal, first_fired_step, steps_before_onset, rank (1 = fired first; ties share a rank)."""
    labels = failure_labels(results, rules)
    failed = labels[labels["failed"].astype(bool)]
    firings = rule_firings(results) | {name: first for name, (_, first) in signal_firings(results).items()}
    rows = []
    for trial_id, label in failed.iterrows():
        for name, first in firings.items():
            step = first.get(trial_id, pd.NA)
            if pd.notna(step) and step < label["failure_step"]:
                rows.append({"trial_id": trial_id, "signal": name, "first_fired_step": int(step),
                             "steps_before_onset": int(label["failure_step"] - step)})
    columns = ["trial_id", "signal", "first_fired_step", "steps_before_onset", "rank"]
    if not rows:
        return pd.DataFrame(columns=columns)
    order = pd.DataFrame(rows).sort_values(["trial_id", "first_fired_step", "signal"], ignore_index=True)
    order["rank"] = order.groupby("trial_id")["first_fired_step"].rank(method="min").astype("Int64")
    return order[columns]
