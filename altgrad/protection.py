"""Adaptive low-rank protection: notice a gradient that is about to overwrite what a layer has learned,
and train only the layer's minor components until it stops (the seed design's "adaptive SVD").

Every ``every`` steps, for each watched layer, one eigendecomposition of the weight as the forward sees
it (of the smaller Gram matrix, in float64, as in :mod:`altgrad.diagnostics`) gives every signal:

* ``principal_alignment`` / ``minor_alignment``: the shares of ‖G‖F² inside and outside the span of the
  top-k left singular vectors (:func:`altgrad.diagnostics.gradient_alignment`);
* ``spectral_concentration``: the share of ‖W‖F² in the top k singular values;
* the split: ``p`` principal directions, the singular values that stand out of the noise bulk (above
  Gavish & Donoho's 2014 hard threshold ``ω(β) · median(s)``), at least k; the other ``r = min(m, n) - p``
  are the minor ones, and ``reconstruction_error`` = ‖W - W_p‖F / ‖W‖F is what the rank-p principal
  approximation misses: the share of the weight the minor part holds.

When the principal alignment exceeds ``principal_threshold`` (the gradient pushes mostly on directions the
layer's output already uses: "clobbering"), the layer switches to protected mode
(:meth:`~altgrad.layers.QuantLinear.protect`): ``B @ A`` of rank r, initialised from the r minor singular
components, trains, and ``W_p = W - B @ A`` is frozen. r starts near full (a young layer's spectrum is a
noise bulk with few values above it) and shrinks as the spectrum concentrates. At each later check a
protected layer is released when the alignment fell below ``release_threshold`` (hysteresis: below the
switching threshold, so that a layer near it does not flap), merging ``W := W_p + B @ A`` exactly as the
forward saw it; otherwise it starts a new cycle: merge, decompose, split again, so that W_p follows the
current weight instead of being frozen once (as in MiLoRA).

With ``trigger: rank_warning`` the switch on is the rank-collapse detector's instead (a sweep's
``early_stopping.rank_collapse: {action: protect}`` sets it): at a rank check, a watched unprotected layer
for which the detector (:class:`~altgrad.probes.SpectrumProbe`'s) warns switches at once; releases and
cycles stay the alignment's, at the checks every ``every`` steps.

The factors train under the controller's own AdamW, with the hyperparameters and scheduled lr of the
trainer's plain (non-quantized) parameter group, read at every step. Keeping them out of the trainer's
optimizer leaves its groups and checkpoint layout fixed whatever switches, leaves ManifoldAdamW's
format groups alone (the factors are not on any grid: ULP steps mean nothing for them) and keeps the
lr scheduler, which only schedules the groups it was built with, correct. The protected weight itself
gets no gradient, so its optimizer skips it and keeps its moments for when it trains again. The grid
optimizer is rejected: its weights must lie on the format's grid, and ``W_p + B @ A`` does not.
"""

from __future__ import annotations

import math
from collections import Counter
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch

from altgrad.config import PROTECTION_MODES as MODES  # noqa: F401 (re-exported: its name here before)
from altgrad.config import PROTECTION_TRIGGERS as TRIGGERS  # noqa: F401
from altgrad.config import ProtectionConfig
from altgrad.diagnostics import _finite_matrix, _gradient_shares, _gram, _noise_floor, _python_values, _singular_values
from altgrad.probes import SpectrumProbe

LAYER_KEYS = ("protected_rank", "principal_alignment", "minor_alignment", "spectral_concentration",
              "reconstruction_error")


# ---- one spectrum per check ---------------------------------------------------------------------

