"""One test-matrix cell, end to end: the instrumented FP8 training loop.

A :class:`Trainer` builds the model for a :class:`~altgrad.config.CellConfig` (format × optimizer ×
layer policy × seed), trains it, and records three kinds of rows (section 5 of CONTRACT.md):

* ``steps``, every step: losses, lr, grad norm, flips/updates/stall ratio, overflow/underflow, tokens/s;
* ``layers``, every ``rank_every`` steps: per-layer rank metrics, flip rate, stall ratio, warnings;
* one ``trials`` summary, returned by :meth:`Trainer.run` (the caller writes it: the CLI for one cell,
  the sweep driver for a sweep, since only it knows when Ray stopped a trial).

Every ``eval_every`` steps it evaluates on fixed validation batches, checkpoints, flushes its rows,
and calls ``report(metrics, checkpoint_path)``: the one callback through which the sweep hands the same
metrics to Ray Tune. A checkpoint holds everything, rows included, so a resumed run continues bit for
bit and rewrites its row files without duplicates or gaps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from altgrad import results
from altgrad.config import CellConfig, ConfigError, cell_columns
from altgrad.data import get_batch, load_data, validation_batches
from altgrad.failure import label_failure
from altgrad.layers import QuantLinear, apply_policy
from altgrad.model import GPT, GPTConfig
from altgrad.optim import build_optimizer, grid_weight_scaling
from altgrad.probes import PROBES
from altgrad.protection import ProtectionController
from altgrad.scaling import Scaler

Report = Callable[[dict, "Path | None"], None]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def lr_factor(step: int, cell: CellConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0.1 at the last step."""
    if step < cell.warmup_steps:
        return (step + 1) / cell.warmup_steps
    progress = (step - cell.warmup_steps) / max(1, cell.steps - cell.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def node_id() -> str:
    """Ray's node id inside a Ray worker, else this machine's host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray absent or not running here: the host name identifies the node
        pass
    return socket.gethostname()


def _mean(values: list) -> float | None:
    """Mean of the measured values (None: not measured; NaN: measured non-finite, and it propagates)."""
    measured = [v for v in values if v is not None]
    return sum(measured) / len(measured) if measured else None


class Trainer:
    """Trains one cell. Build it, then :meth:`run`; :meth:`run` resumes from ``checkpoint_path`` if
    ``resume`` and the file exists."""

    def __init__(self, cell: CellConfig, *, trial_id: str, results_root: str | None = None,
                 checkpoint_path: str | Path | None = None, progress: bool = True, sweep: str | None = None):
        started_at = time.time()
        self.cell, self.trial_id, self.results_root, self.sweep = cell, trial_id, results_root, sweep
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress
        self.device = resolve_device(cell.device)
        torch.manual_seed(cell.seed)
        self.data = load_data(cell.data)
        model_config = GPTConfig(vocab_size=self.data.vocab_size, **dataclasses.asdict(cell.model))
        self.model = GPT(model_config)
        self.formats = apply_policy(self.model, cell.format, cell.layers, grad_format=cell.grad_format,
                                    scaling=cell.scaling)
        self.model.to(self.device)
        self.layers = {name: m for name, m in self.model.named_modules() if isinstance(m, QuantLinear)}
        for layer in self.layers.values():
            layer.stats_enabled = cell.diagnostics.stats
            if cell.optimizer == "grid" and not layer.weight_format.is_native:
                # GridOptim widens the grid by powers of two; a power-of-two weight scale keeps every
                # master weight exactly on the grid the forward uses when the scale moves.
                layer.scalers["weight"] = Scaler(layer.weight_format, grid_weight_scaling(cell.scaling)).to(self.device)
        self.optimizer = build_optimizer(cell.optimizer, self._param_groups(), lr=cell.lr, ulp_lr=cell.ulp_lr,
                                         weight_decay=cell.weight_decay, seed=cell.seed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cell))
        self.batches = torch.Generator().manual_seed(cell.seed)
        # The controller last: its checks read the step after every probe's, and it may switch layers.
        self.probes = [probe(self) for probe in PROBES] + [ProtectionController(self)]
        self.rows = {table: results.RowLog(table) for table in ("steps", "layers")}
        self.step = 0
        self.state = {"best_val_loss": None, "final_val_loss": None, "first_warning_step": None, "wall_time_s": 0.0,
                      "rank_warnings": 0, "stop_reason": None, "started_at": started_at, "ended_at": None}

    # ---- construction --------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        """One group per quantized weight (its format and live scale: ULP optimizers need them), one
        for everything else. A tied lm_head/wte matrix is one parameter and goes in once."""
        groups, seen = [], set()
        for layer in self.layers.values():
            if not layer.weight_format.is_native and id(layer.weight) not in seen:
                groups.append({"params": [layer.weight], "fmt": layer.weight_format, "scale": layer.weight_scale,
                               "scale_of": layer.block_weight_scale if layer.blocked else None})
                seen.add(id(layer.weight))
        rest = [p for p in self.model.parameters() if id(p) not in seen]
        return groups + [{"params": rest, "fmt": None, "scale": None}]

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, report: Report | None = None, resume: bool = False) -> dict:
        """Train to ``cell.steps`` (or until the loss diverges); return the trial's summary row."""
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            self._load_checkpoint()
        cell = self.cell
        bar = tqdm(total=cell.steps, initial=self.step, disable=not self.progress, unit="step",
                   desc=self.trial_id, dynamic_ncols=True)
        started = time.perf_counter() - self.state["wall_time_s"]
        while self.step < cell.steps and self.state["stop_reason"] is None:
            row = self._train_step()
            self.state["wall_time_s"] = time.perf_counter() - started
            self.state["ended_at"] = time.time()
            if not math.isfinite(row["train_loss"]):
                self.state["stop_reason"] = "diverged"
            if self.step % cell.eval_every == 0 or self.step == cell.steps or self.state["stop_reason"]:
                self._evaluate_and_report(report)
            elif report and self._checks_ranks(self.step):
                report(self.metrics(), None)  # the scheduler sees every rank check, not only evaluated ones
            bar.update(1)
            best = self.state["best_val_loss"]
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", **({} if best is None else {"val": f"{best:.3f}"}),
                            tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.close()
        return self.summary(status="stopped" if self.state["stop_reason"] else "completed")

    def _train_step(self) -> dict:
        """One optimizer step, with every probe called at its point (see :class:`altgrad.probes.Probe`)."""
        cell, started, step = self.cell, time.perf_counter(), self.step + 1
        checking = self._checks_ranks(step)
        self.model.train()
        for probe in self.probes:
            probe.before_forward(step, checking)
        x, y = get_batch(self.data.train, cell.batch_size, cell.model.block_size, self.batches)
        _, loss = self.model(x.to(self.device), y.to(self.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cell.grad_clip or math.inf)
        lr = self.scheduler.get_last_lr()[-1]  # the plain group: cell.lr times the schedule
        for probe in self.probes:
            probe.before_optimizer_step(step, checking)
        self.optimizer.step()
        self.scheduler.step()
        self.step = step
        row = {"trial_id": self.trial_id, "format": cell.format, "optimizer": cell.optimizer, "step": step,
               "train_loss": loss.item(), "val_loss": None, "lr": lr, "grad_norm": grad_norm.item(),
               "rank_warnings": None}
        for probe in self.probes:
            row.update(probe.step_columns(step))
        if checking:
            row.update(self._check_layers())
        self.optimizer.zero_grad(set_to_none=True)
        row["tokens_per_s"] = cell.batch_size * cell.model.block_size / (time.perf_counter() - started)
        self.rows["steps"].append(row)
        return row

    def _checks_ranks(self, step: int) -> bool:
        every = self.cell.diagnostics.rank_every
        return bool(every) and step % every == 0

    def _check_layers(self) -> dict:
        """A rank check: one ``layers`` row per layer from every probe; returns the check's ``steps``
        columns (``rank_warnings``: how many critical layers warn now)."""
        identity = {"trial_id": self.trial_id, "format": self.cell.format, "optimizer": self.cell.optimizer,
                    "step": self.step}
        for name, layer in self.layers.items():
            row = {**identity, "layer": name}
            for probe in self.probes:
                row.update(probe.layer_columns(name, layer))
            self.rows["layers"].append(row)
        columns = {}
        for probe in self.probes:
            columns.update(probe.check_columns(self.step))
        self.state["rank_warnings"], self.state["rank_check_step"] = columns["rank_warnings"], self.step
        if columns["rank_warnings"] and self.state["first_warning_step"] is None:
            self.state["first_warning_step"] = self.step
        return columns

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the validation set of :func:`~altgrad.data.validation_batches`, through the same
        quantized forward: the same windows at every evaluation and in every trial of the same data,
        block size, batch size and ``eval_iters``, whatever the seed, so trials compare on one set."""
        self.model.eval()
        losses = [self.model(x.to(self.device), y.to(self.device))[1].item() for x, y in validation_batches(
            self.data.val, self.cell.eval_iters, self.cell.batch_size, self.cell.model.block_size)]
        return sum(losses) / len(losses)

    def _evaluate_and_report(self, report: Report | None) -> None:
        row = self.rows["steps"][-1]
        row["val_loss"] = self.state["final_val_loss"] = self.evaluate()
        best = self.state["best_val_loss"]
        if math.isfinite(row["val_loss"]) and (best is None or row["val_loss"] < best):
            self.state["best_val_loss"] = row["val_loss"]
        checkpoint = None
        every = self.cell.checkpoint_every
        if self.checkpoint_path and (not every or self.step % every == 0 or self.step == self.cell.steps):
            checkpoint = self._save_checkpoint()
        self.flush()
        if report:
            report(self.metrics(), checkpoint)

    def metrics(self) -> dict:
        """What each report carries (and what the sweep's scheduler reads). ``train_loss`` is the last
        batch's, as in the steps table; ``train_loss_mean`` the mean since the previous report."""
        recent = self.rows["steps"][-self.cell.eval_every:]
        last = self.rows["steps"][-1]
        return {
            "step": self.step, "train_loss": last["train_loss"],
            "train_loss_mean": _mean([r["train_loss"] for r in recent]), "val_loss": last["val_loss"], "best_val_loss": self.state["best_val_loss"],
            "rank_warnings": self.state["rank_warnings"], "rank_check_step": self.state.get("rank_check_step"),
            "first_warning_step": self.state["first_warning_step"],
            "stall_ratio": _mean([r["stall_ratio"] for r in recent]),
            "overflow_frac": _mean([r.get("overflow_frac") for r in recent]),
            "tokens_per_s": _mean([r["tokens_per_s"] for r in recent]),
            "stop_reason": self.state["stop_reason"],
        }

    def summary(self, status: str, error: str | None = None) -> dict:
        """The trial's row of the ``trials`` table."""
        measured = self.measured()
        return {**cell_columns(self.cell, self.trial_id, self.sweep), **measured, "status": status, "error": error,
                "stop_reason": measured["stop_reason"] or ("error" if status == "error" else None)}

    def measured(self) -> dict:
        """The columns of the trial's row that only running it tells (the rest its cell decides): what a
        sweep's reports carry to the driver, which writes the row."""
        steps = self.rows["steps"]
        return {
            "stop_reason": self.state["stop_reason"], "steps_completed": self.step,
            "final_train_loss": steps[-1]["train_loss"] if steps else None, "final_val_loss": self.state["final_val_loss"],
            "best_val_loss": self.state["best_val_loss"], "first_warning_step": self.state["first_warning_step"],
            "wall_time_s": self.state["wall_time_s"], "node_id": node_id(), "data_fingerprint": self.data.fingerprint,
            **label_failure([r["step"] for r in steps], [r["train_loss"] for r in steps], self.cell.failure)._asdict(),
            "started_at": self.state["started_at"], "ended_at": self.state["ended_at"],
        }

    # ---- persistence ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Rewrite this trial's step and layer files from the complete row lists."""
        if self.results_root:
            for table, rows in self.rows.items():
                results.write_rows(self.results_root, table, self.trial_id, rows.arrow())

    def _save_checkpoint(self) -> Path:
        state = {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "batches": self.batches.get_state(),
            "torch_rng": torch.get_rng_state(), "probes": [probe.state_dict() for probe in self.probes],
            "rows": {table: rows.to_bytes() for table, rows in self.rows.items()}, "state": self.state,
            "data_fingerprint": self.data.fingerprint,
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.tmp")
        torch.save(state, partial)
        os.replace(partial, self.checkpoint_path)
        return self.checkpoint_path

    def _load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state.get("data_fingerprint") != self.data.fingerprint:
            raise ConfigError(str(self.checkpoint_path), "data",
                              f"{self.cell.data!r} has fingerprint {self.data.fingerprint}, but this run was "
                              f"trained on data with fingerprint {state.get('data_fingerprint')}: resuming "
                              f"would splice two corpora into one run")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.set_state(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        for probe, probe_state in zip(self.probes, state["probes"]):
            probe.load_state_dict(probe_state)
        self.rows = {table: results.RowLog.from_bytes(table, data) for table, data in state["rows"].items()}
        self.state = state["state"]
