"""The trainer end to end: a tiny model on the builtin corpus, every optimizer, tables and resume."""

import math
import time

import pandas as pd
import torch
import pytest

from altgrad import results
from altgrad.cli import main
from altgrad.config import parse_cell
from altgrad.optim import OPTIMIZERS
from altgrad.trainer import Trainer

# Small enough that no tensor reaches the quantizer's compile threshold: the suite stays fast.
TINY = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}, "batch_size": 8,
        "eval_every": 25, "eval_iters": 2, "warmup_steps": 10}


def tiny_cell(**overrides):
    return parse_cell({**TINY, "steps": 100, "diagnostics": {"flips_every": 1, "rank_every": 25}, **overrides})


def run(cell, tmp_path, trial_id="t", **kwargs):
    trainer = Trainer(cell, trial_id=trial_id, results_root=str(tmp_path / "res"),
                      checkpoint_path=tmp_path / f"{trial_id}.pt", progress=False)
    return trainer, trainer.run(**kwargs)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_e5m2_and_writes_well_formed_tables(optimizer, tmp_path):
    cell = tiny_cell(format="E5M2", optimizer=optimizer, ulp_lr=1.0)
    trainer, summary = run(cell, tmp_path)
    assert summary["status"] == "completed" and summary["steps_completed"] == 100
    steps = pd.read_parquet(tmp_path / "res" / "steps")
    layers = pd.read_parquet(tmp_path / "res" / "layers")
    assert list(steps["step"]) == list(range(1, 101))
    first, last = steps["train_loss"].iloc[:10].mean(), steps["train_loss"].iloc[-10:].mean()
    assert last < first - 0.5, (first, last)  # the loss falls (from ln(97) = 4.6)
    assert steps["flips"].iloc[1:].gt(0).all()  # weights flip at every step after the first
    assert pd.isna(steps["flips"].iloc[0])  # nothing to compare with at the first measure
    assert steps["val_loss"].notna().sum() == 4  # every 25 steps
    assert steps["stall_ratio"].iloc[1:].between(0, 1).all()
    assert not steps.duplicated(["trial_id", "step"]).any()
    assert set(layers["step"]) == {25, 50, 75, 100}
    assert len(layers) == 4 * len(trainer.layers)
    assert not layers.duplicated(["trial_id", "step", "layer"]).any()
    assert layers["stable_rank"].gt(1).all() and layers["effective_rank"].ge(layers["stable_rank"]).all()
    for column in results.SCHEMAS["steps"].names:
        assert column in steps.columns
    assert summary["best_val_loss"] == steps["val_loss"].min()


def test_fp32_baseline_quantizes_nothing_and_bf16_casts(tmp_path):
    _, fp32 = run(tiny_cell(format="fp32", steps=30), tmp_path, "fp32")
    steps = pd.read_parquet(tmp_path / "res" / "steps")
    fp32_steps = steps[steps.trial_id == "fp32"]
    assert fp32_steps["overflow_frac"].isna().all()  # no quantization point was counted
    _, bf16 = run(tiny_cell(format="bf16", steps=30), tmp_path, "bf16")
    assert fp32["final_train_loss"] != bf16["final_train_loss"]  # the casts change the numbers


class _Crash(Exception):
    pass


def _crash_at(step):
    def report(metrics, checkpoint):
        if metrics["step"] == step:  # the checkpoint of this step is already on disk
            raise _Crash

    return report