def _gavish_donoho(beta: float) -> float:
    """ω(β): singular values above ω(β) · median stand out of a noise bulk of unknown level, for an
    m x n matrix with β = min / max (Gavish & Donoho 2014, eq. 5's approximation)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


class _Spectrum(NamedTuple):
    matrix: torch.Tensor  # float64, non-finite entries zeroed
    eigenvalues: torch.Tensor  # of the smaller Gram matrix, ascending
    vectors: torch.Tensor  # its eigenvectors: right singular vectors of a tall matrix, left ones of a wide one
    tall: bool


def _measure(weight: torch.Tensor, grad: torch.Tensor | None, k: int, min_rank: int,
             ) -> tuple[dict[str, float | int | None], _Spectrum]:
    """The metrics of :func:`protection_metrics` and the decomposition they came from (for the split)."""
    matrix, finite = _finite_matrix(weight)
    gram, tall = _gram(matrix)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    s = _singular_values(eigenvalues)
    n, k = s.numel(), min(k, s.numel())
    floor = _noise_floor(s, matrix.shape)
    # The top-k left singular vectors (and right ones, which _gradient_shares also takes), as in
    # diagnostics._top_singular: the Gram side's eigenvectors, and W v / s (or Wᵀ u / s) for the other.
    top = vectors[:, -k:].flip(1).contiguous()
    other = (matrix @ top if tall else matrix.mT @ top) / torch.where(s[:k] > floor, s[:k], 1.0)
    u_k, v_k = (t.float() for t in ((other, top) if tall else (top, other)))
    defined = s[k - 1] > floor
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = sum of s_j² for j >= i, with no cancellation
    total = tail[0]
    spikes = (s > _gavish_donoho(n / max(matrix.shape)) * s.median()).sum()
    minor_rank = (n - spikes.clamp(min=k)).clamp(min=min_rank).clamp(max=n - 1)  # at least one principal
    held = torch.where(total > 0, total, 1.0)
    concentration = 1 - tail[k] / held if k < n else torch.ones_like(total)
    error = (tail[(n - minor_rank).clamp(max=n - 1)] / held).sqrt() if n > 1 else torch.zeros_like(total)
    nan = torch.full((), math.nan, dtype=torch.float64, device=s.device)
    shares, pushed = (nan.expand(3), False) if grad is None else _gradient_shares(grad.detach().float(), u_k, v_k)
    values = torch.stack([shares[1].double(), shares[2].double(), concentration, error])
    measured = torch.stack([defined & pushed] * 2 + [total > 0] * 2)
    rank = minor_rank.double()[None]
    *values, rank = _python_values(torch.cat([torch.where(finite, values, nan), rank]),
                                   torch.cat([measured | ~finite, torch.ones_like(measured[:1])]))
    metrics = dict(zip(LAYER_KEYS[1:], values))
    return {**metrics, "minor_rank": int(rank)}, _Spectrum(matrix, eigenvalues, vectors, tall)


def protection_metrics(weight: torch.Tensor, grad: torch.Tensor | None = None, *, k: int = 8,
                       min_rank: int = 1) -> dict[str, float | int | None]:
    """A check's signals from one eigendecomposition of ``weight`` (see the module docstring):
    ``principal_alignment``, ``minor_alignment`` (as :func:`~altgrad.diagnostics.gradient_alignment`;
    None without a gradient, for a zero one, or an undefined top-k subspace), ``spectral_concentration``
    (share of ‖W‖F² in the top k singular values), ``reconstruction_error`` (‖W - W_p‖F / ‖W‖F for the
    rank-p principal part; both None for a zero weight) and ``minor_rank``, the rank r = min(m, n) - p a
    switch would train at, in [min_rank, min(m, n) - 1] (0 for a single row or column). NaN for a
    non-finite weight or gradient. One host sync."""
    if grad is not None and grad.shape != weight.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}")
    if k < 1 or min_rank < 1:
        raise ValueError(f"k={k!r} and min_rank={min_rank!r} must be >= 1")
    return _measure(weight, grad, k, min_rank)[0]


def minor_factors(spectrum: _Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``B`` (m x r), ``A`` (r x n) with ``B @ A`` the projection of the matrix on its r minor
    singular directions, balanced (``B = U_r √S_r``, ``A = √S_r V_rᵀ`` as in PiSSA/MiLoRA) so that Adam
    moves both factors alike. Singular values below the noise floor are raised to it in the balance,
    which keeps the product and only stops a vanishing one from dividing by zero."""
    matrix, eigenvalues, vectors, tall = spectrum
    minor = vectors[:, :rank]
    floor = _noise_floor(_singular_values(eigenvalues), matrix.shape)
    root = eigenvalues[:rank].clamp(min=0).sqrt().clamp(min=floor).clamp(min=torch.finfo(matrix.dtype).tiny).sqrt()
    if tall:  # minor = V_r: B A = W V_r V_rᵀ
        b, a = (matrix @ minor) / root, root[:, None] * minor.mT
    else:  # minor = U_r: B A = U_r U_rᵀ W
        b, a = minor * root, (minor.mT @ matrix) / root[:, None]
    return b.float(), a.float()


