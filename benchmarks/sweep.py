"""Scheduling overhead of a sweep: wall time, the sum of trial times, overhead per trial, how busy the
cores were, and how many trial-steps early stopping saved.

    python benchmarks/sweep.py                      # runs sweeps/smoke.yaml into a temp dir
    python benchmarks/sweep.py sweeps/smoke.yaml --out /tmp/bench

Trial time is what each trial's trainer measured (model build to last step); the overhead per trial is
``(slots * wall - sum of trial times) / trials``, where slots is how many trials run at once, i.e.
everything the cores spent not training: Ray start-up, actor start or reuse, imports, data loading,
result writing, and idle slots at the end of the sweep.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from altgrad import results
from altgrad.sweep import load_sweep, run_sweep
from altgrad.sweep.runner import results_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default="sweeps/smoke.yaml")
    parser.add_argument("--out", default=None, help="results root (default: a new temp dir)")
    args = parser.parse_args()
    spec = load_sweep(args.sweep)
    out = args.out or tempfile.mkdtemp(prefix="altgrad-bench-")
    started = time.perf_counter()
    run_sweep(spec, out, progress=False)
    wall = time.perf_counter() - started
    trials = results.read_table(results_root(out, spec.name), "trials")
    cpus = (spec.resources or {"cpu": 1})["cpu"]
    slots = max(1, int((os.cpu_count() or 1) // cpus))
    busy = trials["wall_time_s"].sum()
    saved = (trials["steps_planned"] - trials["steps_completed"])[trials["status"] == "stopped"].sum()
    print(f"{args.sweep}: {len(trials)} trials on {os.cpu_count()} cores ({slots} at a time)")
    print(f"  wall time (incl. Ray start)      {wall:8.1f} s")
    print(f"  sum of trial times               {busy:8.1f} s")
    print(f"  overhead per trial               {(slots * wall - busy) / len(trials):8.2f} s")
    print(f"  cores busy training              {busy / (slots * wall):8.1%}")
    print(f"  stopped early: {int((trials['status'] == 'stopped').sum())} trials, "
          f"{int(saved)} of {int(trials['steps_planned'].sum())} trial-steps saved")
    print(trials.groupby("status")["trial_id"].count().to_string())


if __name__ == "__main__":
    main()