def test_resume_from_a_checkpoint_is_bit_identical_without_duplicate_rows(tmp_path):
    cell = tiny_cell(optimizer="grid", format="E4M3", steps=60, eval_every=20,
                     diagnostics={"flips_every": 1, "rank_every": 20})
    _, straight = run(cell, tmp_path / "a")
    first_start = time.time()
    with pytest.raises(_Crash):
        run(cell, tmp_path / "b", report=_crash_at(40))
    assert len(pd.read_parquet(tmp_path / "b" / "res" / "steps")) == 40  # flushed before the crash
    restart = time.time()
    _, resumed = run(cell, tmp_path / "b", resume=True)  # a fresh Trainer, as after a restart
    assert first_start <= resumed["started_at"] < restart < resumed["ended_at"]  # kept across the restart
    for table in ("steps", "layers"):
        a = pd.read_parquet(tmp_path / "a" / "res" / table).drop(columns="tokens_per_s", errors="ignore")
        b = pd.read_parquet(tmp_path / "b" / "res" / table).drop(columns="tokens_per_s", errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert resumed["steps_completed"] == 60


def test_a_diverging_run_stops_with_a_reason(tmp_path):
    cell = tiny_cell(lr=1e6, grad_clip=0.0, steps=100, warmup_steps=0)
    _, summary = run(cell, tmp_path)
    assert summary["status"] == "stopped" and summary["stop_reason"] == "diverged"
    assert summary["steps_completed"] < 100


def test_reports_carry_what_the_scheduler_reads(tmp_path):
    reports = []
    run(tiny_cell(steps=50), tmp_path, report=lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    assert [m["step"] for m, _ in reports] == [25, 50]
    for metrics, checkpoint in reports:
        assert {"train_loss", "val_loss", "rank_warnings", "first_warning_step"} <= set(metrics)
        assert checkpoint is not None and checkpoint.exists()


def test_cli_train_writes_three_tables_and_refuses_to_overwrite(tmp_path, capsys):
    cell_file = tmp_path / "cell.yaml"
    cell_file.write_text("format: E3M4\noptimizer: manifold_adamw\nsteps: 10\neval_every: 5\nbatch_size: 4\n"
                         "eval_iters: 1\nmodel: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\n")
    out = tmp_path / "out"
    assert main(["train", str(cell_file), "--out", str(out), "--set", "name=run1", "--set", "seed=3"]) == 0
    trials = pd.read_parquet(out / "run1" / "trials")
    assert trials.loc[0, "seed"] == 3 and trials.loc[0, "status"] == "completed"
    assert "run1: E3M4 / manifold_adamw" in capsys.readouterr().out
    assert main(["train", str(cell_file), "--out", str(out), "--set", "name=run1"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("text,fragment", [
    ("format: E9M9\n", "format"), ("optimizer: sgd\n", "optimizer"), ("steps: -5\n", "steps"),
    ("layers: heads\n", "layers"), ("lrr: 1\n", "lrr"), ("model: {n_embd: 33, n_head: 2}\n", "n_embd"),
    ("- a\n- b\n", "mapping"), ("format: [\n", "YAML"),
])
def test_cli_train_rejects_bad_cells_with_exit_2_and_writes_nothing(text, fragment, tmp_path, capsys):
    cell_file = tmp_path / "bad.yaml"
    cell_file.write_text(text)
    assert main(["train", str(cell_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and fragment in err
    assert not (tmp_path / "out").exists()


def _nulls_and_nans(path) -> dict[str, tuple[int, int]]:
    """Per float column of a Parquet dataset: (nulls, NaNs), read with pyarrow itself, as DuckDB or
    polars would see them (pandas shows both as NaN)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: (table[name].null_count, pc.sum(pc.is_nan(table[name])).as_py() or 0)
            for name in table.column_names if table.schema.field(name).type == "double"}


def test_what_was_not_measured_is_null_and_nan_only_records_a_measured_non_finite(tmp_path):
    _, summary = run(tiny_cell(format="E4M3", steps=50), tmp_path)
    steps = _nulls_and_nans(tmp_path / "res" / "steps")
    assert steps["val_loss"] == (48, 0)  # evaluated at 25 and 50 only
    assert steps["flips"] == (1, 0) and steps["stall_ratio"] == (1, 0) and steps["recoded"] == (1, 0)
    assert steps["train_loss"] == (0, 0) and steps["overflow_frac"] == (0, 0)
    assert all(nans == 0 for _, nans in steps.values()), steps
    layers = _nulls_and_nans(tmp_path / "res" / "layers")
    assert all(nans == 0 for _, nans in layers.values()), layers
    assert layers["subspace_angle_deg"][0] > 0  # the first check has no previous basis: null
    assert summary["final_val_loss"] is not None and summary["best_val_loss"] <= summary["final_val_loss"]


def test_a_report_means_what_the_steps_table_means_by_train_loss(tmp_path):
    reports = []
    trainer, _ = run(tiny_cell(steps=50), tmp_path, report=lambda metrics, _: reports.append(metrics))
    steps = pd.read_parquet(tmp_path / "res" / "steps").set_index("step")
    for metrics in reports:
        assert metrics["train_loss"] == steps.loc[metrics["step"], "train_loss"]  # the last batch's
        window = steps.loc[metrics["step"] - 24:metrics["step"], "train_loss"]
        assert metrics["train_loss_mean"] == pytest.approx(window.mean(), rel=1e-12)


def test_a_diverging_run_records_its_non_finite_loss_as_nan(tmp_path):
    _, summary = run(tiny_cell(format="E4M3", lr=1e4, grad_clip=0.0, steps=60), tmp_path)
    if summary["stop_reason"] != "diverged":
        pytest.fail(f"lr=1e4 did not diverge: {summary}")
    steps = pd.read_parquet(tmp_path / "res" / "steps")
    assert not math.isfinite(steps["train_loss"].iloc[-1])
    assert summary["failed"] and summary["failure_kind"] in ("non_finite", "divergence")
    assert 1 <= summary["failure_step"] <= summary["steps_completed"]


def test_a_healthy_run_is_labelled_healthy_by_the_rules_in_its_cell(tmp_path):
    _, summary = run(tiny_cell(steps=50), tmp_path)
    assert (summary["failed"], summary["failure_step"], summary["failure_kind"]) == (False, None, None)
    from altgrad.config import ConfigError

    with pytest.raises(ConfigError, match="failure: .*loss_factor must be > 1, got 0.5"):
        tiny_cell(failure={"loss_factor": 0.5})


def test_grid_cells_keep_every_master_weight_on_the_forward_grid(tmp_path):
    trainer, summary = run(tiny_cell(format="E2M5", optimizer="grid", ulp_lr=2.0, steps=40), tmp_path)
    assert summary["status"] == "completed"
    for name, layer in trainer.layers.items():
        scale = layer.weight_scale
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale), name  # a power of two
        assert torch.equal(layer.quantized_weight(), layer.weight.detach()), name  # the forward sees the master
