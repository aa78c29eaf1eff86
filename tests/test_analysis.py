"""Analysis and report on a small real sweep: every number checked by hand against the raw tables (the
constructed-results checks are in tests/test_analysis_*.py)."""

import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from altgrad import analysis, results
from altgrad.config import parse_cell
from altgrad.trainer import Trainer

# Tiny enough that no tensor reaches the quantizer's compile threshold. Checks every 4 steps.
TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}, "batch_size": 8, "steps": 24,
        "eval_every": 4, "eval_iters": 1, "warmup_steps": 4, "ulp_lr": 1.0,
        "diagnostics": {"flips_every": 1, "rank_every": 4}}
# E5M2 cells get a touchy rank detector (warm-up 6: the reference check is step 8, not the first check at
# 4), so they warn within 24 steps; E2M5 cells keep the default one (warm-up 200: never warns here).
TOUCHY = {"warmup_steps": 6, "ema_beta": 0.5, "critical_drop_threshold": 0.02}
RANK_COLLAPSED = "E5M2-grid-s1"  # stopped as the sweep's scheduler would: after 2 reports with warnings
DIVERGED = "E3M4-adamw-s0"  # lr 1e6: a one-seed cell that stops with a NaN loss


class _Stop(Exception):
    pass


def _stop_after_two_warned_reports():
    warned = []

    def report(metrics, checkpoint):
        warned.append(metrics["rank_warnings"] > 0)
        if warned[-2:] == [True, True]:
            raise _Stop

    return report


def _run(root, trial_id, **cell):
    trainer = Trainer(parse_cell({**TINY, **cell}), trial_id=trial_id, results_root=str(root), progress=False)
    if trial_id == RANK_COLLAPSED:
        with pytest.raises(_Stop):
            trainer.run(report=_stop_after_two_warned_reports())
        summary = {**trainer.summary("stopped"), "stop_reason": "rank_collapse"}
    else:
        summary = trainer.run()
    results.write_rows(str(root), "trials", trial_id, [summary])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "smoke"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and far faster on a busy machine
    try:
        for fmt in ("E5M2", "E2M5"):
            for optimizer in ("adamw", "grid", "manifold_adamw"):
                for seed in (0, 1):
                    rank_trend = TOUCHY if fmt == "E5M2" else {}
                    _run(root, f"{fmt}-{optimizer}-s{seed}", format=fmt, optimizer=optimizer, seed=seed,
                         rank_trend=rank_trend)
        _run(root, DIVERGED, format="E3M4", optimizer="adamw", seed=0, lr=1e6, grad_clip=0.0, warmup_steps=0,
             eval_every=1)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def raw(root):
    """The raw tables, read with plain pandas (not through the code under test)."""
    return {table: pd.read_parquet(root / table) for table in results.TABLES}


@pytest.fixture(scope="module")
def loaded(root):
    return analysis.load_results(root)


def _row(frame, **where):
    mask = np.logical_and.reduce([frame[key] == value for key, value in where.items()])
    (index,) = np.flatnonzero(mask)
    return frame.iloc[index]


def test_the_fixture_sweep_has_what_the_checks_need(raw):
    trials = raw["trials"].set_index("trial_id")
    assert trials.loc[RANK_COLLAPSED, "status"] == "stopped" and trials.loc[RANK_COLLAPSED, "first_warning_step"] > 0
    assert trials.loc[DIVERGED, "stop_reason"] == "diverged"
    assert math.isfinite(trials.loc[DIVERGED, "best_val_loss"])  # evaluated before the loss went non-finite
    assert trials.loc[trials["format"] == "E2M5", "first_warning_step"].isna().all()