# ---- the trainer's controller --------------------------------------------------------------------

class ProtectionController:
    """Drives protected mode in a :class:`~altgrad.trainer.Trainer`, called at the same step points as a
    probe (:class:`altgrad.probes.Probe`); put it after the probes. Unlike them it changes the model: at
    its checks it switches layers, and before each optimizer step it steps the factors of the protected
    ones (gradients already clipped with the model's) and refreshes their mirrored ``weight``.

    ``layers`` rows get :data:`LAYER_KEYS`: ``protected_rank`` (the factor's rank after the check's
    decision; 0: the whole weight trains) for every layer, the rest for watched layers at steps where a
    protection check ran (the check's alignment overrides the spectrum probe's, which a protected
    layer's weight, without a gradient, cannot give). Nothing when the mode is off. The protected state
    (mode, base, factors) is in the model's state_dict; the factors' optimizer state in this one's.
    """

    def __init__(self, trainer, config: ProtectionConfig | None = None):
        self.trainer = trainer
        self.config = trainer.cell.protection if config is None else config
        self.config.check_optimizer(trainer.cell.optimizer)
        self.layers = self._watched() if self.config.mode != "off" else {}
        self.optimizer: torch.optim.AdamW | None = None
        self.groups: dict[str, dict] = {}  # protected layer -> its group in self.optimizer, in group order
        self.columns: dict[str, dict] = {}
        self.columns_step: int | None = None

    def _watched(self) -> dict:
        names = list(self.trainer.layers)
        for pattern in self.config.layers:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"protection.layers pattern {pattern!r} matches no linear layer; layers: "
                                 f"{', '.join(names)}")
        watched = {name: layer for name, layer in self.trainer.layers.items()
                   if any(fnmatchcase(name, pattern) for pattern in self.config.layers)}
        uses = Counter(id(p) for _, p in self.trainer.model.named_parameters(remove_duplicate=False))
        for name, layer in watched.items():
            if uses[id(layer.weight)] > 1:
                raise ValueError(f"protection.layers: {name} shares its weight with another module (tie_weights), "
                                 f"whose gradient a protected layer would drop; leave it out")
        return watched

    # ---- step points ---------------------------------------------------------------------------
    def before_forward(self, step: int, checking: bool) -> None:
        pass

    @torch.no_grad()
    def before_optimizer_step(self, step: int, checking: bool) -> None:
        if not self.groups:
            return
        lr = self.trainer.optimizer.param_groups[-1]["lr"]  # the plain group's, scheduled
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # the trainer's zero_grad does not know these
        for name in self.groups:
            self.layers[name].refresh_weight()

    def _check(self, name: str) -> tuple[dict, _Spectrum]:
        """One layer's check: this step's gradient and the weight after the optimizer step."""
        layer = self.layers[name]
        grad = layer.effective_grad if layer.protected_rank else layer.weight.grad
        return _measure(layer.quantized_weight(), grad, self.config.k, self.config.min_rank)

    def _record(self, name: str, metrics: dict) -> None:
        if self.columns_step != self.trainer.step:
            self.columns, self.columns_step = {}, self.trainer.step
        self.columns[name] = {"protected_rank": self.layers[name].protected_rank,
                              **{key: metrics[key] for key in LAYER_KEYS[1:]}}

    @torch.no_grad()
    def step_columns(self, step: int) -> dict:
        """A check every ``every`` steps, after the optimizer step: release or cycle the protected layers,
        and (trigger alignment) protect the ones the gradient clobbers."""
        if not self.layers or step % self.config.every:
            return {}
        switches_on = self.config.trigger == "alignment"
        for name, layer in self.layers.items():
            metrics, spectrum = self._check(name)
            principal = metrics["principal_alignment"]
            if principal is not None and math.isfinite(principal):  # unmeasured or diverged: keep the mode
                if layer.protected_rank and principal < self.config.release_threshold:
                    self._release(name)
                elif (layer.protected_rank or (switches_on and principal > self.config.principal_threshold)
                      ) and metrics["minor_rank"]:
                    self._protect(name, minor_factors(spectrum, metrics["minor_rank"]))
            self._record(name, metrics)
        return {}

    @torch.no_grad()
    def layer_columns(self, name: str, layer) -> dict:
        """The layer's protection columns at a rank check; with trigger rank_warning, first the switch of
        a watched layer the rank-collapse detector warns for now (the spectrum probe, called before this,
        has fed it this check's rank)."""
        if self.config.mode == "off":
            return {}
        if (self.config.trigger == "rank_warning" and name in self.layers and not layer.protected_rank
                and self._spectrum().warned.get(name)):
            metrics, spectrum = self._check(name)
            if metrics["minor_rank"]:
                self._protect(name, minor_factors(spectrum, metrics["minor_rank"]))
            self._record(name, metrics)
        if name in self.columns and self.columns_step == self.trainer.step:
            return self.columns[name]
        return {"protected_rank": layer.protected_rank}

    def _spectrum(self) -> SpectrumProbe:
        return next(probe for probe in self.trainer.probes if isinstance(probe, SpectrumProbe))

    def check_columns(self, step: int) -> dict:
        return {}

    # ---- switches ------------------------------------------------------------------------------
    def _protect(self, name: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Switch on, or start a new cycle (the layer merges first): fresh factors, fresh moments."""
        self._drop_group(name)
        self.layers[name].protect(*factors)
        self._add_group(name)

    def _release(self, name: str) -> None:
        self._drop_group(name)
        self.layers[name].unprotect()

    def _add_group(self, name: str) -> None:
        layer, plain = self.layers[name], self.trainer.optimizer.param_groups[-1]
        group = {"params": [layer.protected_b, layer.protected_a], "lr": plain["lr"], "betas": plain["betas"],
                 "eps": plain["eps"], "weight_decay": plain["weight_decay"]}
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW([group], lr=plain["lr"])
        else:
            self.optimizer.add_param_group(group)
        self.groups[name] = self.optimizer.param_groups[-1]

    def _drop_group(self, name: str) -> None:
        group = self.groups.pop(name, None)
        if group is not None:
            # By identity: list.remove compares dicts, and so their parameter tensors, elementwise.
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g is not group]
            for p in group["params"]:
                self.optimizer.state.pop(p, None)

    # ---- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"groups": list(self.groups), "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """After the model's state (which restored each layer's protected mode): the factors' groups in
        their saved order, and their moments."""
        self.optimizer, self.groups = None, {}
        protected = {name for name, layer in self.layers.items() if layer.protected_rank}
        if protected != set(state["groups"]):
            raise ValueError(f"protection state names {sorted(state['groups'])} protected, the model "
                             f"{sorted(protected)}")
        for name in state["groups"]:
            self._add_group(name)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])  # torch rebuilds its group dicts: rebind ours
            self.groups = dict(zip(state["groups"], self.optimizer.param_groups))
