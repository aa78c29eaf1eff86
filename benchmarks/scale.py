"""The sweep driver at scale, simulated: its CPU time and memory per trial, and whether every row arrives
exactly once, with many trials running at once on a cluster that declares logical GPUs.

    python benchmarks/scale.py                       # 1,000 cells, 16 logical GPUs on 2 nodes
    python benchmarks/scale.py --cells 20 --gpus 4 --nodes 1 --json /tmp/scale.json

It starts its own Ray cluster on this machine (``ray start --block`` head, plus worker nodes, each in its
own process group, with its own temp dir, port and auth token; only those groups are stopped at the end).
Each node declares ``--num-gpus`` and as many logical CPUs: a GPU node has at least one core per GPU,
and the sweep file gives no ``resources``, so every trial asks for the default one GPU and one CPU,
as on a real GPU cluster. There is no CUDA here, so the trials' ``device: auto`` trains on the CPU.
The cell is trivial (a 1-layer, 16-wide model, 2 steps): what is measured is the driver.

The driver is ``altgrad sweep --address`` in a child process, as a user runs it. Its CPU time is the
exact total from the kernel when it exits (``os.wait4``'s rusage: user + system of the process);
per trial it is reported all in (total / trials) and at the margin (least-squares slope of sampled
CPU time against trials finished, which leaves out the start-up). Its resident memory is sampled from
``/proc`` every ``--sample-s``; the growth per trial is the least-squares slope of RSS against
trials finished, from the first trial's row to the end. Trials finished = rows in the ``trials`` table.
Each sample also looks for torch's library in the driver's memory map: the driver only checks cells
and schedules them, and importing torch would cost it ~2 s of CPU and ~180 MB.

Consistency is read back from the Parquet files with pandas alone: every cell's ``trials`` row present
exactly once and completed, every trial's ``steps`` rows exactly 1..steps, no duplicates, no leftover
partial files. The size of Ray's experiment folder (``_ray``) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
NAME = "scale"
# Two reports and two checkpoints per trial, as every real trial has at least (it reports at each evaluation).
CELL = {"format": "fp32", "steps": 2, "batch_size": 4, "eval_every": 1, "eval_iters": 1, "warmup_steps": 1,
        "model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16},
        "diagnostics": {"flips_every": 0, "rank_every": 0, "stats": False}}
GOALS = {"cpu_s_per_trial": 0.02, "rss_mb_per_trial": 0.1}
# `python -c CPU_PROFILER STATS_PATH ARGS...` runs `altgrad ARGS...` under cProfile timed by the process's CPU
# clock: the driver spends most of its wall time waiting on Ray, and a wall-clock profile shows that wait.
CPU_PROFILER = """import cProfile, runpy, sys, time
stats = sys.argv.pop(1)
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("altgrad.cli", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats(stats)
"""


# ---- a cluster of this machine's processes --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of one ``ray start --block``, then SIGKILL whatever of it is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive(process.pid):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.time() + 10
        while group_alive(process.pid) and time.time() < deadline:
            time.sleep(0.2)
        if not group_alive(process.pid):
            return


def alive_gpus(address: str, env: dict) -> float:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]) if out.returncode == 0 and lines else 0.0


class Cluster:
    """``nodes`` Ray nodes on this machine declaring ``gpus`` logical GPUs (and CPUs) between them."""

    def __init__(self, gpus: int, nodes: int, env: dict):
        self.temp = tempfile.mkdtemp(prefix="as", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.address = f"127.0.0.1:{free_port()}"
        self.env, self.processes = env, []
        per_node = [gpus // nodes + (i < gpus % nodes) for i in range(nodes)]
        try:
            for i, count in enumerate(per_node):
                where = (["--head", "--port", self.address.split(":")[1], "--temp-dir", self.temp,
                          "--include-dashboard", "false"] if i == 0 else ["--address", self.address])
                self.processes.append(subprocess.Popen(
                    ["ray", "start", *where, "--num-cpus", str(count), "--num-gpus", str(count), "--block",
                     "--disable-usage-stats"], env=env, start_new_session=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self._wait_for_gpus(sum(per_node[:i + 1]))
        except BaseException:
            self.stop()
            raise

    def _wait_for_gpus(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if alive_gpus(self.address, self.env) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} logical GPUs did not come up at {self.address}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_group(process)
        shutil.rmtree(self.temp, ignore_errors=True)

    @property
    def stopped(self) -> bool:
        return not any(group_alive(process.pid) for process in self.processes)


# ---- the driver, watched ---------------------------------------------------------------------------

def finished_trials(root: Path) -> int:
    folder = root / "trials"
    return sum(1 for f in folder.glob("*.parquet") if not f.name.startswith(".")) if folder.is_dir() else 0


def cpu_and_rss(pid: int) -> tuple[float, float]:
    """A process's CPU seconds so far (user + system) and resident MB, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    with open(f"/proc/{pid}/statm") as statm:
        pages = int(statm.read().split()[1])
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def mapped_torch(pid: int) -> bool:
    """Whether the process has torch's native library mapped: it imported torch (Linux)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any("libtorch" in line for line in maps)
    except (FileNotFoundError, ProcessLookupError):  # it exited just now
        return False


def exited(pid: int) -> bool:
    """Whether the child has exited, leaving it to be reaped (``WNOWAIT``) so its rusage can be read."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run_driver(sweep_file: Path, out: Path, address: str, env: dict, sample_s: float, timeout: float,
               profile: str | None = None) -> dict:
    """Run ``altgrad sweep --address``, sampling it until it exits; return its exit code, its exact CPU
    time (rusage), its output's tail, the samples (seconds, trials finished, CPU s, RSS MB), and whether
    it imported torch (seen at any sample; the driver only schedules, and should not)."""
    root, log_path = out / NAME, out / "driver.log"
    with open(log_path, "w") as log:
        altgrad = ["-c", CPU_PROFILER, profile] if profile else ["-m", "altgrad.cli"]
        driver = subprocess.Popen([sys.executable, *altgrad, "sweep", str(sweep_file), "--out", str(out),
                                   "--address", address], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples, started, torch_loaded = [], time.time(), False
    try:
        while not exited(driver.pid):
            torch_loaded = torch_loaded or mapped_torch(driver.pid)
            cpu_s, rss_mb = cpu_and_rss(driver.pid)
            if rss_mb:  # 0: it exited just now (a zombie holds no memory), and its CPU time comes from rusage
                samples.append((time.time() - started, finished_trials(root), cpu_s, rss_mb))
            if time.time() - started > timeout:
                driver.send_signal(signal.SIGINT)  # the sweep stops cleanly; its figures are partial
                timeout = float("inf")
            time.sleep(sample_s)
    except BaseException:  # interrupted here: stop the driver before its cluster goes
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=60)
        raise
    _, status, usage = os.wait4(driver.pid, 0)
    driver.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": driver.returncode, "wall_s": time.time() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime,
            "samples": samples, "torch_loaded": torch_loaded, "output_tail": log_path.read_text()[-2000:]}