def test_cell_table_has_one_row_per_cell_with_seed_statistics_of_the_raw_trials(loaded, raw):
    cells = analysis.format_optimizer_table(loaded)
    trials = raw["trials"]
    assert len(cells) == len(trials.groupby(["format", "optimizer"])) == 7
    assert list(cells["format"].unique()) == ["E2M5", "E3M4", "E5M2"]  # altgrad's order of formats
    for _, cell in cells.iterrows():
        own = trials[(trials["format"] == cell["format"]) & (trials["optimizer"] == cell["optimizer"])]
        assert cell["n_seeds"] == len(own)
        for metric in ("best_val_loss", "final_val_loss"):
            expected = own[metric].mean()  # null where no seed has a finite loss
            mean = cell[f"{metric}_mean"]
            assert pd.isna(mean) if pd.isna(expected) else mean == pytest.approx(expected)
            if len(own) > 1:  # one seed: no spread (null)
                assert cell[f"{metric}_std"] == pytest.approx(own[metric].std())
        assert cell["steps_completed"] == own["steps_completed"].mean()
    diverged = _row(cells, format="E3M4", optimizer="adamw")
    assert pd.isna(diverged["best_val_loss_std"]) and math.isfinite(diverged["best_val_loss_mean"])  # one seed
    assert diverged["outcomes"] == "diverged 1"
    collapsed = _row(cells, format="E5M2", optimizer="grid")
    assert sorted(collapsed["outcomes"].split(", ")) == ["completed 1", "rank_collapse 1"]


def test_cell_diagnostics_average_the_raw_steps_and_layers_over_seeds(loaded, raw):
    cells = analysis.format_optimizer_table(loaded)
    steps, layers = raw["steps"], raw["layers"]
    for fmt, optimizer in [("E5M2", "adamw"), ("E2M5", "manifold_adamw")]:
        cell = _row(cells, format=fmt, optimizer=optimizer)
        ids = [f"{fmt}-{optimizer}-s{seed}" for seed in (0, 1)]
        for column in ("stall_ratio", "overflow_frac", "underflow_frac"):
            expected = np.mean([steps.loc[steps["trial_id"] == i, column].mean() for i in ids])
            assert cell[column] == pytest.approx(expected)
        assert cell["flip_rate"] == pytest.approx(np.mean([layers.loc[layers["trial_id"] == i, "flip_rate"].mean()
                                                           for i in ids]))
        # Rank drop: last check / first check from the detector's warm-up on (step 8 for E5M2's warm-up 6;
        # the first check, step 4, for E2M5 whose warm-up of 200 is never reached), blocks averaged.
        reference_step = 8 if fmt == "E5M2" else 4
        for kind, pattern in [("lm_head", "lm_head"), ("attn.c_proj", r"\.h\.\d+\.attn\.c_proj$")]:
            ratios = []
            for trial_id in ids:
                own = layers[(layers["trial_id"] == trial_id) & layers["layer"].str.contains(pattern)]
                last = own[own["step"] == own["step"].max()].set_index("layer")["stable_rank"]
                first = own[own["step"] == reference_step].set_index("layer")["stable_rank"]
                ratios.append((last / first).mean())
            assert cell[f"rank_drop:{kind}"] == pytest.approx(np.mean(ratios))
    assert {"rank_drop:lm_head", "rank_drop:attn.c_proj", "rank_drop:mlp.c_proj"} <= set(cells)
    assert pd.isna(_row(cells, format="E3M4", optimizer="adamw")["rank_drop:lm_head"])  # stopped before a check


