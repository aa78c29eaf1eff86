"""The trainer's instruments: one small probe per signal, each owning its state, its cost interval and
its columns of the ``steps`` and ``layers`` tables.

A training step calls the probes at four points (see :class:`Probe`), so that each signal is measured
where it exists: a forward input only during the forward, Adam's previous second moment only before the
optimizer step, a flip only after it. ``layers`` rows are written at rank checks (every
``diagnostics.rank_every`` steps): per-layer probes that are costly measure only then, and the ones that
count every step (flips, overflow) sum over the interval since the previous check.

Every probe records what it could not measure as None (null in Parquet), never NaN: NaN is a measured
non-finite value, a diverged weight or loss. Probes never draw random numbers or touch the model's
computation, so a run trains bit for bit the same with any of them switched off, and resumes bit-identically
with their state in the checkpoint.
"""

from __future__ import annotations

import math

import torch

from altgrad import whatif
from altgrad.diagnostics import FlipTracker, RankTrendDetector, critical_layer_metrics, rank_metrics, stall_ratio
from altgrad.layers import POINTS


def _ratio(numerator: float, denominator: float) -> float | None:
    """A fraction of counted things; None when nothing was counted."""
    return numerator / denominator if denominator else None


def _largest(values: list[float]) -> float | None:
    """The largest of measured values, NaN if any is (a non-finite tensor); None when there are none."""
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


class Probe:
    """One signal. The trainer calls, for each training step ``step`` (1-based, the step being taken):

    * :meth:`before_forward` — before the forward pass;
    * :meth:`before_optimizer_step` — gradients computed and clipped, weights not yet moved;
    * :meth:`step_columns` — after the optimizer step; returns columns of this step's ``steps`` row;
    * at a rank check, :meth:`layer_columns` per layer (columns of its ``layers`` row), then
      :meth:`check_columns` (more ``steps`` columns) once.

    ``state_dict``/``load_state_dict`` carry what the probe must remember across a resume.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def before_forward(self, step: int, checking: bool) -> None:
        pass

    def before_optimizer_step(self, step: int, checking: bool) -> None:
        pass

    def step_columns(self, step: int) -> dict:
        return {}

    def layer_columns(self, name: str, layer) -> dict:
        return {}

    def check_columns(self, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _IntervalSums:
    """Per-layer sums over the steps since the last rank check."""

    def __init__(self, layers, keys: tuple[str, ...]):
        self.keys, self.layers = keys, list(layers)
        self.reset()

    def reset(self) -> None:
        self.sums = {name: dict.fromkeys(self.keys, 0.0) for name in self.layers}

    def add(self, name: str, **values: float | None) -> None:
        for key, value in values.items():
            if value is not None:  # not measured adds nothing
                self.sums[name][key] += value


class FlipProbe(Probe):
    """Optimizer flips at a fixed scale, gradient updates, the stall ratio, and the codes a moving scale
    re-coded on top (:class:`~altgrad.diagnostics.FlipTracker`), every ``diagnostics.flips_every`` steps."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.every = trainer.cell.diagnostics.flips_every
        self.tracker = FlipTracker()
        for name, layer in trainer.layers.items():
            self.tracker.track(name, layer.weight, layer.weight_format, layer.weight_scale)
        self.interval = _IntervalSums(trainer.layers, ("flips", "recoded", "updates", "flip_steps"))

    def step_columns(self, step: int) -> dict:
        if not self.every or step % self.every:
            return {"flips": None, "updates": None, "stall_ratio": None, "recoded": None}
        counts = self.tracker.measure()
        for name, count in counts.items():
            self.interval.add(name, flips=count.flips, updates=count.updates, recoded=count.recoded,
                              flip_steps=float(count.flips is not None))
        measured = all(c.flips is not None for c in counts.values())
        flips = sum(c.flips for c in counts.values()) if measured else None
        updates = sum(c.updates for c in counts.values())
        recoded = sum(c.recoded for c in counts.values()) if measured else None
        return {"flips": flips, "updates": updates, "stall_ratio": stall_ratio(flips, updates), "recoded": recoded}

    def layer_columns(self, name: str, layer) -> dict:
        s, numel = self.interval.sums[name], layer.weight.numel()
        return {"flip_rate": _ratio(s["flips"], s["flip_steps"] * numel),
                "recode_rate": _ratio(s["recoded"], s["flip_steps"] * numel),
                "stall_ratio": stall_ratio(s["flips"], s["updates"]) if s["flip_steps"] else None}

    def check_columns(self, step: int) -> dict:
        self.interval.reset()
        return {}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "interval": self.interval.sums}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.interval.sums = state["interval"]


