"""Runs a sweep on Ray Tune: one trial per cell, each running the :class:`~altgrad.trainer.Trainer`.

Trials write their own ``steps`` and ``layers`` files straight to the results root (local, NFS or an
object store), so remote workers never need the head's disk. The driver writes the ``trials`` table,
because only it knows how a trial ended: a :class:`SweepRecorder` callback takes each trial's last
report, the stop reason the scheduler gave it, and any error, and writes its row the moment it ends.

The ``trials`` table is the record of which trials ended: ``--resume`` never runs, and never rewrites
the files of, a trial with a row, whatever Ray's last snapshot of the experiment says; the others
continue from their checkpoints. The recorder's state (stop reasons, and the scheduler's memory, which
Ray does not restore) is saved by Ray with the experiment, so both survive a driver restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray
from ray import tune
from tqdm.auto import tqdm

from altgrad import results
from altgrad.config import ConfigError, cell_columns, parse_cell
from altgrad.sweep.scheduler import RankCollapseScheduler
from altgrad.sweep.spec import SweepSpec

CHECKPOINT_FILE = "trainer.pt"
# The report key carrying the trainer's measured row columns (one JSON string: Tune keeps running
# statistics of every number a trial reports). The recorder takes it out of each result it is handed.
MEASURED = "trial_measured"
# Fault injection for checking recovery: every trial crashes once, right after the report of this step
# (its checkpoint saved), and Ray restarts it from that checkpoint (FailureConfig.max_failures).
CRASH_AT_STEP = "ALTGRAD_CRASH_AT_STEP"
WANDB_MODES = ("off", "offline", "online")
# On a cluster, at least this many trials alive at once: the demand an autoscaler needs to start every GPU
# worker of cluster.yaml. A user with a larger autoscaling cluster sets the environment variable.
MIN_CLUSTER_TRIALS = 16
MAX_CONCURRENT_TRIALS = "ALTGRAD_MAX_CONCURRENT_TRIALS"


def results_root(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


def _absolute(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


# ---- the trial ----------------------------------------------------------------------------------

def run_trial(config: dict, *, cells: dict, root: str, sweep: str, ended: frozenset = frozenset()) -> None:
    """Ray Tune's function trainable: train one cell, reporting through ``tune.report``.

    An actor may be reused for the next trial (``reuse_actors``): everything a trial depends on is set
    here (seeds inside the Trainer, the thread count from the trial's CPUs). A cell in ``ended`` (its
    row was written before the driver restarted) returns at once, touching nothing. The trainer (and
    torch) is imported here, on the trial's worker: a driver on a cluster does not import torch."""
    from altgrad.trainer import Trainer

    cell_id = config["cell_id"]
    if cell_id in ended:
        return
    cell = parse_cell(cells[cell_id], f"cell {cell_id}")
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch_threads(max(1, int(cpus)))
    workdir = Path(tempfile.mkdtemp(prefix=f"altgrad-{cell_id}-"))
    checkpoint_path = workdir / CHECKPOINT_FILE
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            shutil.copy(Path(directory) / CHECKPOINT_FILE, checkpoint_path)
    trainer = Trainer(cell, trial_id=cell_id, results_root=root, checkpoint_path=checkpoint_path,
                      progress=False, sweep=sweep)

    crash_at = int(os.environ.get(CRASH_AT_STEP, 0))

    def report(metrics: dict, checkpoint: Path | None) -> None:
        metrics = {**metrics, MEASURED: json.dumps(trainer.measured())}
        # The last report ends the trial, and its row, not a checkpoint, records it: a checkpoint here would
        # be uploaded only for the driver to delete it (_drop_checkpoints), at one more round trip per trial.
        last = metrics["step"] >= cell.steps or metrics["stop_reason"] is not None
        if checkpoint is None or last:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint.parent)))
        if crash_at and restored is None and metrics["step"] >= crash_at:
            raise RuntimeError(f"{CRASH_AT_STEP}: crashing once after step {metrics['step']}, as asked")

    try:
        trainer.run(report=report, resume=restored is not None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---- the driver's bookkeeping --------------------------------------------------------------------

class SweepRecorder(tune.Callback):
    """Writes each trial's ``trials`` row when it ends, and owns the sweep's scheduler.

    ``ended`` holds the rows already written ({cell id: status}): those trials keep them untouched.
    Its state (each running trial's last measured columns and stop decisions, and the scheduler's
    memory) is saved by Ray with the experiment and restored on ``--resume``. It holds trials until
    their row is written: what Ray snapshots grows with the trials running, not with the sweep."""

    def __init__(self, spec: SweepSpec, root: str, progress: bool = True, ended: dict[str, str] | None = None):
        self.cells = {cell.cell_id: cell for cell in spec.cells}
        self.root, self.sweep = root, spec.name
        self.stop_reasons: dict[str, str] = {}  # acted on: the trial was stopped
        self.would_stop: dict[str, tuple[int | None, str]] = {}  # the first decision, acted on or not
        self.measured: dict[str, str] = {}  # the last report's measured columns (JSON), by Ray's trial id
        self.finished: dict[str, str] = dict(ended or {})  # cell id -> status
        self.status_counts = Counter(self.finished.values())  # for the progress bar, without a scan per trial
        self.scheduler = build_scheduler(spec, on_decision=self.record_decision)
        self.progress = progress
        self._bar = None

    # Ray saves and restores this with the experiment state.
    def get_state(self) -> dict:
        return {"stop_reasons": dict(self.stop_reasons), "would_stop": dict(self.would_stop),
                "measured": dict(self.measured), "scheduler": self.scheduler.get_state()}

    def set_state(self, state: dict) -> None:
        self.stop_reasons.update(state.get("stop_reasons", {}))
        self.would_stop.update({k: tuple(v) for k, v in state.get("would_stop", {}).items()})
        self.measured.update(state.get("measured", {}))
        self.scheduler.set_state(state.get("scheduler", {}))

    def record_decision(self, trial_id: str, reason: str, result: dict, acted: bool) -> None:
        """A rule's decision to stop, remembered by Ray's trial id until the trial's row is written: the
        first one as would_stop (in both modes), and the reason of one acted on."""
        step = result.get("step")
        self.would_stop.setdefault(trial_id, (None if step is None else int(step), reason))
        if acted:
            self.stop_reasons[trial_id] = reason

    def setup(self, **info) -> None:
        if self.progress:
            self._bar = tqdm(total=len(self.cells), initial=len(self.finished), unit="trial", desc=self.sweep)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """Keeps the measured columns here, out of the result Ray stores, encodes and snapshots for every
        trial of the sweep (Ray lets callbacks modify a result in place; this one runs first)."""
        measured = result.pop(MEASURED, None)
        if measured is not None:
            self.measured[trial.trial_id] = measured

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._write(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._write(trial, error=_error_text(trial))

    def on_experiment_end(self, trials, **info) -> None:
        """Rows for trials that ended without a callback (restored by Ray as ended, a row missing).
        A trial neither done nor failed was interrupted: it gets no row, and ``--resume`` continues it."""
        for trial in trials:
            if trial.status == trial.ERROR:
                self._write(trial, error=_error_text(trial))
            elif (trial.last_result or {}).get("done"):
                self._write(trial, error=None)
        if self._bar:
            self._bar.close()

    def _write(self, trial, error: str | None) -> None:
        cell_id = trial.config["cell_id"]
        if cell_id in self.finished:
            return  # an ended trial keeps its row
        # A trial restored from a checkpoint and ended before reporting again: its checkpoint's report.
        measured = self.measured.get(trial.trial_id) or (trial.last_result or {}).get(MEASURED)
        row = self.row(cell_id, measured, self.stop_reasons.get(trial.trial_id), error,
                       self.would_stop.get(trial.trial_id, (None, None)))
        results.write_rows(self.root, "trials", cell_id, [row])
        self.finished[cell_id] = row["status"]
        self.status_counts[row["status"]] += 1
        for memory in (self.measured, self.stop_reasons, self.would_stop):
            memory.pop(trial.trial_id, None)  # in the row now
        _drop_checkpoints(trial)
        _drop_metric_history(trial)
        if self._bar:
            self._bar.set_postfix({status: self.status_counts[status] for status in ("stopped", "error")}, refresh=False)
            self._bar.update(1)  # redraws, postfix included, at most every tqdm's mininterval

    def row(self, cell_id: str, measured: str | None, scheduler_reason: str | None, error: str | None,
            would_stop: tuple[int | None, str | None] = (None, None)) -> dict:
        """The trials row from the cell, the columns the trial's last report measured (none when it
        failed while starting: null), how it ended, and the first decision a stopping rule took about it."""
        cell = self.cells[cell_id].config
        summary = {**cell_columns(cell, cell_id, self.sweep), "steps_completed": 0,
                   **(json.loads(measured) if measured else {})}
        summary["would_stop_step"], summary["would_stop_reason"] = would_stop
        if summary["steps_completed"] >= summary["steps_planned"]:
            scheduler_reason = None  # a STOP at the last report saved nothing: the run is complete
        reason = scheduler_reason or summary.get("stop_reason")
        if error is not None:
            summary.update(status="error", stop_reason="error", error=error)
        elif reason:
            summary.update(status="stopped", stop_reason=reason)
        else:
            summary.update(status="completed", stop_reason=None)
        return summary


def _drop_checkpoints(trial) -> None:
    """An ended trial never runs again (its row says so): its checkpoints in Ray's folder are dead weight.
    Deleting them here, rather than keeping the last few with ``num_to_keep`` (which forces a whole
    experiment snapshot at every checkpoint), keeps the driver's cost per trial flat."""
    try:
        trial.storage.storage_filesystem.delete_dir(trial.storage.trial_fs_path)
    except (FileNotFoundError, OSError):
        pass


def _drop_metric_history(trial) -> None:
    """Tune keeps, per trial and per number it ever reported, running statistics (max, min, mean, the
    last 5 and 10 values) for its own result analysis, which the sweep never asks for; they are most of
    what each ended trial adds to every experiment snapshot and to the driver's memory. The row holds
    the trial's results now."""
    trial.run_metadata.metric_analysis = {}  # assigning (not clearing) drops Tune's cached JSON of them
    trial.run_metadata.metric_n_steps = {}


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "trial failed"


# ---- the sweep -----------------------------------------------------------------------------------

def default_resources() -> dict:
    """One GPU per trial where the cluster has GPUs, else one CPU (Ray must be running)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"cpu": 1, "gpu": 1} if gpus >= 1 else {"cpu": 1, "gpu": 0}


def check_resources(spec: SweepSpec, request: dict, capacity: list[dict]) -> None:
    """Refuse a per-trial request that no node can ever hold (it would wait forever)."""
    for node in capacity:
        if node.get("CPU", 0) >= request["cpu"] and node.get("GPU", 0) >= request["gpu"]:
            return
    biggest = max(capacity, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    raise ConfigError(spec.source, "resources", f"cpu={request['cpu']}, gpu={request['gpu']} per trial fits no "
                                                f"node (largest: cpu={biggest.get('CPU', 0):g}, "
                                                f"gpu={biggest.get('GPU', 0):g})")


def local_capacity() -> list[dict]:
    """This machine's resources, for checking a local sweep before Ray starts."""
    import torch

    return [{"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}]


def max_concurrent_trials(request: dict, on_cluster: bool) -> int:
    """How many trials Tune keeps alive at once (running, or waiting for resources): as many as fit on the
    cluster now, and on a cluster at least MIN_CLUSTER_TRIALS (``ALTGRAD_MAX_CONCURRENT_TRIALS`` overrides).

    Tune's default makes a trial for every cell it may (up to 200 waiting), each requesting its own actor
    and placement group; with ``reuse_actors`` a trial that ends hands its actor to a waiting trial, which
    cancels its request, and the next waiting trial makes a new one: an actor and a placement group
    requested and cancelled per trial. With no more trials alive than run, a new trial takes the freed
    actor at once (benchmarks/scale.py: README, Speed)."""
    resources = ray.cluster_resources()
    slots = [resources.get(key.upper(), 0) // amount for key, amount in request.items() if amount]
    fit = max(1, int(min(slots, default=1)))
    return max(MIN_CLUSTER_TRIALS, fit) if on_cluster else fit


def concurrency_override() -> int | None:
    """``ALTGRAD_MAX_CONCURRENT_TRIALS`` from the environment, checked: a positive integer, or None."""
    value = os.environ.get(MAX_CONCURRENT_TRIALS)
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError("environment", MAX_CONCURRENT_TRIALS, f"{value!r} is not a positive integer")
    return int(value)


def node_capacity() -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def build_scheduler(spec: SweepSpec, on_decision=None) -> RankCollapseScheduler:
    early = spec.early_stopping
    asha = None
    if "asha" in early:
        from ray.tune.schedulers import ASHAScheduler

        settings = early["asha"]
        asha = ASHAScheduler(time_attr="step", metric="val_loss", mode="min",
                             max_t=int(settings.get("max_t", max(c.config.steps for c in spec.cells))),
                             grace_period=int(settings.get("grace_period", 1)),
                             reduction_factor=settings.get("reduction_factor", 4))
    return RankCollapseScheduler(patience=int(early.get("rank_collapse", {}).get("patience", 2)),
                                 loss_factor=float(early.get("divergence", {}).get("loss_factor", 4.0)),
                                 asha=asha, mode=early.get("mode", "act"), on_decision=on_decision,
                                 action=early.get("rank_collapse", {}).get("action", "stop"))


def experiment_path(out: str, name: str) -> str:
    """Where Ray keeps the experiment (under the results root, in a folder readers skip)."""
    return f"{results_root(out, name)}/_ray"


class SweepInterrupted(KeyboardInterrupt):
    """Ray Tune stopped the sweep on SIGINT (Ctrl-C) before every trial ended. The experiment's state
    was saved: ``run_sweep(..., resume=True)`` continues the ``unfinished`` cells."""

    def __init__(self, statuses: dict[str, str], unfinished: list[str]):
        total = len(statuses) + len(unfinished)
        super().__init__(f"with {len(statuses)} of {total} trials ended")
        self.statuses, self.unfinished = statuses, unfinished


def ended_trials(out: str, name: str) -> dict[str, str]:
    """{cell id: status} of the trials whose row the sweep has written: the trials that ended."""
    rows = results.read_table(results_root(_absolute(out), name), "trials")
    return dict(zip(rows["trial_id"], rows["status"]))


def run_sweep(spec: SweepSpec, out: str, *, address: str | None = None, resume: bool = False,
              wandb: str = "off", progress: bool = True) -> dict[str, str]:
    """Run (or with ``resume``, continue) the sweep; return {cell id: status}. Raises
    :class:`SweepInterrupted` when Ctrl-C stopped it first. A resume with every trial ended returns
    their statuses without starting Ray."""
    out = _absolute(out)
    root = results_root(out, spec.name)
    if resume and not results.has_results(root) and not _experiment_exists(out, spec.name):
        raise ConfigError(spec.source, "--resume", f"no sweep {spec.name!r} to resume under {out}")
    if not resume and (results.has_results(root) or _experiment_exists(out, spec.name)):
        raise ConfigError(spec.source, "name", f"{root} already holds sweep {spec.name!r}: pass --resume to "
                                               f"continue it, or choose another --out or name")
    ended = ended_trials(out, spec.name) if resume else {}
    if set(spec.cell_ids) <= ended.keys():
        return {**{cell_id: ended[cell_id] for cell_id in spec.cell_ids}, "_wall_time_s": 0.0}
    if address is None and spec.resources is not None:
        check_resources(spec, spec.resources, local_capacity())
    override = concurrency_override()
    env = _wandb_environment(wandb, root)
    if CRASH_AT_STEP in os.environ:
        env[CRASH_AT_STEP] = os.environ[CRASH_AT_STEP]
    os.environ.update(env)  # before Ray starts: workers inherit it
    # Tune's own CSV, JSON and TensorBoard files per trial copy what the tables hold, and cost the driver
    # more per trial than the rest of its bookkeeping (benchmarks/scale.py); without them, no TensorBoard hint.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune snapshots the whole experiment every ~10 s by default, re-encoding every trial it knows; once a
    # minute is enough here: an ended trial is kept by its row, and a driver killed outright costs the
    # trials then running at most a minute's progress (they resume from the snapshot's checkpoints).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "60")
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, ignore_reinit_error=True,
             log_to_driver=False, include_dashboard=False if address is None else None)
    try:
        request = spec.resources or default_resources()
        try:
            check_resources(spec, request, node_capacity())
        except ConfigError as error:
            if address is None:
                raise
            # An autoscaling cluster may add a node that fits; its trials wait for it.
            print(f"altgrad sweep: warning: {error}; trials wait for the autoscaler to add one", file=sys.stderr)
        recorder = SweepRecorder(spec, root, progress=progress, ended=ended)
        callbacks = [recorder, *_wandb_callbacks(wandb, spec.name)]
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, cells={c.cell_id: c.raw for c in spec.cells}, root=root,
                                 sweep=spec.name, ended=frozenset(ended)),
            {"cpu": request["cpu"], "gpu": request["gpu"]})
        if resume:
            tuner = _restore(_experiment_dir(out, spec.name), trainable, recorder.scheduler, callbacks)
        else:
            limit = override or max_concurrent_trials(request, on_cluster=address is not None)
            tuner = tune.Tuner(
                trainable,
                param_space={"cell_id": None},  # named only: each point gives it (a falsy value, so no warning)
                tune_config=tune.TuneConfig(
                    scheduler=recorder.scheduler, reuse_actors=True, num_samples=len(spec.cell_ids),
                    search_alg=_one_trial_per_cell(spec, limit)),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=experiment_path(out, spec.name), verbose=0,
                    failure_config=tune.FailureConfig(max_failures=2),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # see _drop_checkpoints
                    callbacks=callbacks),
            )
        started = time.perf_counter()
        with _quiet_tune_messages(), _trainable_lookups_cached():
            tuner.fit()
        statuses = {cell_id: recorder.finished[cell_id] for cell_id in spec.cell_ids if cell_id in recorder.finished}
        unfinished = [cell_id for cell_id in spec.cell_ids if cell_id not in recorder.finished]
        if unfinished:
            raise SweepInterrupted(statuses, unfinished)
        statuses["_wall_time_s"] = time.perf_counter() - started
        return statuses
    finally:
        ray.shutdown()


def _one_trial_per_cell(spec: SweepSpec, max_concurrent: int):
    """One trial per cell, in the sweep's order, each config being ``{"cell_id": ...}``, with at most
    ``max_concurrent`` alive at once. Given as points to evaluate (the param space only names the key)
    rather than ``tune.grid_search(cell_ids)``: Tune deep-copies a grid's whole value list for every trial
    it makes from it, which costs the driver time quadratic in the number of cells."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=[{"cell_id": cell_id} for cell_id in spec.cell_ids],
                                 max_concurrent=max_concurrent)


def _restore(path: str, trainable, scheduler: RankCollapseScheduler, callbacks: list) -> tune.Tuner:
    """``Tuner.restore``, running this driver's scheduler and callbacks. Ray would run the copies
    pickled when the sweep started, as they were then, with no public way to reach them
    (ray-project/ray#41364): the recorder here is the one Ray restores state into, and the one whose
    rows this driver reads. Errored trials are resumed only where no row says they ended."""
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    restored = tuner._local_tuner
    restored._tune_config.scheduler = scheduler
    restored.get_run_config().callbacks = callbacks
    return tuner


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Tune's own words on an interrupt (how to resume through ``Tuner.restore``): the sweep says it in
# altgrad's terms instead.
INTERRUPT_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")
# With Tune's loggers off no trial has a result.json or progress.csv, and the result grid that ``fit``
# returns, which the sweep never reads, warns that it found none: the tables hold the results.
MISSING_RESULT_FILES = ("Failed to fetch metrics",)


@contextlib.contextmanager
def _quiet_tune_messages():
    drops = [(logging.getLogger("ray.tune.tune"), _DropMessages(INTERRUPT_MESSAGES))]
    if os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS") == "1":
        drops.append((logging.getLogger("ray.tune.analysis.experiment_analysis"), _DropMessages(MISSING_RESULT_FILES)))
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)


@contextlib.contextmanager
def _trainable_lookups_cached():
    """Tune's driver looks the trainable up in Ray's registry each time it creates a trial and each time
    it requests an actor for one: a GCS round trip and an unpickle of the wrapped class (its resources
    and parameter references) every time, two per trial and an eighth of the driver's CPU time
    (benchmarks/scale.py). The trainable is registered once, before ``fit``, and never changes while it
    runs: one lookup per name is enough."""
    from ray.tune.registry import TRAINABLE_CLASS, _global_registry

    registry_get = _global_registry.get
    trainables: dict = {}

    def get(category, key):
        if category != TRAINABLE_CLASS:
            return registry_get(category, key)
        if key not in trainables:
            trainables[key] = registry_get(category, key)
        return trainables[key]

    _global_registry.get = get
    try:
        yield
    finally:
        del _global_registry.get  # the class's own method again


def _experiment_dir(out: str, name: str) -> str:
    return f"{experiment_path(out, name)}/{name}"


def _experiment_exists(out: str, name: str) -> bool:
    try:
        return tune.Tuner.can_restore(_experiment_dir(out, name))
    except Exception:  # an unreachable or malformed location is "nothing to restore"
        return False


def _wandb_environment(mode: str, root: str) -> dict:
    if mode not in WANDB_MODES:
        raise ConfigError("--wandb", "mode", f"{mode!r} is not one of {', '.join(WANDB_MODES)}")
    if mode == "off":
        return {}
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("--wandb", "online", "needs WANDB_API_KEY in the environment (or use offline)")
    if "://" in root:
        raise ConfigError("--wandb", mode, "writes its files locally; use a local --out with W&B")
    directory = Path(root) / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    return {"WANDB_MODE": mode, "WANDB_DIR": str(directory), "WANDB_SILENT": "true"}


def _wandb_callbacks(mode: str, group: str) -> list:
    if mode == "off":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class FlushingLoggingActor(_WandbLoggingActor):
        """Ray kills a trial's logging actor as soon as its ``run`` returns, and ``wandb.finish`` can
        return before wandb's service has written the run out (a killed process runs no atexit hook):
        an offline run then holds only its header. ``teardown`` waits for the service to finish."""

        def run(self):
            super().run()
            self._wandb.teardown()

    class FlushingWandbLoggerCallback(WandbLoggerCallback):
        _logger_actor_cls = FlushingLoggingActor

    return [FlushingWandbLoggerCallback(project="altgrad", group=group, log_config=True)]