# ---- the figures -------------------------------------------------------------------------------------

def slope(x, y) -> float | None:
    """Least-squares slope of y against x (None with fewer than two distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.polyfit(x, y, 1)[0]) if len(np.unique(x)) >= 2 else None


def driver_figures(run: dict, cells: int) -> dict:
    """CPU and memory per trial; the slopes over the samples taken while trials were ending (from the
    first row to the last-but-one), so start-up and shut-down stay out of them."""
    samples = np.array(run["samples"], float).reshape(-1, 4)
    _, finished, cpu, rss = samples.T
    steady = (finished >= 1) & (finished < cells)
    ended = finished >= 1
    return {"cpu_s": run["cpu_s"], "cpu_user_s": run["cpu_user_s"], "cpu_system_s": run["cpu_system_s"],
            "cpu_s_per_trial": run["cpu_s"] / cells,
            "cpu_s_per_trial_marginal": slope(finished[steady], cpu[steady]),
            "rss_mb_per_trial": slope(finished[steady], rss[steady]),
            "rss_mb_first_row": float(rss[ended][0]) if ended.any() else None,
            "rss_mb_end": float(rss[-1]) if len(rss) else None,
            "rss_mb_peak": float(rss.max()) if len(rss) else None, "samples": int(len(samples)),
            "driver_imported_torch": run["torch_loaded"],
            "trace": {"trials_finished": finished.tolist(), "cpu_s": cpu.tolist(), "rss_mb": rss.tolist()}}


def read_table(folder: Path, columns: list[str]) -> pd.DataFrame:
    """A table's rows (pyarrow skips hidden partial files), empty where no trial wrote one."""
    return pd.read_parquet(folder, columns=columns) if folder.is_dir() else pd.DataFrame(columns=columns)


def consistency(root: Path, cell_ids: list[str], steps: int) -> dict:
    """Every cell's trials row exactly once and completed; its steps rows exactly 1..steps, once each."""
    trials = read_table(root / "trials", ["trial_id", "status"])
    step_rows = read_table(root / "steps", ["trial_id", "step"])
    counts = trials["trial_id"].value_counts()
    expected = list(range(1, steps + 1))
    by_trial = step_rows.groupby("trial_id")["step"].apply(lambda s: sorted(s.tolist()) == expected)
    partial = [str(p) for folder in (root, root / "trials", root / "steps") for p in folder.glob(".*.tmp")]
    figures = {
        "cells": len(cell_ids), "trials_rows": int(len(trials)),
        "missing": len(set(cell_ids) - set(counts.index)),
        "duplicated": int((counts > 1).sum()), "unexpected": len(set(counts.index) - set(cell_ids)),
        "not_completed": int((trials["status"] != "completed").sum()),
        "steps_incomplete": int(len(set(cell_ids) - set(by_trial.index[by_trial]))),
        "steps_duplicated": int(step_rows.duplicated(["trial_id", "step"]).sum()),
        "partial_files": len(partial),
    }
    figures["consistent"] = figures["trials_rows"] == len(cell_ids) and not any(
        figures[k] for k in ("missing", "duplicated", "unexpected", "not_completed", "steps_incomplete",
                             "steps_duplicated", "partial_files"))
    return figures


