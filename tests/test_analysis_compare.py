"""Matched-step comparisons, intervals and best learning rates on a constructed results set, by hand."""

import json
import re

import pandas as pd
import pytest

from altgrad import analysis

T1, T2 = 12.7062047, 4.30265273  # Student t 97.5% quantiles, 1 and 2 degrees of freedom (from a table)

# trial: (optimizer, lr, ulp_lr, seed, val losses at steps 100, 200, 300; fewer = stopped there)
TRIALS = {
    "X0": ("adamw", 1e-3, 0.5, 0, [3.0, 2.0, 1.8]), "X1": ("adamw", 1e-3, 0.5, 1, [3.0, 2.2, 2.0]),
    "Y0": ("adamw", 1e-2, 0.5, 0, [2.8, 2.5, 2.4]), "Y1": ("adamw", 1e-2, 0.5, 1, [2.8, 2.7]),
    "G0": ("grid", 1e-3, 0.5, 0, [3.0, 1.9, 1.7]), "G1": ("grid", 1e-3, 0.5, 1, [3.0, 2.1, 1.9]),
    "H0": ("grid", 1e-3, 1.0, 0, [3.0, 2.5, 2.5]), "H1": ("grid", 1e-3, 1.0, 1, [3.0, 2.5, 2.5]),
}


@pytest.fixture
def constructed():
    trials, steps = [], []
    for trial_id, (optimizer, lr, ulp_lr, seed, vals) in TRIALS.items():
        config = {"format": "E4M3", "optimizer": optimizer, "lr": lr, "ulp_lr": ulp_lr, "seed": seed,
                  "name": trial_id, "rank_trend": {"warmup_steps": 200}}
        reached = 100 * len(vals)
        trials.append({"trial_id": trial_id, "format": "E4M3", "optimizer": optimizer, "lr": lr, "ulp_lr": ulp_lr,
                       "seed": seed, "status": "completed" if reached == 300 else "stopped",
                       "steps_completed": reached, "steps_planned": 300, "best_val_loss": min(vals),
                       "config": json.dumps(config)})
        steps += [{"trial_id": trial_id, "step": s, "train_loss": 2.0,
                   "val_loss": vals[s // 100 - 1] if s % 100 == 0 else None} for s in range(50, reached + 1, 50)]
    return analysis.Results("constructed", pd.DataFrame(trials), pd.DataFrame(steps),
                            pd.DataFrame({"trial_id": [], "step": [], "layer": []}))


def _cell(table, step, optimizer, lr, ulp_lr):
    rows = table[table["step"].eq(step) & table["optimizer"].eq(optimizer) & table["lr"].eq(lr)
                 & table["ulp_lr"].eq(ulp_lr)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_every_axis_but_the_seed_keeps_cells_apart(constructed):
    assert analysis.cell_keys(constructed.trials) == ["format", "optimizer", "lr", "ulp_lr"]  # not seed, name
    cells = analysis.format_optimizer_table(constructed)
    adamw = cells[cells["optimizer"].eq("adamw")].set_index("lr")
    assert adamw["n_seeds"].to_dict() == {1e-3: 2, 1e-2: 2}  # two lrs never pool into one "4 seeds" row
    assert adamw.loc[1e-3, "best_val_loss_mean"] == pytest.approx(1.9)


def test_matched_comparison_by_hand(constructed):
    table = analysis.matched_comparison(constructed)
    assert sorted(table["step"].unique()) == [200, 300]  # the final step and the step Y1 stopped at
    x, y = _cell(table, 200, "adamw", 1e-3, 0.5), _cell(table, 200, "adamw", 1e-2, 0.5)
    assert x["val_loss_mean"] == pytest.approx(2.1) and x["n_seeds"] == 2
    assert (x["val_loss_ci_low"], x["val_loss_ci_high"]) == pytest.approx((2.1 - T1 * 0.1, 2.1 + T1 * 0.1))
    assert y["stopped_here"] and y["stopped_trials"] == "Y1" and not x["stopped_here"]
    assert (y["val_loss_mean"], y["rank"], y["n_cells"]) == (pytest.approx(2.6), 4, 4)  # G 2.0, X 2.1, H 2.5
    h = _cell(table, 200, "grid", 1e-3, 1.0)
    assert (h["val_loss_ci_low"], h["val_loss_ci_high"]) == pytest.approx((2.5, 2.5))  # no spread: zero width
    y_final = _cell(table, 300, "adamw", 1e-2, 0.5)  # only Y0 reached 300: one seed, no interval (null)
    assert y_final["n_seeds"] == 1 and y_final["val_loss_mean"] == pytest.approx(2.4)
    assert pd.isna(y_final["val_loss_ci_low"]) and pd.isna(y_final["val_loss_ci_high"])
    assert table["val_loss_ci_low"].dtype == "Float64"


def test_matched_comparison_at_a_given_step_uses_the_last_evaluation_by_then(constructed):
    table = analysis.matched_comparison(constructed, step=250)
    assert set(table["step"]) == {250}
    assert _cell(table, 250, "grid", 1e-3, 0.5)["val_loss_mean"] == pytest.approx(2.0)  # the evaluations at 200
    assert _cell(table, 250, "adamw", 1e-2, 0.5)["n_seeds"] == 1  # Y1 stopped at 200: it did not reach 250


def test_each_optimizer_at_its_best_learning_rate(constructed):
    best = analysis.best_split(constructed).set_index("optimizer")
    assert best.loc["adamw", "lr_chosen"] == 1e-3 and best.loc["grid", "lr_chosen"] == 0.5  # lr vs ulp_lr
    assert best.loc["grid", "val_loss_mean"] == pytest.approx(1.8) and best.loc["grid", "step"] == 300


def test_benefit_is_a_welch_interval_at_the_matched_step(constructed):
    (row,) = analysis.benefit_table(constructed).to_dict("records")
    assert (row["optimizer"], row["adamw lr"], row["ulp_lr"], row["step"], row["at_final_step"]) == (
        "grid", 1e-3, 0.5, 300, True)
    # grid (1.7, 1.9) - adamw (1.8, 2.0): -0.1; se = sqrt(0.02/2 + 0.02/2), Welch df = 2.
    se = 0.02 ** 0.5
    assert row["difference"] == pytest.approx(-0.1)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((-0.1 - T2 * se, -0.1 + T2 * se))


def test_intervals_are_null_for_fewer_than_two_values():
    assert analysis.t_interval([2.0]) == (2.0, None, None, 1)
    assert analysis.t_interval([]) == (None, None, None, 0)
    assert analysis.t_interval([1.0, float("nan"), None, 3.0])[0] == 2.0  # non-finite and null left out
    assert analysis.welch_interval([1.0], [2.0, 3.0]) == (-1.5, None, None)


def test_the_report_answers_in_order_on_constructed_results(constructed, tmp_path):
    text = analysis.write_report(constructed, tmp_path).read_text()
    sections = re.findall(r"^## (.*)$", text, re.MULTILINE)
    assert sections[:4] == ["The best split per optimizer", "Where the ULP optimizers help (against adamw)",
                            "What fails first", "How good the warnings are"]
    assert "Stopped trials against the others at the step they reached" in text
    warnings_section = text.split("## How good the warnings are")[1].split("\n## ")[0]
    assert "Not recorded in these results" in warnings_section
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