class QuantStatsProbe(Probe):
    """Overflow and underflow fractions of every quantization point, every step (counted on the device
    inside the quantizing pass; one host sync per layer to read them), summed per layer between checks;
    per point also the largest amax over the layers and, under row/block scaling, the widest spread of
    block scales (binades between a tensor's smallest and largest block scale)."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.enabled = trainer.cell.diagnostics.stats
        self.interval = _IntervalSums(trainer.layers, ("over", "under", "numel"))

    def step_columns(self, step: int) -> dict:
        if not self.enabled:
            return {}
        totals = {point: [0.0, 0.0, 0.0] for point in POINTS}  # overflow, underflow, numel
        amaxes, spreads = ({point: [] for point in POINTS} for _ in range(2))
        nans = 0.0
        for name, layer in self.trainer.layers.items():
            for point, s in layer.pop_stats().items():
                if s["numel"]:
                    over, under = s["overflow_frac"] * s["numel"], s["underflow_frac"] * s["numel"]
                    totals[point] = [totals[point][0] + over, totals[point][1] + under, totals[point][2] + s["numel"]]
                    self.interval.add(name, over=over, under=under, numel=s["numel"])
                    nans += s["nan_count"]
                    amaxes[point].append(s["amax"])
                    if not math.isnan(s["scale_spread"]):  # NaN: per tensor, or no block with a finite amax
                        spreads[point].append(s["scale_spread"])
        over, under, numel = (sum(t[i] for t in totals.values()) for i in range(3))
        columns = {"overflow_frac": _ratio(over, numel), "underflow_frac": _ratio(under, numel), "nan_count": nans}
        for point, (o, u, n) in totals.items():
            columns[f"overflow_frac_{point}"] = _ratio(o, n)
            columns[f"underflow_frac_{point}"] = _ratio(u, n)
            columns[f"amax_{point}"] = _largest(amaxes[point])
            columns[f"scale_spread_{point}"] = _largest(spreads[point])
        return columns

    def layer_columns(self, name: str, layer) -> dict:
        s = self.interval.sums[name]
        return {"overflow_frac": _ratio(s["over"], s["numel"]), "underflow_frac": _ratio(s["under"], s["numel"])}

    def check_columns(self, step: int) -> dict:
        self.interval.reset()
        return {}

    def state_dict(self) -> dict:
        return {"interval": self.interval.sums}

    def load_state_dict(self, state: dict) -> None:
        self.interval.sums = state["interval"]


class SpectrumProbe(Probe):
    """At each rank check: the rank metrics of the weight as the forward sees it (quantized) and of its
    fp32 master, the rank-collapse warning from the quantized metric named by ``rank_trend.metric``, and
    for critical layers the clobbering signals (subspace rotation, gradient alignment). Two
    eigendecompositions per layer, the master's only when the two weights differ."""

    MASTER = {"stable_rank": "master_stable_rank", "effective_rank": "master_effective_rank",
              "spectral_norm": "master_spectral_norm"}

    def __init__(self, trainer):
        super().__init__(trainer)
        self.detector = RankTrendDetector(trainer.cell.rank_trend)
        self.critical = {name for name in trainer.layers if self.detector.is_critical(name)}
        self.bases: dict[str, torch.Tensor | None] = {}
        self.warned: dict[str, bool] = {}  # each layer's warning at its latest check (protection's trigger)
        self.warnings = 0

    @torch.no_grad()
    def layer_columns(self, name: str, layer) -> dict:
        weight, step = layer.quantized_weight(), self.trainer.step
        critical = name in self.critical
        if critical:
            metrics, self.bases[name] = critical_layer_metrics(weight, grad=layer.weight.grad,
                                                               previous_basis=self.bases.get(name))
        else:
            metrics = rank_metrics(weight)
        master = metrics if layer.weight_format.name == "fp32" else rank_metrics(layer.weight)
        warning = self.detector.update(name, step, metrics[self.trainer.cell.rank_trend.metric])
        self.warned[name] = warning
        self.warnings += int(warning and critical)
        return {**metrics, **{self.MASTER[key]: master[key] for key in self.MASTER}, "rank_warning": warning,
                "critical": critical, "layer_format": layer.weight_format.name,
                "weight_scale": float(layer.weight_scale.min())}

    def check_columns(self, step: int) -> dict:
        warnings, self.warnings = self.warnings, 0
        return {"rank_warnings": warnings}

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "bases": self.bases}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        self.bases = state["bases"]


def _kurtosis_and_amax(x: torch.Tensor) -> torch.Tensor:
    """``[Pearson kurtosis E[(x-mean)^4] / var^2 (3 for a Gaussian), max |x|]`` in float64 on the device:
    outliers raise both. A constant tensor has no defined kurtosis: NaN, which the caller turns into None."""
    x = x.detach().double().reshape(-1)
    centred = x - x.mean()
    var = centred.square().mean()
    return torch.stack([centred.pow(4).mean() / var.square(), x.abs().max()])


def _measured(values: torch.Tensor, finite_input: torch.Tensor) -> list[float | None]:
    """Python floats; a NaN from 0 / 0 on finite input is 'not measured' (None), a NaN or inf from
    non-finite input stays."""
    defined = torch.isfinite(values) | ~finite_input
    return [v if ok else None for v, ok in zip(values.tolist(), defined.tolist())]


