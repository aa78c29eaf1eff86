"""Which split is best per tensor and in blocks: the granularity table on a constructed results set, by hand."""

import json

import pandas as pd
import pytest

from altgrad import analysis
from altgrad.analysis.granularity import granularity_table, has_granularities, plot_granularity

T1 = 12.7062047  # Student t 97.5% quantile, 1 degree of freedom (from a table)

# (format, granularity): final val losses of seeds 0 and 1 (at step 200, the sweep's last)
FINALS = {("E4M3", "tensor"): (2.0, 2.2), ("E4M3", "block"): (2.1, 2.3),
          ("E2M5", "tensor"): (2.5, 2.7), ("E2M5", "block"): (1.9, 2.1)}


def _results(finals=FINALS):
    trials, steps = [], []
    for (fmt, granularity), losses in finals.items():
        for seed, loss in enumerate(losses):
            trial_id = f"{fmt}_{granularity}_s{seed}"
            config = {"format": fmt, "optimizer": "adamw", "seed": seed, "name": trial_id,
                      "scaling": {"granularity": granularity}}
            trials.append({"trial_id": trial_id, "format": fmt, "optimizer": "adamw", "lr": 3e-3, "ulp_lr": 1.0,
                           "seed": seed, "status": "completed", "steps_completed": 200, "steps_planned": 200,
                           "best_val_loss": loss, "config": json.dumps(config)})
            steps += [{"trial_id": trial_id, "step": 100, "train_loss": 3.0, "val_loss": 3.0},
                      {"trial_id": trial_id, "step": 200, "train_loss": 2.0, "val_loss": loss}]
    return analysis.Results("g", pd.DataFrame(trials), pd.DataFrame(steps),
                            pd.DataFrame({"trial_id": [], "step": [], "layer": []}))


def test_each_format_per_granularity_with_ranks_and_block_minus_tensor_by_hand():
    results = _results()
    assert has_granularities(results)
    table = granularity_table(results).set_index("format")
    e4, e2 = table.loc["E4M3"], table.loc["E2M5"]
    assert e4["tensor mean"] == pytest.approx(2.1) and e4["block mean"] == pytest.approx(2.2)
    # sd of (2.0, 2.2) is 0.1414; the half width is t * sd / sqrt(2) = t * 0.1
    assert (e4["tensor ci_low"], e4["tensor ci_high"]) == pytest.approx((2.1 - T1 * 0.1, 2.1 + T1 * 0.1))
    # the best split changes: E4M3 first per tensor, E2M5 first in blocks
    assert (e4["tensor rank"], e2["tensor rank"], e4["block rank"], e2["block rank"]) == (1, 2, 2, 1)
    assert e2["block - tensor"] == pytest.approx(2.0 - 2.6) and e4["block - tensor"] == pytest.approx(0.1)
    # Welch with equal variances and n = 2 each: se = sqrt(0.02/2 + 0.02/2) = 0.1414, df = 2
    half = 4.30265273 * (0.02 ** 0.5)
    assert (e2["block - tensor ci_low"], e2["block - tensor ci_high"]) == pytest.approx((-0.6 - half, -0.6 + half))
    assert plot_granularity(results) is not None


def test_a_trial_stopped_before_the_final_step_is_left_out_of_its_cell():
    results = _results()
    stopped = results.trials["trial_id"].eq("E4M3_block_s1")
    results.trials.loc[stopped, ["status", "steps_completed"]] = ["stopped", 100]
    results.steps.drop(results.steps.index[results.steps["trial_id"].eq("E4M3_block_s1")
                                           & results.steps["step"].eq(200)], inplace=True)
    row = granularity_table(results).set_index("format").loc["E4M3"]
    assert row["block mean"] == pytest.approx(2.1) and row["block n"] == 1 and pd.isna(row["block ci_low"])


def test_a_cell_missing_under_one_granularity_is_null_there_not_zero():
    finals = {k: v for k, v in FINALS.items() if k != ("E2M5", "block")}
    table = granularity_table(_results(finals)).set_index("format")
    assert pd.isna(table.loc["E2M5", "block mean"]) and pd.isna(table.loc["E2M5", "block - tensor"])
    assert table.loc["E2M5", "tensor mean"] == pytest.approx(2.6)


def test_no_granularity_axis_no_table_and_no_report_section(tmp_path):
    one = _results({k: v for k, v in FINALS.items() if k[1] == "tensor"})
    assert not has_granularities(one) and granularity_table(one).empty and plot_granularity(one) is None
    assert "does the best split change" not in analysis.write_report(one, tmp_path / "a").read_text()
    report = analysis.write_report(_results(), tmp_path / "b").read_text()
    assert "## Per tensor or in blocks: does the best split change?" in report and (tmp_path / "b/granularity.png").exists()
