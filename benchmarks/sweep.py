"""Scheduling overhead of a sweep: wall time, the sum of trial times, overhead per trial, how busy the
cores were, and how many trial-steps early stopping saved.

    python benchmarks/sweep.py                      # runs sweeps/smoke.yaml into a temp dir
    python benchmarks/sweep.py sweeps/smoke.yaml --out /tmp/bench

Trial time is what each trial's trainer measured over its training loop (``wall_time_s``). Everything
else the slots spent (``slots * wall - sum of trial times``, where slots is how many trials run at once)
is overhead, split here by the trials' ``started_at``/``ended_at`` stamps into:

* Ray start-up: from the call until the first trial starts building its trainer, and shut-down after
  the last one ends (once per sweep);
* per-trial overhead: building the trainer (data, model, optimizer) plus the gap between a trial
  ending and the next one starting on the same slot (Ray's scheduling, actor start or reuse);
* tail: slots left idle at the end because no trial is left to start (set by trial lengths).

Trial time itself holds a warm-up: a worker's first steps load (or, with a cold cache, build) the
torch.compile kernels. It is shown as the first steps' time above each trial's median step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from altgrad import results
from altgrad.analysis import trial_lanes
from altgrad.sweep import load_sweep, run_sweep
from altgrad.sweep.runner import results_root


def slot_gaps_and_tail(trials) -> tuple[float, float]:
    """Seconds between consecutive trials on a slot, summed, and seconds slots sat idle after their last
    trial until the sweep's last trial ended (slots as :func:`altgrad.analysis.trial_lanes` places them)."""
    trials = trials.assign(lane=trial_lanes(trials))
    gaps, last_ends = 0.0, []
    for _, slot in trials.sort_values("started_at").groupby(["node_id", "lane"]):
        gaps += float((slot["started_at"].iloc[1:].to_numpy() - slot["ended_at"].iloc[:-1].to_numpy()).sum())
        last_ends.append(slot["ended_at"].max())
    return gaps, sum(max(last_ends) - end for end in last_ends)


def warm_up_seconds(steps, tokens_per_step: dict[str, int], first: int = 3) -> float:
    """Time the first ``first`` steps of every trial took beyond that trial's median step."""
    excess = 0.0
    for trial_id, trial in steps.groupby("trial_id"):
        seconds = tokens_per_step[trial_id] / trial.sort_values("step")["tokens_per_s"]
        excess += float((seconds.head(first) - seconds.median()).clip(lower=0).sum())
    return excess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default="sweeps/smoke.yaml")
    parser.add_argument("--out", default=None, help="results root (default: a new temp dir)")
    args = parser.parse_args()
    spec = load_sweep(args.sweep)
    out = args.out or tempfile.mkdtemp(prefix="altgrad-bench-")
    called = time.time()
    run_sweep(spec, out, progress=False)
    returned = time.time()
    wall = returned - called
    trials = results.read_table(results_root(out, spec.name), "trials")
    for column in ("started_at", "ended_at"):
        trials[column] = trials[column].map(lambda t: t.timestamp())
    n = len(trials)
    cpus = (spec.resources or {"cpu": 1})["cpu"]
    slots = max(1, int((os.cpu_count() or 1) // cpus))
    busy = trials["wall_time_s"].sum()
    setup = (trials["ended_at"] - trials["started_at"] - trials["wall_time_s"]).sum()
    gaps, tail = slot_gaps_and_tail(trials)
    start_up = trials["started_at"].min() - called
    shut_down = returned - trials["ended_at"].max()
    tokens = {c.cell_id: c.config.batch_size * c.config.model.block_size for c in spec.cells}
    warm_up = warm_up_seconds(results.read_table(results_root(out, spec.name), "steps"), tokens)
    saved = (trials["steps_planned"] - trials["steps_completed"])[trials["status"] == "stopped"].sum()
    print(f"{args.sweep}: {n} trials on {os.cpu_count()} cores ({slots} at a time)")
    print(f"  wall time (incl. Ray start)      {wall:8.1f} s")
    print(f"  sum of trial times               {busy:8.1f} s")
    print(f"    of which first-step warm-up    {warm_up:8.1f} s   (loading torch.compile kernels)")
    print(f"  cores busy training              {busy / (slots * wall):8.1%}")
    print(f"  overhead per trial, all in       {(slots * wall - busy) / n:8.2f} s")
    print(f"    per-trial (setup + gap)        {(setup + gaps) / n:8.2f} s   "
          f"(trainer setup {setup / n:.2f} s, slot gap {gaps / n:.2f} s)")
    print(f"    Ray start-up + shut-down       {start_up:8.1f} s + {shut_down:.1f} s, once per sweep")
    print(f"    idle slots at the end          {tail:8.1f} s, once per sweep")
    print(f"  stopped early: {int((trials['status'] == 'stopped').sum())} trials, "
          f"{int(saved)} of {int(trials['steps_planned'].sum())} trial-steps saved")
    print(trials.groupby("status")["trial_id"].count().to_string())


if __name__ == "__main__":
    main()
