"""What a trial's reports cost in persistence: rewriting its step and layer files and putting its rows
in the checkpoint, at every report of a whole trial. Side by side in one run:

* before: every report converts all the rows so far to Arrow and pickles them into the checkpoint;
* after: :class:`altgrad.results.RowLog` converts each row once and checkpoints one Arrow IPC buffer.

    python benchmarks/report.py                         # the shape of sweeps/smoke.yaml's trials
    python benchmarks/report.py sweeps/full_matrix.yaml

Rows are synthetic (seeded random values in every column) with the sweep's steps, report interval,
rank-check interval and layer count.
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time

import pyarrow as pa
import torch

from altgrad import results
from altgrad.sweep import load_sweep


def synthetic_row(table: str, step: int, layer: str | None, rng: random.Random) -> dict:
    """A row with every float column of ``table`` random; a layer row also names its layer."""
    row = {field.name: rng.random() for field in results.SCHEMAS[table] if pa.types.is_floating(field.type)}
    row |= {"trial_id": "t", "format": "E4M3", "optimizer": "adamw", "step": step}
    if layer:
        row |= {"layer": layer, "rank_warning": False, "critical": False, "layer_format": "E4M3"}
    return row


def trial_persistence(cell, layers: int, root: str, row_log: bool) -> float:
    """Seconds a trial of ``cell``'s shape spends rewriting its files and checkpointing its rows."""
    rng = random.Random(0)
    logs = {table: results.RowLog(table) for table in ("steps", "layers")}
    lists: dict[str, list[dict]] = {"steps": [], "layers": []}
    spent = 0.0
    for step in range(1, cell.steps + 1):
        new = {"steps": [synthetic_row("steps", step, None, rng)], "layers": []}
        if step % cell.diagnostics.rank_every == 0:
            new["layers"] = [synthetic_row("layers", step, f"h.{i}", rng) for i in range(layers)]
        for table, rows in new.items():
            for row in rows:
                (logs[table].append if row_log else lists[table].append)(row)
        if step % cell.eval_every:
            continue
        started = time.perf_counter()
        if row_log:
            checkpoint = {table: log.to_bytes() for table, log in logs.items()}
            for table, log in logs.items():
                results.write_rows(root, table, "t", log.arrow())
        else:
            checkpoint = lists
            for table, rows in lists.items():
                results.write_rows(root, table, "t", rows)
        torch.save({"rows": checkpoint}, io.BytesIO())
        spent += time.perf_counter() - started
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", default="sweeps/smoke.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    cell = load_sweep(args.sweep).cells[0].config
    layers = 4 * cell.model.n_layer + 1
    root = tempfile.mkdtemp(prefix="altgrad-bench-report-")
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.repeats):
        for row_log in (False, True):
            best[row_log] = min(best[row_log], trial_persistence(cell, layers, root, row_log))
    reports = cell.steps // cell.eval_every
    print(f"{args.sweep}: {cell.steps} steps, {reports} reports, {layers} layers checked every "
          f"{cell.diagnostics.rank_every} steps")
    print(f"  before (all rows each report)   {best[False]:7.3f} s per trial  {best[False] / reports * 1e3:7.1f} ms/report")
    print(f"  after  (RowLog)                 {best[True]:7.3f} s per trial  {best[True] / reports * 1e3:7.1f} ms/report")
    print(f"  after / before                  {best[True] / best[False]:7.3f}x")


if __name__ == "__main__":
    main()
