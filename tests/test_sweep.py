"""The sweep: matrix expansion and validation, the early-stopping scheduler, and real runs on a local Ray
(complete tables, early stopping of exactly the collapsing trial, a trial crash and a driver kill that
both resume without duplicate or missing rows, and resumes that leave ended trials untouched)."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from pyarrow.fs import LocalFileSystem

from altgrad.cli import main
from altgrad.sweep import RankCollapseScheduler, parse_sweep
from altgrad.sweep.runner import MEASURED, SweepRecorder

TINY_TRIAL = {"steps": 30, "batch_size": 8, "eval_every": 10, "eval_iters": 2, "warmup_steps": 5,
              "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
              "diagnostics": {"flips_every": 1, "rank_every": 10}}


def sweep_file(tmp_path, **sections) -> Path:
    body = {"name": "t", "trial": TINY_TRIAL, "matrix": {"format": ["E4M3", "E2M5"], "optimizer": ["adamw", "grid"]},
            "resources": {"cpu": 1}, **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def altgrad(*args, timeout=600, env=None):
    """The CLI in its own process, as a user runs it (and so that Ray's state never leaks between tests)."""
    return subprocess.run([sys.executable, "-m", "altgrad.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def tables(root: Path) -> dict:
    return {t: pd.read_parquet(root / t) for t in ("trials", "steps", "layers")}


def file_states(root: Path, *tables: str) -> dict:
    """Every file's bytes and modification time: what a resume must leave as it was."""
    folders = [root / table for table in tables] if tables else [root]
    return {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_complete(root: Path, cells: int, steps: int = 30):
    t = tables(root)
    assert len(t["trials"]) == cells and t["trials"]["trial_id"].is_unique
    assert not t["steps"].duplicated(["trial_id", "step"]).any()
    assert not t["layers"].duplicated(["trial_id", "step", "layer"]).any()
    for trial_id, group in t["steps"].groupby("trial_id"):
        completed = t["trials"].set_index("trial_id").loc[trial_id, "steps_completed"]
        assert sorted(group["step"]) == list(range(1, completed + 1)), trial_id
    return t


# ---- the matrix ----------------------------------------------------------------------------------

def test_matrix_expands_to_one_cell_per_combination_less_exclusions():
    spec = parse_sweep({"name": "m", "trial": TINY_TRIAL,
                        "matrix": {"format": ["E4M3", "fp32"], "optimizer": ["adamw", "grid"], "seed": [0, 1],
                                   "diagnostics.rank_every": [5]},
                        "exclude": [{"format": "fp32", "optimizer": "grid"}]})
    assert len(spec.cells) == 6
    assert "E4M3_grid_s1_5" in spec.cell_ids
    cell = next(c for c in spec.cells if c.cell_id == "E4M3_grid_s1_5")
    assert (cell.config.optimizer, cell.config.seed, cell.config.diagnostics.rank_every) == ("grid", 1, 5)
    assert cell.config.model.n_embd == 32  # the base trial's keys stay


@pytest.mark.parametrize("change,fragment", [
    ({"matrix": {"format": ["E4M3", "E9M9"]}}, "E9M9"),
    ({"matrix": {"optimizer": ["adamw", "sgd"]}}, "sgd"),
    ({"matrix": {"layers": ["heads"]}}, "heads"),
    ({"matrix": {"layers": [{"*.mlp.c_fcc": "E3M4"}]}}, "c_fcc"),
    ({"matrix": {"steps": [0]}}, "steps"),
    ({"matrix": {"lr": [-1.0]}}, "lr"),
    ({"matrix": {"format": []}}, "matrix.format"),
    ({"matrix": {"format": ["fp32"], "optimizer": ["grid"]}}, "exclude"),
    ({"trial": {**TINY_TRIAL, "lrr": 1}}, "lrr"),
    ({"resources": {"cpu": 10000}}, "resources"),
    ({"resources": {"tpu": 1}}, "tpu"),
    ({"early_stopping": {"rank_collapse": {"patience": 0}}}, "patience"),
    ({"early_stopping": {"boredom": {}}}, "boredom"),
    ({"exclude": [{"format": "E5M2"}]}, "E5M2"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_sweep_files_fail_fast_with_one_line_exit_2_and_nothing_written(change, fragment, tmp_path, capsys):
    path = sweep_file(tmp_path, **change)
    started = time.perf_counter()
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 10  # before any Ray work
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.yaml" in err[0] and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_matrix_document_and_its_check(tmp_path):
    path = sweep_file(tmp_path)
    document = tmp_path / "TEST_MATRIX.md"
    result = altgrad("matrix", str(path))
    assert result.returncode == 0 and "4 trials" in result.stdout and "E2M5_grid" in result.stdout
    document.write_text(result.stdout)
    assert altgrad("matrix", str(path), "--check", str(document)).returncode == 0
    document.write_text(result.stdout.replace("E2M5", "E2M6"))
    assert altgrad("matrix", str(path), "--check", str(document)).returncode == 1


def test_committed_test_matrix_matches_the_full_matrix_sweep(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the document names the sweep by this path
    assert main(["matrix", "sweeps/full_matrix.yaml", "--check", "TEST_MATRIX.md"]) == 0


# ---- the scheduler -------------------------------------------------------------------------------

def decide(scheduler, trial_id, **result):
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial_id), result)


def test_scheduler_stops_after_patience_consecutive_warnings_only():
    stops = []
    scheduler = RankCollapseScheduler(patience=3, on_decision=lambda *args: stops.append(args[:2]))
    decisions = [decide(scheduler, "a", train_loss=2.0, rank_warnings=w) for w in (1, 1, 0, 1, 1, 1)]
    assert decisions == ["CONTINUE"] * 5 + ["STOP"]
    assert stops == [("a", "rank_collapse")]
    assert all(decide(scheduler, "b", train_loss=2.0, rank_warnings=0) == "CONTINUE" for _ in range(10))


def test_scheduler_counts_each_rank_check_once_when_reports_repeat_it():
    scheduler = RankCollapseScheduler(patience=2)
    assert decide(scheduler, "a", train_loss=2.0, rank_warnings=1, rank_check_step=50) == "CONTINUE"
    assert decide(scheduler, "a", train_loss=2.0, rank_warnings=1, rank_check_step=50) == "CONTINUE"  # a repeat
    assert decide(scheduler, "a", train_loss=2.0, rank_warnings=1, rank_check_step=100) == "STOP"


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), 9.0])
def test_scheduler_stops_a_diverging_loss(loss):
    stops = []
    scheduler = RankCollapseScheduler(loss_factor=4.0, on_decision=lambda *args: stops.append(args[1]))
    assert decide(scheduler, "a", train_loss=2.0, rank_warnings=0) == "CONTINUE"
    assert decide(scheduler, "a", train_loss=loss, rank_warnings=0) == "STOP"
    assert stops == ["diverged"]


def test_observe_mode_decides_as_act_mode_and_lets_the_trial_run():
    acted, observed = [], []
    act = RankCollapseScheduler(patience=2, on_decision=lambda *args: acted.append((args[1], args[3])))
    observe = RankCollapseScheduler(patience=2, mode="observe",
                                    on_decision=lambda *args: observed.append((args[1], args[3])))
    reports = [dict(step=10 * i, train_loss=2.0, rank_warnings=1) for i in range(1, 5)]
    assert [decide(act, "a", **r) for r in reports[:2]] == ["CONTINUE", "STOP"]
    assert [decide(observe, "a", **r) for r in reports] == ["CONTINUE"] * 4
    assert acted == [("rank_collapse", True)] and observed[0] == ("rank_collapse", False)
    assert decide(observe, "a", step=50, train_loss=float("nan"), rank_warnings=0) == "STOP"  # ends in both modes
    assert observed[-1] == ("diverged", True)
    with pytest.raises(ValueError, match="mode must be one of act, observe"):
        RankCollapseScheduler(mode="watch")


def test_a_replayed_report_is_not_judged_again():
    # A trial resumed from an older checkpoint reports the same steps again: they count once.
    scheduler = RankCollapseScheduler(patience=2)
    assert decide(scheduler, "a", step=10, train_loss=2.0, rank_warnings=1) == "CONTINUE"
    assert decide(scheduler, "a", step=10, train_loss=2.0, rank_warnings=1) == "CONTINUE"
    assert decide(scheduler, "a", step=20, train_loss=2.0, rank_warnings=1) == "STOP"


def test_the_schedulers_memory_survives_a_driver_restart_in_the_recorders_saved_state(tmp_path):
    # Ray pickles the callbacks' get_state() with the experiment and hands it to set_state() of the
    # restarted driver's recorder; the scheduler's streaks and best losses must come back with it.
    spec = parse_sweep({"name": "m", "trial": TINY_TRIAL, "early_stopping": {"rank_collapse": {"patience": 3}}})
    before = SweepRecorder(spec, str(tmp_path), progress=False)
    for step in (10, 20):
        assert decide(before.scheduler, "a", step=step, train_loss=2.0, rank_warnings=1) == "CONTINUE"
    before.record_decision("b", "rank_collapse", {"step": 20}, True)
    before.record_decision("c", "rank_collapse", {"step": 40}, False)
    after = SweepRecorder(spec, str(tmp_path), progress=False)
    after.set_state(pickle.loads(pickle.dumps(before.get_state())))
    assert after.stop_reasons == {"b": "rank_collapse"}
    assert after.would_stop == {"b": (20, "rank_collapse"), "c": (40, "rank_collapse")}
    assert decide(after.scheduler, "a", step=20, train_loss=2.0, rank_warnings=1) == "CONTINUE"  # a replay
    assert decide(after.scheduler, "a", step=30, train_loss=9.0, rank_warnings=0) == "STOP"  # 9 > 4 x best 2
    fresh = SweepRecorder(spec, str(tmp_path), progress=False)
    assert decide(fresh.scheduler, "a", step=30, train_loss=2.0, rank_warnings=1) == "CONTINUE"
    for step in (30, 40):
        decide(after.scheduler, "c", step=step, train_loss=2.0, rank_warnings=1)
    again = SweepRecorder(spec, str(tmp_path), progress=False)
    again.set_state(pickle.loads(pickle.dumps(after.get_state())))
    assert decide(again.scheduler, "c", step=50, train_loss=2.0, rank_warnings=1) == "STOP"  # the third warning


def test_the_recorder_keeps_a_trials_measurements_only_until_its_row_is_written(tmp_path):
    # Ray stores, encodes and snapshots every result of every trial: the measured columns must leave the
    # result, be held by the recorder while the trial runs (so a driver restart keeps them), and be gone
    # from its saved state once the row holds them, so that the state grows with the trials running only.
    spec = parse_sweep({"name": "m", "trial": TINY_TRIAL, "matrix": {"seed": [0, 1]}})
    recorder = SweepRecorder(spec, str(tmp_path), progress=False)
    cell_id = spec.cell_ids[0]
    measured = {"stop_reason": None, "steps_completed": 30, "final_train_loss": 2.5, "first_warning_step": 20}
    checkpoints = tmp_path / "_ray" / "t0"
    (checkpoints / "checkpoint_000000").mkdir(parents=True)
    history = SimpleNamespace(metric_analysis={"step": {"max": 30}}, metric_n_steps={"step": {"5": [30]}})
    trial = SimpleNamespace(trial_id="t0", config={"cell_id": cell_id}, last_result={}, run_metadata=history,
                            storage=SimpleNamespace(storage_filesystem=LocalFileSystem(), trial_fs_path=str(checkpoints)))
    result = {"step": 30, "train_loss": 2.5, MEASURED: json.dumps(measured)}
    recorder.on_trial_result(0, [trial], trial, result)
    assert MEASURED not in result and result == {"step": 30, "train_loss": 2.5}
    recorder.record_decision("t0", "rank_collapse", {"step": 20}, acted=False)
    assert pickle.loads(pickle.dumps(recorder.get_state()))["measured"] == {"t0": json.dumps(measured)}
    recorder.on_trial_complete(0, [trial], trial)
    state = recorder.get_state()
    assert state["measured"] == {} and state["would_stop"] == {} and state["stop_reasons"] == {}
    row = pd.read_parquet(tmp_path / "trials").iloc[0]
    assert row["trial_id"] == cell_id and row["seed"] == 0 and row["steps_planned"] == TINY_TRIAL["steps"]
    assert row["steps_completed"] == 30 and row["final_train_loss"] == 2.5 and row["first_warning_step"] == 20
    assert row["status"] == "completed" and row["would_stop_step"] == 20 and row["would_stop_reason"] == "rank_collapse"
    assert recorder.finished == {cell_id: "completed"} and not checkpoints.exists()  # an ended trial's are dead weight
    assert history.metric_analysis == {} and history.metric_n_steps == {}  # and so is Tune's metric history


def test_the_progress_counts_include_the_rows_a_resumed_sweep_started_with(tmp_path):
    spec = parse_sweep({"name": "m", "trial": TINY_TRIAL, "matrix": {"seed": [0, 1, 2]}})
    recorder = SweepRecorder(spec, str(tmp_path), progress=False, ended={spec.cell_ids[2]: "stopped"})
    for index, error in ((0, None), (1, "boom")):
        trial = SimpleNamespace(trial_id=f"t{index}", config={"cell_id": spec.cell_ids[index]}, last_result={},
                                run_metadata=SimpleNamespace(metric_analysis={}, metric_n_steps={}),
                                storage=SimpleNamespace(storage_filesystem=LocalFileSystem(),
                                                        trial_fs_path=str(tmp_path / "_ray" / f"t{index}")))
        recorder._write(trial, error=error)
    assert recorder.status_counts == {"stopped": 1, "completed": 1, "error": 1}
    assert dict(recorder.status_counts) == dict(pd.Series(recorder.finished).value_counts())


def test_the_scheduler_chooses_the_trial_fifo_would_choose_without_scanning_ended_trials():
    # Ray's FIFOScheduler is the oracle: same choice over random statuses, trials added in order.
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    class FakeTrial:
        def __init__(self, name):
            self.name, self.status = name, Trial.PENDING

        def is_finished(self):
            return self.status in (Trial.ERROR, Trial.TERMINATED)

    rng = random.Random(7)
    statuses = [Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED, Trial.ERROR]
    for _ in range(200):
        trials = [FakeTrial(f"t{i}") for i in range(rng.randint(0, 12))]
        scheduler = RankCollapseScheduler()
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        for _ in range(3):  # statuses change between steps of Tune's loop
            for trial in trials:
                if not trial.is_finished():  # an ended trial stays ended
                    trial.status = rng.choice(statuses)
            unended = [trial for trial in trials if not trial.is_finished()]
            if unended and rng.random() < 0.5:  # a failed trial retried, as TuneController._requeue_trial does
                retried = rng.choice(unended)
                retried.status = Trial.PENDING
                trials.remove(retried)
                trials.append(retried)  # last in Tune's order
                scheduler.on_trial_add(None, retried)
            controller = SimpleNamespace(get_trials=lambda: trials)
            assert scheduler.choose_trial_to_run(controller) is FIFOScheduler().choose_trial_to_run(controller)
        assert all(not trial.is_finished() for trial in scheduler._unended)  # ended ones are dropped


def test_tune_keeps_as_many_trials_alive_as_fit_and_on_a_cluster_at_least_sixteen(monkeypatch):
    from altgrad.sweep import runner

    for cluster, request, on_cluster, expected in [
            ({"CPU": 64.0, "GPU": 40.0}, {"cpu": 1, "gpu": 1}, True, 40),
            ({"CPU": 64.0, "GPU": 40.0}, {"cpu": 2, "gpu": 1}, True, 32),
            ({"CPU": 100.0}, {"cpu": 1, "gpu": 0}, True, 100),
            ({"CPU": 4.0}, {"cpu": 1, "gpu": 1}, True, 16),  # an autoscaler adds the GPUs
            ({"CPU": 2.0}, {"cpu": 1, "gpu": 0}, True, 16),
            ({"CPU": 2.0}, {"cpu": 1, "gpu": 0}, False, 2),  # this machine: nothing else will appear
            ({"CPU": 2.0}, {"cpu": 4, "gpu": 0}, False, 1)]:
        monkeypatch.setattr(runner.ray, "cluster_resources", lambda: cluster)
        assert runner.max_concurrent_trials(request, on_cluster) == expected, (cluster, request, on_cluster)


@pytest.mark.parametrize("value, expected", [(None, None), ("64", 64), ("0", "error"), ("-3", "error"), ("many", "error")])
def test_the_concurrency_override_is_a_positive_integer(value, expected, monkeypatch):
    from altgrad.config import ConfigError
    from altgrad.sweep.runner import MAX_CONCURRENT_TRIALS, concurrency_override

    if value is None:
        monkeypatch.delenv(MAX_CONCURRENT_TRIALS, raising=False)
    else:
        monkeypatch.setenv(MAX_CONCURRENT_TRIALS, value)
    if expected == "error":
        with pytest.raises(ConfigError, match=MAX_CONCURRENT_TRIALS):
            concurrency_override()
    else:
        assert concurrency_override() == expected


def test_a_bad_concurrency_override_is_refused_before_anything_runs(tmp_path):
    result = altgrad("sweep", str(sweep_file(tmp_path)), "--out", str(tmp_path / "out"),
                     env={"ALTGRAD_MAX_CONCURRENT_TRIALS": "lots"})
    assert result.returncode == 2 and "ALTGRAD_MAX_CONCURRENT_TRIALS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_trainable_is_fetched_from_rays_registry_once_per_name_while_the_sweep_runs(monkeypatch):
    from ray import tune
    from ray.tune import registry

    from altgrad.sweep.runner import _trainable_lookups_cached

    class Local(tune.Trainable):
        pass

    registry.register_trainable("altgrad_test_local", Local)
    loads = []
    monkeypatch.setattr(registry, "pickle", SimpleNamespace(loads=lambda data: loads.append(data) or pickle.loads(data)))
    try:
        registry.get_trainable_cls("altgrad_test_local"), registry.get_trainable_cls("altgrad_test_local")
        assert len(loads) == 2  # Ray's own: an unpickle per lookup
        with _trainable_lookups_cached():
            first = registry.get_trainable_cls("altgrad_test_local")
            assert registry.get_trainable_cls("altgrad_test_local") is first and first.__name__ == "Local"
        assert len(loads) == 3
        assert "get" not in vars(registry._global_registry)  # the registry's own method again
        registry.get_trainable_cls("altgrad_test_local")
        assert len(loads) == 4
    finally:
        registry._global_registry.unregister(registry.TRAINABLE_CLASS, "altgrad_test_local")


def test_a_trials_reports_carry_checkpoints_except_the_last_which_ends_it(tmp_path, monkeypatch):
    # A checkpoint at the last report would only be uploaded for the driver to delete once the row is written.
    from altgrad.sweep import runner

    reports = []
    resources = SimpleNamespace(required_resources={"CPU": 1})
    monkeypatch.setattr(runner, "tune", SimpleNamespace(
        report=lambda metrics, checkpoint=None: reports.append((metrics["step"], checkpoint is not None)),
        get_checkpoint=lambda: None, Checkpoint=SimpleNamespace(from_directory=lambda directory: directory),
        get_context=lambda: SimpleNamespace(get_trial_resources=lambda: resources)))
    runner.run_trial({"cell_id": "c"}, cells={"c": {**TINY_TRIAL, "format": "E4M3"}}, root=str(tmp_path), sweep="t")
    assert reports == [(10, True), (20, True), (30, False)]
    assert len(pd.read_parquet(tmp_path / "steps" / "c.parquet")) == 30  # the trial ran whole

def test_scheduler_copes_with_missing_and_odd_metrics_without_stopping_healthy_trials():
    scheduler = RankCollapseScheduler(patience=1)
    for result in ({}, {"train_loss": None}, {"rank_warnings": float("nan")}, {"train_loss": "x"},
                   {"train_loss": 1.0, "rank_warnings": None}, {"train_loss": 3.9, "rank_warnings": 0}):
        assert decide(scheduler, "a", **result) == "CONTINUE", result


# ---- real sweeps on a local Ray --------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """A 2 x 2 sweep in which one cell's thresholds make its critical layers warn at every check."""
    tmp = tmp_path_factory.mktemp("sweep")
    trial = {**TINY_TRIAL, "steps": 60, "rank_trend": {"warmup_steps": 0}}
    path = sweep_file(tmp, trial=trial, matrix={"format": ["E4M3", "E5M2"],
                                                "rank_trend.critical_drop_threshold": [0.9, 0.0001]},
                      early_stopping={"rank_collapse": {"patience": 1}})
    result = altgrad("sweep", str(path), "--out", str(tmp / "out"))
    return tmp / "out" / "t", result


def test_a_local_sweep_lands_every_cell_with_consistent_tables(small_sweep):
    root, result = small_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    t = assert_complete(root, 4)
    assert set(t["steps"]["trial_id"]) == set(t["trials"]["trial_id"])
    assert t["trials"]["node_id"].notna().all() and t["trials"]["wall_time_s"].gt(0).all()
    span = (t["trials"]["ended_at"] - t["trials"]["started_at"]).dt.total_seconds()
    assert span.ge(t["trials"]["wall_time_s"] - 0.01).all()  # the stamps bracket the training loop
    assert str(t["trials"]["started_at"].dt.tz) == "UTC"
    assert "analyse with: altgrad report" in result.stdout
    # Ray's snapshot of the experiment keeps no metric history for trials whose row is written
    snapshot = json.loads(max((root / "_ray" / "t").glob("experiment_state-*.json")).read_text())
    assert len(snapshot["trial_data"]) == 4
    for _, metadata in snapshot["trial_data"]:
        assert json.loads(metadata)["metric_analysis"] == {} and json.loads(metadata)["metric_n_steps"] == {}


def test_the_scheduler_stops_the_collapsing_trials_and_only_them(small_sweep):
    root, _ = small_sweep
    trials = pd.read_parquet(root / "trials").set_index("trial_id")
    sensitive = trials.index.str.endswith("_0.0001")
    # A tolerance of 90% never warns; a 0.01% one warns at the first dip of a critical layer's rank.
    assert (trials.loc[~sensitive, "status"] == "completed").all()
    assert (trials.loc[~sensitive, "steps_completed"] == 60).all()
    stopped = trials[trials["status"] == "stopped"]
    assert len(stopped) >= 1 and set(stopped.index) <= set(trials.index[sensitive])
    assert (stopped["stop_reason"] == "rank_collapse").all()
    assert (stopped["steps_completed"] < 60).all() and stopped["first_warning_step"].notna().all()
    # Act mode records its decision as observe mode would: at the step it stopped.
    assert (stopped["would_stop_reason"] == "rank_collapse").all()
    assert (stopped["would_stop_step"] == stopped["steps_completed"]).all()


def test_observe_mode_lets_a_warned_trial_finish_and_records_the_decision(tmp_path):
    trial = {**TINY_TRIAL, "steps": 40, "rank_trend": {"warmup_steps": 0}}
    path = sweep_file(tmp_path, trial=trial, matrix={"rank_trend.critical_drop_threshold": [0.9, 0.0001]},
                      early_stopping={"mode": "observe", "rank_collapse": {"patience": 1}})
    result = altgrad("sweep", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "out" / "t" / "trials").set_index("trial_id")
    assert (trials["status"] == "completed").all() and (trials["steps_completed"] == 40).all()
    warned, calm = trials.loc["0.0001"], trials.loc["0.9"]
    assert warned["would_stop_reason"] == "rank_collapse" and warned["would_stop_step"] == warned["first_warning_step"]
    assert pd.isna(calm["would_stop_step"]) and pd.isna(calm["would_stop_reason"])


def test_resuming_a_finished_sweep_changes_nothing_and_says_so(small_sweep):
    root, first = small_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    trials = pd.read_parquet(root / "trials")
    counts = trials["status"].value_counts()
    assert counts.get("stopped", 0) >= 1  # rows a wrong resume would turn into "completed"
    before = file_states(root)  # the tables, and Ray's experiment: a resume must not even restore it
    result = altgrad("sweep", str(root.parent.parent / "sweep.yaml"), "--out", str(root.parent), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"nothing to resume: all 4 trials ended ({counts.get('completed', 0)} completed, "
            f"{counts.get('stopped', 0)} stopped, {counts.get('error', 0)} error)") in result.stdout
    assert file_states(root) == before


def test_a_sweeps_trials_row_is_the_row_altgrad_train_writes_for_the_same_cell(small_sweep, tmp_path):
    # The driver assembles a trial's row from the cell and the trial's reported measurements; the same
    # cell trained alone writes its own row in one piece. They agree column for column, but for where,
    # when and under which sweep it ran (one thread each, as the sweep's trials have one CPU).
    root, _ = small_sweep
    swept = pd.read_parquet(root / "trials").set_index("trial_id")
    trial_id = swept.index[swept["status"] == "completed"][0]
    cell = tmp_path / f"{trial_id}.yaml"
    cell.write_text(yaml.safe_dump(json.loads(swept.loc[trial_id, "config"])))
    result = altgrad("train", str(cell), "--out", str(tmp_path / "out"), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    alone = pd.read_parquet(tmp_path / "out" / trial_id / "trials").set_index("trial_id")
    assert list(alone.columns) == list(swept.columns)
    elsewhere = ["node_id", "wall_time_s", "started_at", "ended_at", "sweep"]
    assert swept.loc[trial_id, "sweep"] == "t" and pd.isna(alone.loc[trial_id, "sweep"])
    same = [c for c in swept.columns if c not in elsewhere]
    pd.testing.assert_series_equal(alone.loc[trial_id, same], swept.loc[trial_id, same])


def test_a_reused_actor_starts_the_next_trial_clean(tmp_path):
    # One trial at a time, so the second trial runs in the first one's process (reuse_actors). The two
    # cells differ only in how they evaluate, so their training must agree bit for bit: seeds, threads
    # and the trainer's state are the trial's own, whatever ran before it in that process.
    path = sweep_file(tmp_path, matrix={"format": ["E4M3"], "optimizer": ["grid"], "eval_iters": [2, 3]},
                      resources={"cpu": os.cpu_count()})
    result = altgrad("sweep", str(path), "--out", str(tmp_path / "out"), env={"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    t = assert_complete(tmp_path / "out" / "t", 2)
    reports = [json.loads(line) for f in (tmp_path / "out" / "t" / "_ray").rglob("result.json")
               for line in f.read_text().splitlines()]
    assert len({r["trial_id"] for r in reports}) == 2 and len({r["pid"] for r in reports}) == 1
    first, second = (g.set_index("step")[["train_loss", "grad_norm", "flips"]] for _, g in t["steps"].groupby("trial_id"))
    pd.testing.assert_frame_equal(first, second)
    assert t["trials"]["final_val_loss"].nunique() == 2  # the evaluations did differ


def test_a_crashed_trial_resumes_from_its_checkpoint_without_duplicate_rows(tmp_path):
    path = sweep_file(tmp_path, matrix={"format": ["E4M3"], "optimizer": ["adamw", "grid"]})
    result = altgrad("sweep", str(path), "--out", str(tmp_path / "out"), env={"ALTGRAD_CRASH_AT_STEP": "20"})
    assert result.returncode == 0, result.stderr[-3000:]
    t = assert_complete(tmp_path / "out" / "t", 2)
    assert (t["trials"]["status"] == "completed").all() and (t["trials"]["steps_completed"] == 30).all()


def test_a_killed_driver_resumes_with_every_cell_exactly_once_and_stopped_trials_untouched(tmp_path):
    # The 0.0001 cell warns at its first report (step 20) and stops there (patience 1); the driver is
    # killed once its row is written, while the other two cells still train.
    trial = {**TINY_TRIAL, "steps": 80, "eval_every": 20, "rank_trend": {"warmup_steps": 0}}
    path = sweep_file(tmp_path, trial=trial, matrix={"rank_trend.critical_drop_threshold": [0.0001, 0.9],
                                                     "format": ["E4M3", "E2M5"]},
                      exclude=[{"rank_trend.critical_drop_threshold": 0.0001, "format": "E2M5"}],
                      early_stopping={"rank_collapse": {"patience": 1}})
    out = tmp_path / "out"
    stopped_row = out / "t" / "trials" / "0.0001_E4M3.parquet"
    driver = subprocess.Popen([sys.executable, "-m", "altgrad.cli", "sweep", str(path), "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not stopped_row.exists():
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    assert pd.read_parquet(stopped_row).loc[0, "status"] == "stopped"
    ended_ids = set(pd.read_parquet(out / "t" / "trials")["trial_id"])
    ended = {path: state for path, state in file_states(out / "t", "trials", "steps", "layers").items()
             if path.stem in ended_ids}
    assert altgrad("sweep", str(path), "--out", str(out)).returncode == 2  # no silent overwrite
    result = altgrad("sweep", str(path), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    t = assert_complete(out / "t", 3)
    after = file_states(out / "t", "trials", "steps", "layers")
    assert {path: after[path] for path in ended} == ended  # the ended trials' files: not a byte rewritten
    trials = t["trials"].set_index("trial_id")
    assert (trials.loc["0.0001_E4M3", "status"], trials.loc["0.0001_E4M3", "stop_reason"]) == ("stopped", "rank_collapse")
    others = trials.drop(index="0.0001_E4M3")
    assert (others["status"] == "completed").all() and (others["steps_completed"] == 80).all()


def test_resume_without_a_sweep_is_refused(tmp_path, capsys):
    assert main(["sweep", str(sweep_file(tmp_path)), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no sweep" in capsys.readouterr().err


def test_wandb_offline_logs_one_run_per_trial_under_the_results_dir_without_network(tmp_path):
    path = sweep_file(tmp_path, name="wbgroup", matrix={"format": ["E4M3", "E2M5"]})
    env = {"WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}  # any network use would fail
    result = altgrad("sweep", str(path), "--out", str(tmp_path / "out"), "--wandb", "offline", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "out" / "wbgroup" / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 2
    for run in runs:  # each run records its group, the sweep's name
        assert b"wbgroup" in next(run.glob("*.wandb")).read_bytes()


@pytest.mark.parametrize("sweep_file", ["smoke.yaml", "smoke_mx.yaml", "calibrate.yaml", "full_matrix.yaml"])
def test_checking_a_sweep_and_loading_its_driver_imports_no_torch(sweep_file):
    """The driver checks cells and schedules them: torch (~2 s of CPU, ~180 MB) is the trials' workers' to
    load. (protect.yaml does load it: its layer patterns are checked against the model on the meta device.)"""
    code = ("import sys, altgrad.cli, altgrad.sweep.runner; from altgrad.sweep import load_sweep; "
            f"cells = load_sweep('sweeps/{sweep_file}').cells; "
            "print(len(cells), sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    n_cells, _, torch_modules = result.stdout.strip().partition(" ")
    assert int(n_cells) > 1 and torch_modules == "[]"


@pytest.mark.parametrize("module,names", [
    ("altgrad.scaling", ["ScalingConfig", "RECIPES", "AMAX_ALGOS", "GRANULARITIES", "SCALE_FORMATS", "SCALE_ROUNDINGS"]),
    ("altgrad.blockwise", ["SCALE_FORMATS", "SCALE_ROUNDINGS"]),
    ("altgrad.diagnostics", ["RankTrendConfig"]),
    ("altgrad.protection", ["ProtectionConfig", "MODES", "TRIGGERS"]),
    ("altgrad.layers", ["LAYER_POLICIES"]), ("altgrad.optim", ["OPTIMIZERS"]), ("altgrad.trainer", ["cell_columns"]),
])
def test_what_moved_to_altgrad_config_still_imports_from_its_old_module(module, names):
    """Research scripts (and Ray's pickled recorder of a sweep begun before the move) name them there."""
    import importlib

    import altgrad.config

    old_home = importlib.import_module(module)
    aliases = {"MODES": "PROTECTION_MODES", "TRIGGERS": "PROTECTION_TRIGGERS"}
    assert all(getattr(old_home, name) is getattr(altgrad.config, aliases.get(name, name)) for name in names)