def folder_size(path: Path) -> tuple[float, int]:
    """MB and file count under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


# ---- the run -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000, help="trials in the sweep (a seed axis; default 1000)")
    parser.add_argument("--gpus", type=int, default=16, help="logical GPUs (and CPUs) in all (default 16)")
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes sharing them (default 2)")
    parser.add_argument("--label", default="", help="a name for this run in the output (e.g. before/after)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between driver samples")
    parser.add_argument("--timeout-s", type=float, default=3600, help="SIGINT the driver after this long")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the driver and the cluster (e.g. a Tune setting "
                             "to measure); repeatable")
    parser.add_argument("--profile", default=None, metavar="PATH",
                        help="run the driver under cProfile timed by its CPU clock, writing its stats here (its "
                             "CPU figures then hold the profiler's cost)")
    args = parser.parse_args(argv)
    if args.cells < 2 or args.nodes < 1 or args.gpus < args.nodes:
        parser.error("need --cells >= 2 and --gpus >= --nodes >= 1")
    if any("=" not in item for item in args.env):
        parser.error(f"--env takes KEY=VALUE, got {next(i for i in args.env if '=' not in i)!r}")

    out = Path(tempfile.mkdtemp(prefix="altgrad-scale-"))
    sweep_file = out / "scale.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": NAME, "trial": CELL, "matrix": {"seed": list(range(args.cells))}}))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
           **dict(item.split("=", 1) for item in args.env)}
    try:
        cluster = Cluster(args.gpus, args.nodes, env)
        try:
            run = run_driver(sweep_file, out, cluster.address, env, args.sample_s, args.timeout_s, args.profile)
        finally:
            cluster.stop()
        return report(args, run, out, sweep_file, cluster.stopped)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def report(args, run: dict, out: Path, sweep_file: Path, cluster_stopped: bool) -> int:
    """Print the figures (and write them as JSON); 0 when the sweep succeeded and every row is there once."""
    sys.path.insert(0, str(REPO))
    from altgrad.sweep import load_sweep

    cell_ids = load_sweep(str(sweep_file)).cell_ids
    figures = {"label": args.label, "cells": args.cells, "gpus": args.gpus, "nodes": args.nodes,
               "cores": os.cpu_count(), "returncode": run["returncode"], "wall_s": run["wall_s"],
               "cluster_stopped": cluster_stopped, "env": args.env, **driver_figures(run, args.cells),
               "rows": consistency(out / NAME, cell_ids, CELL["steps"])}
    figures["ray_mb"], figures["ray_files"] = folder_size(out / NAME / "_ray")
    print_figures(figures)
    if run["returncode"] != 0:
        print(run["output_tail"], file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if run["returncode"] == 0 and figures["rows"]["consistent"] else 1


def print_figures(f: dict) -> None:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = f["rows"]
    label = f" [{f['label']}]" if f["label"] else ""
    print(f"scale{label}: {f['cells']} cells x {CELL['steps']} steps, {f['gpus']} logical GPUs on {f['nodes']} "
          f"node(s), {f['cores']} cores; driver exit {f['returncode']} after {f['wall_s']:.0f} s")
    print(f"  driver CPU per trial, all in     {number(f['cpu_s_per_trial'], '.4f')} s   "
          f"(goal <= {GOALS['cpu_s_per_trial']}; {f['cpu_s']:.1f} s in all from rusage: "
          f"{f['cpu_user_s']:.1f} user, {f['cpu_system_s']:.1f} system)")
    print(f"  driver CPU per trial, marginal   {number(f['cpu_s_per_trial_marginal'], '.4f')} s   "
          f"(least squares against trials finished)")
    print(f"  driver RSS growth per trial      {number(f['rss_mb_per_trial'], '.4f')} MB  "
          f"(goal <= {GOALS['rss_mb_per_trial']}; {number(f['rss_mb_first_row'], '.0f')} MB at the first row -> "
          f"{number(f['rss_mb_end'], '.0f')} MB at the end, peak {number(f['rss_mb_peak'], '.0f')} MB)")
    print(f"  driver imported torch            {'yes' if f['driver_imported_torch'] else 'no'}   "
          f"(libtorch in its /proc/PID/maps at any sample)")
    print(f"  Ray's experiment folder          {f['ray_mb']:.1f} MB in {f['ray_files']} files")
    print(f"  rows: {rows['trials_rows']} trials rows for {rows['cells']} cells; missing {rows['missing']}, "
          f"duplicated {rows['duplicated']}, unexpected {rows['unexpected']}, not completed {rows['not_completed']}; "
          f"steps incomplete {rows['steps_incomplete']}, duplicated {rows['steps_duplicated']}; "
          f"partial files {rows['partial_files']} -> {'consistent' if rows['consistent'] else 'INCONSISTENT'}")


if __name__ == "__main__":
    sys.exit(main())