class _CheckInputProbe(Probe):
    """A probe that reads each layer's input activation in the check step's training forward, caught by a
    forward pre-hook registered for that step only and reduced at once by :meth:`summarize_input` (so no
    activation outlives the forward); :meth:`caught_input` then hands the summary over, once."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.inputs: dict[str, torch.Tensor | None] = {}
        self.hooks = []

    def summarize_input(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def before_forward(self, step: int, checking: bool) -> None:
        if not checking:
            return
        for name, layer in self.trainer.layers.items():
            self.hooks.append(layer.register_forward_pre_hook(self._keep_input(name)))

    def _keep_input(self, name: str):
        @torch.no_grad()
        def hook(module, args):
            self.inputs[name] = self.summarize_input(module, args[0].detach())
        return hook

    def before_optimizer_step(self, step: int, checking: bool) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def caught_input(self, name: str) -> torch.Tensor | None:
        """The summary of ``name``'s input; None when the layer did not run in the check step's forward."""
        return self.inputs.pop(name, None)


class MomentsProbe(_CheckInputProbe):
    """Outliers at each rank check: kurtosis and amax of each layer's fp32 master weight, and of the input
    activation of the check step's forward."""

    def summarize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_kurtosis_and_amax(x), torch.isfinite(x).all().double()[None]])

    @torch.no_grad()
    def layer_columns(self, name: str, layer) -> dict:
        weight = layer.weight.detach()
        weight_kurtosis, weight_amax = _measured(_kurtosis_and_amax(weight), torch.isfinite(weight).all())
        caught = self.caught_input(name)
        input_kurtosis, input_amax = (None, None) if caught is None else _measured(caught[:2], caught[2] == 1)
        return {"weight_kurtosis": weight_kurtosis, "weight_amax": weight_amax,
                "input_kurtosis": input_kurtosis, "input_amax": input_amax}


class GradientProbe(Probe):
    """At each rank check, before the optimizer step: each layer's weight-gradient norm, and Adam's
    ``adam_ratio`` = mean over entries of g² / v̂, with v̂ the bias-corrected second moment *before* this
    step's gradient enters it. About 1 while v tracks the gradients; a burst of gradients larger than the
    second moment expects (which precedes loss spikes) drives it far above 1. None on the first step
    (no second moment yet) and for entries the optimizer does not hold."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.values: dict[str, list[float | None]] = {}

    @torch.no_grad()
    def before_optimizer_step(self, step: int, checking: bool) -> None:
        if not checking:
            return
        for name, layer in self.trainer.layers.items():
            grad = layer.weight.grad
            if grad is None:
                self.values[name] = [None, None]
                continue
            grad = grad.detach().double()
            norm = grad.square().sum().sqrt()
            ratio, defined = self._adam_ratio(layer.weight, grad)
            finite = torch.isfinite(grad).all()
            norm_value, ratio_value = _measured(torch.stack([norm, ratio]), finite)
            self.values[name] = [norm_value, ratio_value if defined else None]

    def _adam_ratio(self, weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
        optimizer = self.trainer.optimizer
        state = optimizer.state.get(weight, {})
        if "exp_avg_sq" not in state:
            return grad.new_full((), math.nan), False
        group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
        taken = int(state["step"])  # steps already in v
        v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** taken)
        held = v_hat > 0
        ratio = torch.where(held, grad.square() / torch.where(held, v_hat, 1.0), 0.0).sum() / held.sum()
        return ratio, True

    def layer_columns(self, name: str, layer) -> dict:
        norm, ratio = self.values.pop(name, [None, None])
        return {"grad_norm": norm, "adam_ratio": ratio}


class WhatIfProbe(_CheckInputProbe):
    """At each rank check, for 8-bit layers: what per-tensor, per-row and MX scaling in the layer's format
    would cost on its fp32 master weight and on the check step's input activation (relative MSE, share
    flushed to zero; see :mod:`altgrad.whatif`), whichever recipe the layer trains with. Null for
    fp32/bf16/fp16 layers, which have no 8-bit grid."""

    COLUMNS = {"weight": whatif.column_names("weight"), "input": whatif.column_names("input")}

    def summarize_input(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        return None if layer.weight_format.is_native else whatif.quantization_errors(x, layer.weight_format)

    def layer_columns(self, name: str, layer) -> dict:
        caught = self.caught_input(name)
        columns = dict.fromkeys(column for names in self.COLUMNS.values() for column in names)
        if layer.weight_format.is_native:
            return columns
        measured = {"weight": whatif.quantization_errors(layer.weight, layer.weight_format), "input": caught}
        for tensor, values in measured.items():
            if values is not None:  # None: the layer did not run in the check step's forward
                columns.update(zip(self.COLUMNS[tensor], _measured(values[:-1], values[-1] == 1)))
        return columns


PROBES = (FlipProbe, QuantStatsProbe, SpectrumProbe, MomentsProbe, GradientProbe, WhatIfProbe)
