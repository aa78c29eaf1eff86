"""benchmarks/scale.py: its consistency check against constructed tables, and a small run of it in which
every cell's rows arrive exactly once (figures are reported, never asserted: timing is the machine's)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)

CLEAN = {"cells": 3, "trials_rows": 3, "missing": 0, "duplicated": 0, "unexpected": 0, "not_completed": 0,
         "steps_incomplete": 0, "steps_duplicated": 0, "partial_files": 0, "consistent": True}


def write_results(root: Path, trials: list[tuple[str, str]], steps: list[tuple[str, int]]) -> None:
    """One file per trial, as the sweep writes them."""
    for table, rows, columns in (("trials", trials, ["trial_id", "status"]), ("steps", steps, ["trial_id", "step"])):
        (root / table).mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(rows, columns=columns)
        for number, (trial_id, group) in enumerate(frame.groupby("trial_id")):
            group.to_parquet(root / table / f"{trial_id}-{number}.parquet")


GOOD_STEPS = [(c, s) for c in ("s0", "s1", "s2") for s in (1, 2)]


@pytest.mark.parametrize("trials,steps,partial,wrong", [
    ([("s0", "completed"), ("s1", "completed"), ("s2", "completed")], GOOD_STEPS, False, {}),
    ([("s0", "completed"), ("s1", "completed")], GOOD_STEPS, False,
     {"trials_rows": 2, "missing": 1, "consistent": False}),
    ([("s0", "completed"), ("s1", "completed"), ("s2", "completed"), ("s2", "completed")], GOOD_STEPS, False,
     {"trials_rows": 4, "duplicated": 1, "consistent": False}),
    ([("s0", "completed"), ("s1", "stopped"), ("s2", "completed"), ("s9", "completed")], GOOD_STEPS, False,
     {"trials_rows": 4, "unexpected": 1, "not_completed": 1, "consistent": False}),
    ([("s0", "completed"), ("s1", "completed"), ("s2", "completed")], GOOD_STEPS[:-1] + [("s0", 2)], False,
     {"steps_incomplete": 2, "steps_duplicated": 1, "consistent": False}),
    ([("s0", "completed"), ("s1", "completed"), ("s2", "completed")], GOOD_STEPS, True,
     {"partial_files": 1, "consistent": False}),
])
def test_the_consistency_check_counts_each_fault(tmp_path, trials, steps, partial, wrong):
    write_results(tmp_path, trials, steps)
    if partial:
        (tmp_path / "trials" / ".s2.abc.tmp").write_bytes(b"")
    assert scale.consistency(tmp_path, ["s0", "s1", "s2"], steps=2) == {**CLEAN, **wrong}


def test_the_slope_is_least_squares():
    assert scale.slope([1, 2, 3, 4], [10, 12, 14, 16]) == pytest.approx(2.0)
    assert scale.slope([1, 2, 3], [0, 3, 3]) == pytest.approx(1.5)  # by hand: sum(dx*dy) / sum(dx^2) = 3/2
    assert scale.slope([5, 5], [1, 2]) is None


def test_mapped_torch_tells_a_process_that_imported_torch_from_one_that_did_not():
    def waiting(code):  # a child that has run ``code`` and waits on its stdin
        child = subprocess.Popen([sys.executable, "-c", code + "; print('ready', flush=True); input()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child

    children = {}
    try:
        for code in ("import torch", "import json"):
            children[code] = waiting(code)  # one at a time: a child started is a child stopped below
        assert {code: scale.mapped_torch(c.pid) for code, c in children.items()} == {"import torch": True,
                                                                                     "import json": False}
    finally:
        for child in children.values():
            child.communicate("\n", timeout=60)


def test_a_small_sweep_on_a_logical_gpu_cluster_writes_every_row_exactly_once(tmp_path):
    out = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, "benchmarks/scale.py", "--cells", "12", "--gpus", "4", "--nodes", "1",
                             "--sample-s", "0.2", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["rows"] == {**CLEAN, "cells": 12, "trials_rows": 12}
    assert figures["returncode"] == 0 and figures["cluster_stopped"]
    assert figures["driver_imported_torch"] is False  # it schedules; the trials' workers import torch
    assert figures["cpu_s"] > 0 and figures["samples"] > 0 and figures["ray_files"] > 0
    assert 0 < figures["cpu_user_s"] <= figures["cpu_s"] and 0 <= figures["cpu_system_s"] <= figures["cpu_s"]
    assert "consistent" in result.stdout and "INCONSISTENT" not in result.stdout