def test_benefit_compares_val_losses_at_the_last_step_both_cells_reached(loaded, raw):
    benefit = analysis.benefit_table(loaded).set_index(["format", "optimizer"])
    steps, trials = raw["steps"], raw["trials"].set_index("trial_id")

    def val_at(trial_id, step):
        own = steps[(steps["trial_id"] == trial_id) & (steps["step"] <= step)].dropna(subset=["val_loss"])
        return own["val_loss"].iloc[-1]

    for fmt in ("E5M2", "E2M5"):
        for optimizer in ("manifold_adamw", "grid"):
            mine, base = [f"{fmt}-{optimizer}-s{s}" for s in (0, 1)], [f"{fmt}-adamw-s{s}" for s in (0, 1)]
            step = trials.loc[mine + base, "steps_completed"].min()
            row = benefit.loc[(fmt, optimizer)]
            assert row["step"] == step and row["at_final_step"] == (step == 24)
            difference = np.mean([val_at(t, step) for t in mine]) - np.mean([val_at(t, step) for t in base])
            assert row["difference"] == pytest.approx(difference)
            assert row["ci_low"] < row["difference"] < row["ci_high"]
    assert not benefit.loc[("E5M2", "grid"), "at_final_step"]  # the rank-collapsed trial set the step
    assert "E3M4" not in benefit.index.get_level_values("format")  # no ULP runs to compare


def test_trial_lanes_place_each_trial_on_the_slot_that_freed_up_first():
    t = pd.Timestamp("2026-01-01", tz="UTC")
    spans = {"a": ("n1", 0, 10), "b": ("n1", 5, 15), "c": ("n1", 10, 20), "d": ("n1", 16, 30),
             "e": ("n2", 0, 5), "f": ("n1", None, None)}
    trials = pd.DataFrame([{"trial_id": k, "node_id": node, "started_at": t + pd.Timedelta(seconds=start)
                            if start is not None else pd.NaT, "ended_at": t + pd.Timedelta(seconds=end)
                            if end is not None else pd.NaT} for k, (node, start, end) in spans.items()])
    lanes = dict(zip(trials["trial_id"], analysis.trial_lanes(trials)))
    assert {k: lanes[k] for k in "abcde"} == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0}
    assert math.isnan(lanes["f"])  # no stamps (a running trial, or results from before the stamps): no lane


def test_report_embeds_existing_plots_and_the_main_table(loaded, tmp_path):
    report = analysis.write_report(loaded, tmp_path / "report")
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    plots = {"benefit.png", "dynamics.png", "ranks.png", "loss_E5M2.png", "loss_E2M5.png", "loss_E3M4.png",
             "timeline.png"}
    sections = re.findall(r"^## (.*)$", text, re.MULTILINE)
    assert sections[:5] == ["The best split per optimizer", "Where the ULP optimizers help (against adamw)",
                            "What fails first", "How good the warnings are", "Formats × optimizers"]
    assert plots <= set(images)
    for name in images:
        assert (tmp_path / "report" / name).stat().st_size > 0
    main = text.split("## Formats × optimizers")[1].split("\n## ")[0]
    table_lines = [line for line in main.splitlines() if line.startswith("|")]
    assert len(table_lines) - 2 == len(analysis.format_optimizer_table(loaded))  # minus header and rule
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)  # missing values show as "—"


def test_a_partial_sweep_reports_running_trials_from_their_steps(root, raw, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / "trials" / "E2M5-adamw-s1.parquet").unlink()  # still running: steps, no summary yet
    loaded = analysis.load_results(str(partial))
    running = loaded.trials.set_index("trial_id").loc["E2M5-adamw-s1"]
    own_steps = raw["steps"][raw["steps"]["trial_id"] == "E2M5-adamw-s1"]
    assert running["status"] == "running" and running["steps_completed"] == own_steps["step"].max()
    assert running["best_val_loss"] == own_steps["val_loss"].min() and pd.isna(running["seed"])
    assert _row(analysis.format_optimizer_table(loaded), format="E2M5", optimizer="adamw")["n_seeds"] == 2
    assert analysis.report_main(str(partial), None) == 0
    out = capsys.readouterr().out
    assert "| E2M5" in out and str(partial / "report" / "report.md") in out
    assert "still running" in (partial / "report" / "report.md").read_text()


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_a_path_without_results_is_a_value_error_naming_it(where, tmp_path):
    path = tmp_path / where
    if where == "empty":
        (path / "steps").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
        analysis.report_main(str(path), None)
    assert "\n" not in str(error.value)
    assert not (path / "report").exists()
