"""Ctrl-C (SIGINT) and SIGTERM during `altgrad train` and `altgrad sweep`, as a user sends them to the
command's process: one line saying where it stopped and how to resume, exit 128 + the signal, what was
saved kept whole, and a resume that ends where an uninterrupted run ends."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from altgrad import cli
from tests.test_sweep import TINY_TRIAL, altgrad, sweep_file

# One thread each: the machine's cores are shared, and the runs compared must use the same count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CELL = {"steps": 60, "batch_size": 4, "eval_every": 10, "eval_iters": 1, "warmup_steps": 5,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "diagnostics": {"flips_every": 1, "rank_every": 10}}
TIMED = ["tokens_per_s"]  # the one measured, not computed, column


def start(*args, driver=None) -> subprocess.Popen:
    """The CLI (or a driver script running it) in its own process, its output captured."""
    command = ["-c", driver, *args] if driver else ["-m", "altgrad.cli", *args]
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"it ended before {path} appeared: {process.communicate()}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def the_interrupt_line(stderr: str, verb: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if re.search(r"\binterrupted\b", line, re.IGNORECASE)]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"altgrad {verb}: interrupted "), lines
    return lines[0]


def partial_files(root: Path) -> list:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


# ---- altgrad train ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cell_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "cell.yaml"
    path.write_text(yaml.safe_dump(CELL))
    return path


@pytest.fixture(scope="module")
def uninterrupted(cell_file) -> Path:
    out = cell_file.parent / "uninterrupted"
    result = altgrad("train", str(cell_file), "--out", str(out), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "cell"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda signum: signum.name)
def test_an_interrupted_train_says_where_it_stopped_and_resumes_to_the_same_run(signum, cell_file, uninterrupted):
    out = cell_file.parent / f"out-{signum.name}"
    run = start("train", str(cell_file), "--out", str(out))
    wait_for(out / "cell" / "checkpoint.pt", run)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    line = the_interrupt_line(stderr, "train")
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert 10 <= step < CELL["steps"]
    assert line.endswith(f"; resume with: altgrad train {cell_file} --out {out} --resume")
    saved = torch.load(out / "cell" / "checkpoint.pt", weights_only=True)
    assert 10 <= saved["step"] <= step and saved["step"] % CELL["eval_every"] == 0
    assert partial_files(out) == []
    assert not (out / "cell" / "trials").exists()  # it had not ended: no row says it did

    resumed = altgrad(*line.split("resume with: ")[1].split()[1:], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for table in ("steps", "layers"):
        expected = pd.read_parquet(uninterrupted / table).drop(columns=TIMED, errors="ignore")
        pd.testing.assert_frame_equal(pd.read_parquet(out / "cell" / table).drop(columns=TIMED, errors="ignore"),
                                      expected)
    trials = pd.read_parquet(out / "cell" / "trials")
    assert trials.loc[0, "status"] == "completed" and trials.loc[0, "steps_completed"] == CELL["steps"]


def test_an_interrupt_removes_the_hidden_files_of_writes_it_cut_short(tmp_path):
    kept = [tmp_path / "checkpoint.pt", tmp_path / "steps" / "cell.parquet"]
    cut_short = [tmp_path / ".checkpoint.pt.tmp", tmp_path / "steps" / ".cell.0123abcd.tmp"]
    for path in kept + cut_short:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    cli._remove_partial_writes(str(tmp_path))
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_sigterm_while_a_sweep_runs_asks_tune_to_stop_as_ctrl_c_does():
    # Ray Tune replaces the SIGINT handler while a sweep runs; a SIGTERM must reach that handler (which
    # stops the sweep and saves it) and be remembered as SIGTERM for the exit code.
    seen = []
    tune_handler = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    previous = signal.signal(signal.SIGTERM, cli._on_stop_signal)
    try:
        cli._signals_received.clear()
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGINT] and cli._signals_received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGINT, tune_handler)
        signal.signal(signal.SIGTERM, previous)


# ---- altgrad sweep ---------------------------------------------------------------------------------

# Runs the CLI with one change: Ctrl-C arrives the moment a trial's rank-warning streak reaches
# patience - 1 and the checkpoint of that report is registered, so the saved scheduler memory is what
# decides the trial's next report after the resume.
INTERRUPT_AT_STREAK = """
import os, signal, sys
from altgrad.cli import main
from altgrad.sweep.runner import SweepRecorder

def on_trial_save(self, iteration, trials, trial, **info):
    streak = self.scheduler.get_state()["streak"].get(trial.trial_id)
    if streak == self.scheduler.patience - 1 and not getattr(self, "interrupted", False):
        self.interrupted = True
        print("interrupting after step", trial.last_result["step"], flush=True)
        os.kill(os.getpid(), signal.SIGINT)

SweepRecorder.on_trial_save = on_trial_save
sys.exit(main(sys.argv[1:]))
"""


def stop_step_by_the_rule(steps: pd.DataFrame, patience: int) -> int:
    """The step at which `patience` consecutive rank checks warned, from the steps table alone."""
    streak = 0
    for step, warnings in steps.dropna(subset=["rank_warnings"]).sort_values("step")[["step", "rank_warnings"]].values:
        streak = streak + 1 if warnings > 0 else 0
        if streak == patience:
            return int(step)
    raise AssertionError("the rule never fires on this trial")


def test_an_interrupted_sweep_resumes_with_the_schedulers_memory(tmp_path):
    # Cell 0.0001 warns at every check from step 20 on; 0.9 never warns.
    trial = {**TINY_TRIAL, "steps": 50, "rank_trend": {"warmup_steps": 0}}
    path = sweep_file(tmp_path, trial=trial, matrix={"rank_trend.critical_drop_threshold": [0.0001, 0.9]},
                      early_stopping={"rank_collapse": {"patience": 2}})
    out = tmp_path / "out"
    run = start("sweep", str(path), "--out", str(out), driver=INTERRUPT_AT_STREAK)
    stdout, stderr = run.communicate(timeout=300)

    assert run.returncode == 130, stderr[-3000:]
    interrupted_after = int(stdout.split("interrupting after step ")[1].split()[0])
    line = the_interrupt_line(stderr, "sweep")
    assert line.endswith(f"; resume with: altgrad sweep {path} --out {out} --resume"), line
    ended_before = pd.read_parquet(out / "t" / "trials") if (out / "t" / "trials").exists() else pd.DataFrame()
    assert "0.0001" not in set(ended_before.get("trial_id", []))  # it was running: no row
    assert partial_files(out / "t" / "steps") == []

    result = altgrad("sweep", str(path), "--out", str(out), "--resume", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = pd.read_parquet(out / "t" / "steps")
    assert not steps.duplicated(["trial_id", "step"]).any()
    trials = pd.read_parquet(out / "t" / "trials").set_index("trial_id")
    assert trials.index.is_unique and set(trials.index) == {"0.0001", "0.9"}
    collapsing = trials.loc["0.0001"]
    expected = stop_step_by_the_rule(steps[steps["trial_id"] == "0.0001"], patience=2)
    # The streak of patience - 1 survived: the first report after the resume stops the trial.
    assert expected == interrupted_after + trial["eval_every"]
    assert (collapsing["status"], collapsing["stop_reason"], collapsing["steps_completed"]) == \
        ("stopped", "rank_collapse", expected)
    assert sorted(steps.loc[steps["trial_id"] == "0.0001", "step"]) == list(range(1, expected + 1))
    assert (trials.loc["0.9", "status"], trials.loc["0.9", "steps_completed"]) == ("completed", 50)
