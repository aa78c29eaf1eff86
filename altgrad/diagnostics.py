"""Per-layer training diagnostics, cheap enough to leave on in every run.

* :class:`FlipTracker` counts, per weight, how many quantized codes the optimizer changed (flips) against
  how many entries got a gradient (updates), at a fixed scale; codes a moving scale changed on top are
  counted apart (re-codes). ``stall_ratio = 1 - flips / updates`` is the share of updates the format
  swallowed: the weight moved, but not across a grid point, so the forward pass saw nothing.
* :func:`rank_metrics`: stable rank, effective rank and spectral norm from the singular values of any
  matrix: the weight as the forward sees it, or its full-precision master (quantization noise inflates
  the effective rank, so the two differ).
* :func:`gradient_alignment`: the shares of the gradient inside and outside the weight's top-k left
  singular subspace.
* :func:`critical_layer_metrics`: rank metrics plus the "clobbering" signals (how far the top-k singular
  subspace rotated since the last check, and how much of the gradient pushes on it), for the layers
  whose collapse ends a run.
* :class:`RankTrendDetector`: rank-collapse warnings from a per-layer EMA of a rank metric after warm-up.

The spectra come from the eigenvalues (and, for the subspaces, eigenvectors) of the smaller Gram
matrix, ``WᵀW`` or ``WWᵀ``, in float64: two to three times cheaper than an SVD of ``W`` on a CPU, and,
since float64 more than absorbs the squared condition number, at least as accurate as a float32 SVD.
One decomposition serves all of a layer's metrics at a check.

Every function returns Python floats after at most one host synchronisation (the flip count two), so
the trainer can put the results straight into Parquet rows. A value that could not be measured (no
previous check to compare with, a zero gradient) is None; NaN only records a measured non-finite value
(a diverged weight). Never a sentinel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch

from altgrad.config import RANK_TREND_METRICS, RankTrendConfig
from altgrad.formats import FPFormat, get_format
from altgrad.quantize import _call, _code_numbers, _code_params, _compute_dtype, _count, _scale_tensor, encode

RANK_KEYS = (*RANK_TREND_METRICS, "spectral_norm")
CLOBBER_KEYS = ("subspace_angle_deg", "grad_topk_share", "principal_alignment", "minor_alignment")

# ---- flips ----------------------------------------------------------------------------------------

_NATIVE_CODES = {16: torch.int16, 32: torch.int32}  # bf16/fp16, fp32: the cast's bits, viewed as integers
_NEGATIVE_ZERO = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}


def forward_codes(weight: torch.Tensor, fmt, scale=None) -> torch.Tensor:
    """Bit codes of the values the training forward computes from ``weight``.

    It mirrors ``quantize(weight, fmt, scale=scale, saturate=True)``, so two weights share a code exactly
    when the forward sees the same value: finite overflow saturates to ±max, and -0 takes +0's code
    (a near-zero weight whose sign changes while it rounds to zero has not flipped).

    8-bit formats give uint8 codes (1 byte a weight), bf16/fp16 the int16 bits of the cast. fp32 gives
    the int32 bits of the weight: 4 bytes, but the only exact way to track the unquantized baseline, whose
    stall ratio is not trivially 0 (an update below half an fp32 ulp of its weight is lost too). A NaN
    weight gets the NaN code where the format has one; formats without NaN code it as zero so that a
    diverged model never raises here (its loss reports the divergence).
    """
    fmt = get_format(fmt)
    if fmt.is_native:
        x = weight.detach().float()
        x = (x if scale is None else x * scale).clamp(-fmt.max_value, fmt.max_value)  # a copy, never aliasing
        codes = x.to(fmt.torch_dtype).view(_NATIVE_CODES[fmt.bits])
        return codes.masked_fill_(codes == _NEGATIVE_ZERO[codes.dtype], 0)
    # One fused pass; NaN in a format without NaN takes zero's code.
    return encode(weight.detach(), fmt, scale=scale, saturate=True, nan_code=0, signed_zero=False)


class FlipCount(NamedTuple):
    flips: float | None  # codes the optimizer changed since the previous measure(), at that measure's scale
    updates: float  # entries with a non-zero gradient at this measure()
    recoded: float | None  # codes the scale's move since the previous measure() changed on top (0: it held)


def stall_ratio(flips: float | None, updates: float) -> float | None:
    """``1 - flips / updates``; None (not measured) when nothing was updated or flips are unknown.

    Not clamped: it goes negative when more codes flip than entries got a gradient (AdamW momentum and
    weight decay move weights with a zero gradient)."""
    return None if flips is None or not updates else 1.0 - flips / updates


@dataclass
class _Tracked:
    weight: torch.Tensor
    fmt: FPFormat
    scale: torch.Tensor | None
    codes: torch.Tensor | None = None  # as of the previous measure()
    code_scale: torch.Tensor | None = None  # a copy of the scale those codes were taken at


class FlipTracker:
    """Counts code flips and gradient updates per named weight, keeping only the codes between calls.

    Call :meth:`measure` right after ``optimizer.step()``, while ``.grad`` still holds the step's
    gradient: then the codes are those the next forward sees, and the updates are this step's. Flips
    are counted against the previous measure(), so they cover one optimizer step when measure() runs
    every step (``flips_every: 1``) and the whole interval otherwise.

    The forward's codes change for two reasons, counted apart: the optimizer moved the weight (``flips``:
    the weight now against the previous codes, both at the previous measure's scale), and the scaler
    moved the scale (``recoded``: the weight now at the new scale against the same at the old one). A
    delayed scale moves on most steps and re-codes a share of every weight that has nothing to do with
    its update, so only ``flips`` enter the stall ratio.

    The first measure() after :meth:`track` has nothing to compare with and reports None for both: the
    codes at ``track`` time would use a scale the first forward has not set yet.
    """

    def __init__(self):
        self._tracked: dict[str, _Tracked] = {}

    def track(self, name: str, weight: torch.Tensor, fmt, scale: torch.Tensor | None = None) -> None:
        """Follow ``weight`` (the parameter itself, read at every measure) as ``fmt`` quantizes it.

        ``scale`` is the tensor the forward multiplies by before rounding, also read at every measure:
        pass the ``Scaler.scale`` buffer, which the scaler updates in place, or under row/block scaling
        ``QuantLinear.weight_scale``, one scale per element (anything that broadcasts against the weight):
        then flips are counted at each block's fixed scale, and a block whose scale moved re-codes.
        Tracking a name again restarts it."""
        self._tracked[name] = _Tracked(weight, get_format(fmt), scale)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor | None]]:
        """The codes of the last measure and their scale, so a resumed run counts its first flips
        against them and sees a scale that moved in between as re-coding."""
        return {name: {"codes": t.codes, "scale": t.code_scale} for name, t in self._tracked.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor | None]]) -> None:
        for name, saved in state.items():
            self._tracked[name].codes, self._tracked[name].code_scale = saved["codes"], saved["scale"]

    @property
    def nbytes(self) -> int:
        """Memory held between calls: 1 byte a weight for 8-bit formats, 2 for bf16/fp16, 4 for fp32."""
        return sum(t.codes.nbytes for t in self._tracked.values() if t.codes is not None)

    @torch.no_grad()
    def measure(self) -> dict[str, FlipCount]:
        """Flips and re-codes since the previous call and current updates, per tracked name. 8-bit
        weights are encoded, compared and counted in fused passes, all in one call. A host sync for the
        counts, and one before to see whether any tracked scale moved: if none did, each weight is
        encoded once, not twice."""
        if not self._tracked:
            return {}
        tracked = list(self._tracked.values())
        firsts = [t.codes is None for t in tracked]
        codes, counts = _codes_and_counts(tracked, _any_scale_moved(tracked))
        for t, c in zip(tracked, codes):
            t.codes, t.code_scale = c, None if t.scale is None else t.scale.detach().clone()
        return {name: FlipCount(None if first else float(flips), float(updates), None if first else float(recoded))
                for name, first, (flips, updates, recoded) in zip(self._tracked, firsts, counts.tolist())}


def _any_scale_moved(tracked: list[_Tracked]) -> bool:
    """Whether any weight's scale differs from the one its codes were taken at (a host sync, if any has)."""
    moved = [(t.scale != t.code_scale).any() for t in tracked if t.codes is not None and t.scale is not None]
    return bool(moved) and bool(torch.stack(moved).any())


def _codes_and_counts(tracked: list[_Tracked], rescaled: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each weight's forward codes at its current scale, and int64 ``[[flips, non-zero gradient entries,
    re-codes], ...]`` as :class:`FlipCount` defines them (0 without previous codes or gradient). Without
    ``rescaled`` every scale is taken to be the codes' own, and each weight is encoded once."""
    fused = [t for t in tracked if not t.fmt.is_native]
    weights = [_flat(f.weight) for f in fused]
    previous = [_flat(f.codes) for f in fused]
    grads = [_flat(f.weight.grad) for f in fused]
    scales = [_flat_scale(f.scale, f.weight) for f in fused]
    code_scales = [_flat_scale(_code_scale(f), f.weight) for f in fused]
    params = [_code_params(f.fmt, True, 0x7F if f.fmt.has_nan else 0, _compute_dtype(f.weight.dtype), f.weight.device)
              for f in fused]  # the codes forward_codes gives
    # The first measure, with no codes to compare, is not worth compiling a graph for.
    size = sum(w.numel() for w in weights) if all(p is not None for p in previous) else 0
    fused_out = iter(_call(_flip_kernel, size, weights, previous, grads, code_scales, scales, params,
                           rescaled=rescaled))
    codes, counts = [], []
    for t in tracked:
        if t.fmt.is_native:
            held = forward_codes(t.weight, t.fmt, _code_scale(t))
            code = forward_codes(t.weight, t.fmt, t.scale) if rescaled and t.scale is not None else None
            count = _flip_counts(held, t.codes, code, t.weight.grad)
            code = held if code is None else code
        else:
            code, count = next(fused_out)
        codes.append(code.view(t.weight.shape))
        counts.append(count)
    return codes, torch.stack(counts)


def _code_scale(t: _Tracked) -> torch.Tensor | None:
    """The scale to compare at: the previous codes' own, or the current one when there are none."""
    return t.scale if t.codes is None else t.code_scale


def _flat_scale(scale, weight: torch.Tensor) -> torch.Tensor:
    """The scale as the flat weight's: 0-d as it is, a per-row or per-element one spread over every element."""
    scale = _scale_tensor(scale, weight)
    return scale if scale.dim() == 0 else scale.expand(weight.shape).reshape(-1)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1).detach()  # not a view: the compiled graph's guards stay put


def _flip_kernel(weights, previous, grads, code_scales, scales, params, rescaled: bool,
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per flat 8-bit weight: its uint8 codes at its scale and counts (see :func:`_codes_and_counts`).
    Compiled, one call serves every weight; ``rescaled`` picks one of two graphs."""
    out = []
    for weight, before, grad, code_scale, scale, code_params in zip(weights, previous, grads, code_scales, scales,
                                                                    params):
        held = _code_numbers(weight, code_scale, signed_zero=False, **code_params)  # compared as numbers: faster
        codes = _code_numbers(weight, scale, signed_zero=False, **code_params) if rescaled else None
        before = None if before is None else before.to(held.dtype)
        out.append(((held if codes is None else codes).to(torch.uint8), _flip_counts(held, before, codes, grad)))
    return out


def _flip_counts(held, previous, rescaled, grad):
    """``[#(held != previous), #(grad != 0), #(rescaled != held)]``, int64; 0 for a missing operand.
    ``held`` are the codes now at the previous scale, ``rescaled`` those at the current one."""
    zero = torch.zeros((), dtype=torch.int64, device=held.device)
    return torch.stack([zero if previous is None else _count(held != previous).long(),
                        zero if grad is None else _count(grad != 0).long(),
                        zero if rescaled is None else _count(rescaled != held).long()])


# ---- spectra --------------------------------------------------------------------------------------

_EPS = torch.finfo(torch.float32).eps


def _finite_matrix(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 copy of a 2-D weight's float32 values with non-finite entries zeroed (the eigensolvers
    raise on them), and whether it had none, as a device tensor so that checking it costs no extra sync.
    A float64 sum of float32 values cannot overflow, so it is finite exactly when they all are."""
    if weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(f"rank metrics need a non-empty 2-D weight, got shape {tuple(weight.shape)}")
    matrix = weight.detach().float().double()
    finite = torch.isfinite(matrix.sum())
    return matrix.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), finite


def _noise_floor(s: torch.Tensor, shape) -> torch.Tensor:
    """Singular values below this are float32 rounding noise (numpy's ``matrix_rank`` tolerance)."""
    return s[0] * max(shape) * _EPS


def _gram(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The Gram matrix of the smaller side, ``WᵀW`` for a tall ``W`` and ``WWᵀ`` for a wide one (its
    eigenvalues are the squared singular values), and whether ``W`` is tall."""
    tall = w.shape[0] >= w.shape[1]
    return (w.mT @ w if tall else w @ w.mT), tall


def _singular_values(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Descending singular values from a Gram matrix's ascending eigenvalues (rounding can make the
    smallest slightly negative). In float64 their error is about 1e-8 of the largest, far below the
    float32 noise floor that :func:`_rank_values` cuts at."""
    return eigenvalues.flip(0).clamp(min=0).sqrt()


def _rank_values(s: torch.Tensor, shape) -> torch.Tensor:
    """[stable rank, effective rank, spectral norm] from descending singular values, on device.

    The zero matrix has rank 0 by both measures (a layer whose weights all vanished has collapsed, and
    the trend detector should see it). Ratios to the top value keep tiny matrices from underflowing."""
    top = s[0]
    s = torch.where(s > _noise_floor(s, shape), s, 0.0)  # a rank-1 matrix has effective rank 1, not 1.0001
    nonzero = top > 0
    stable = (s / torch.where(nonzero, top, 1.0)).square().sum()
    p = s / torch.where(nonzero, s.sum(), 1.0)
    effective = torch.where(nonzero, torch.exp(-torch.special.xlogy(p, p).sum()), 0.0)
    return torch.stack([stable, effective, top])


def rank_metrics(weight: torch.Tensor) -> dict[str, float]:
    """``stable_rank`` (‖W‖F² / ‖W‖2²), ``effective_rank`` (exp of the Shannon entropy of the singular
    values normalised to sum 1; Roy & Vetterli 2007) and ``spectral_norm`` (‖W‖2), from the singular values.

    Singular values below numpy's ``matrix_rank`` tolerance count as zero. Zero matrix: all three 0.
    Any NaN or inf entry: all three NaN. A weight that is not a non-empty matrix raises ValueError."""
    matrix, finite = _finite_matrix(weight)
    values = _rank_values(_singular_values(torch.linalg.eigvalsh(_gram(matrix)[0])), matrix.shape)
    return dict(zip(RANK_KEYS, torch.where(finite, values, math.nan).tolist()))


def _subspace_angle_deg(u_prev: torch.Tensor, u_cur: torch.Tensor) -> torch.Tensor:
    cosines = torch.linalg.svdvals(u_prev.mT @ u_cur)
    return torch.rad2deg(torch.arccos(cosines.min().clamp(max=1.0)))


def principal_subspace_angle(u_prev: torch.Tensor, u_cur: torch.Tensor) -> float:
    """Largest principal angle, in degrees, between the column spans of two orthonormal bases: 0 when
    they span the same subspace, 90 when a direction of one is orthogonal to all of the other.

    arccos of the smallest singular value of ``u_prevᵀ u_cur`` (Björck & Golub 1973). In float32 the
    noise floor is about 0.1°, far below the tens of degrees that mean a subspace was rewritten."""
    return _subspace_angle_deg(u_prev.float(), u_cur.float()).item()


def _top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Descending singular values of a float64 matrix and its top-k left and right singular vectors
    (float32 columns, k capped at min(m, n)), from one eigendecomposition of the Gram matrix, and
    whether that subspace is defined: k singular values above the noise floor (else the decomposition
    fills it with arbitrary null directions). A tie between the k-th and (k+1)-th singular values also
    leaves it undefined, which no cheap test can see."""
    gram, tall = _gram(matrix)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    s = _singular_values(eigenvalues)
    k = min(k, s.numel())
    floor = _noise_floor(s, matrix.shape)
    # The top-k eigenvectors are one side's singular vectors; the other side's are W v / s (or Wᵀ u / s),
    # with 1 for s where the subspace is undefined anyway, to keep them finite. (LAPACK's vectors come
    # column-major, which torch's matmul handles ten times slower.)
    top = vectors[:, -k:].flip(1).contiguous()
    other = (matrix @ top if tall else matrix.mT @ top) / torch.where(s[:k] > floor, s[:k], 1.0)
    u_k, v_k = (t.float() for t in ((other, top) if tall else (top, other)))
    return s, u_k, v_k, s[k - 1] > floor


def _gradient_shares(grad: torch.Tensor, u_k: torch.Tensor, v_k: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[grad_topk_share, principal_alignment, minor_alignment]`` on device (see
    :func:`critical_layer_metrics`), and whether the gradient is non-zero (else they are 0 / 0)."""
    # ‖U_k U_kᵀ G‖F = ‖U_kᵀ G‖F and ‖U_k U_kᵀ G V_k V_kᵀ‖F = ‖U_kᵀ G V_k‖F for orthonormal columns.
    left = u_k.mT @ grad
    total = grad.square().sum()
    both_sides = (left @ v_k).square().sum() / total
    principal = (left.square().sum() / total).clamp(max=1.0)  # rounding must not push minor below 0
    return torch.stack([both_sides, principal, 1 - principal]), total != 0


def _python_values(values: torch.Tensor, measured: torch.Tensor) -> list[float | None]:
    """``values`` as floats where ``measured`` (broadcast to them), None where not, after one host sync."""
    values, measured = torch.stack([values.double(), measured.double().expand(values.shape)]).tolist()
    return [value if ok else None for value, ok in zip(values, measured)]


def gradient_topk_share(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, k: int) -> float | None:
    """Share of ‖G‖F² that falls in the span of the top-k singular directions, ‖U_k U_kᵀ G V_k V_kᵀ‖F²
    / ‖G‖F², in [0, 1]; the rest is orthogonal to them on at least one side. None for a zero gradient.

    ``u`` and ``v`` hold the left and right singular vectors as columns (``v = Vh.mT``). Near 1 the step
    rewrites the directions the layer already uses; a random gradient puts about k² / (m n) there."""
    shares, nonzero = _gradient_shares(grad.float(), u[:, :k].float(), v[:, :k].float())
    return _python_values(shares[:1], nonzero)[0]


def gradient_alignment(grad: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[float | None, float | None]:
    """``(principal, minor)``: the shares of ‖G‖F² inside and outside the span of the weight's top-k
    left singular vectors, ‖U_k U_kᵀ G‖F² / ‖G‖F² and 1 minus that (k capped at min(m, n)).

    Principal near 1: the step pushes on the directions the layer's output already uses (it can rotate
    or rescale them); a random gradient puts about k / m there. One eigendecomposition, as in
    :func:`critical_layer_metrics`, which returns the same two as ``principal_alignment`` and
    ``minor_alignment``. ``(None, None)``, not measured, for a zero gradient or an undefined top-k
    subspace (fewer than k singular values above the noise floor); NaN for a non-finite weight or
    gradient. Mismatched shapes or k < 1 raise ValueError."""
    if grad.shape != weight.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from weight shape {tuple(weight.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    matrix, finite = _finite_matrix(weight)
    _, u_k, v_k, defined = _top_singular(matrix, k)
    shares, nonzero = _gradient_shares(grad.detach().float(), u_k, v_k)
    principal, minor = _python_values(torch.where(finite, shares[1:], math.nan), (defined & nonzero) | ~finite)
    return principal, minor


def critical_layer_metrics(weight: torch.Tensor, *, grad: torch.Tensor | None = None,
                           previous_basis: torch.Tensor | None = None, k: int = 8,
                           ) -> tuple[dict[str, float | None], torch.Tensor | None]:
    """:func:`rank_metrics` plus the clobbering signals ``subspace_angle_deg``, ``grad_topk_share``
    (:func:`gradient_topk_share`), ``principal_alignment`` and ``minor_alignment``
    (:func:`gradient_alignment`), from one eigendecomposition of the Gram matrix.

    Returns ``(metrics, basis)``: ``basis`` is the top-k left singular vectors (k capped at min(m, n)),
    float32; pass it back as ``previous_basis`` at the layer's next check. Not measured, so None: the
    angle without a previous basis, the gradient shares without a gradient or with a zero one, and all
    four when the top-k subspace is undefined (see :func:`gradient_alignment`), ``basis`` then None too.
    A non-finite weight makes every value NaN and ``basis`` None.
    """
    matrix, finite = _finite_matrix(weight)
    s, basis, v_k, defined = _top_singular(matrix, k)
    nan = torch.full((), math.nan, dtype=torch.float64, device=s.device)
    angle = nan if previous_basis is None else _subspace_angle_deg(previous_basis.float(), basis).double()
    shares, nonzero = (nan.expand(3), False) if grad is None else _gradient_shares(grad.detach().float(), basis, v_k)
    values = torch.cat([_rank_values(s, matrix.shape), angle[None], shares.double(), defined.double()[None]])
    always, rotated, pushed = torch.ones_like(defined), defined & (previous_basis is not None), defined & nonzero
    measured = torch.stack([always] * 3 + [rotated] + [pushed] * 3 + [always])
    *values, ok = _python_values(torch.where(finite, values, nan), measured | ~finite)
    return dict(zip(RANK_KEYS + CLOBBER_KEYS, values)), basis if ok == 1 else None  # NaN: not finite


# ---- rank-collapse warnings -----------------------------------------------------------------------

@dataclass
class _Trend:
    step: int  # of the last finite value
    ema: float | None = None  # None until the first finite value at or after warm-up, where it starts
    peak: float | None = None  # highest EMA since then


class RankTrendDetector:
    """Warns when a layer's rank metric has fallen well below its post-warm-up peak.

    Warm-up is where ranks are expected to move, so the detector looks at what follows it only: its EMA
    starts at the layer's first value at or after ``warmup_steps``, and warns while it is below
    ``(1 - drop_threshold) x`` its peak since then (the critical threshold for critical layers). The peak
    rather than the level at the end of warm-up, so that a layer that first grows and then collapses is
    caught; a fresh EMA rather than one carried through warm-up, whose lag would remember the higher
    ranks of early training and warn about a rank that fell during warm-up and has since risen.

    The EMA decays by ``ema_beta`` per training step, so a sparse check weighs the new value by
    ``1 - ema_beta ** steps_since_last_check``: it stands for the whole interval since the last check.
    Hence a drop from a steady level by a share ``d`` above the threshold ``t`` warns at the first check
    at least ``ln(d / (d - t)) / -ln(ema_beta)`` steps after the last check before the drop, whatever
    ``rank_every``: at the defaults, 49 steps for an 80% drop of a normal layer and 24 for a critical
    one, so within 2 checks with ``rank_every: 25`` or ``50``.
    """

    def __init__(self, config: RankTrendConfig = RankTrendConfig()):
        self.config = config
        self._trends: dict[str, _Trend] = {}

    def state_dict(self) -> dict[str, dict]:
        return {layer: dataclasses.asdict(trend) for layer, trend in self._trends.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self._trends = {layer: _Trend(**trend) for layer, trend in state.items()}

    def is_critical(self, layer: str) -> bool:
        """Whether a critical pattern matches: fnmatch globs with an implicit ``*`` at both ends, so
        ``"c_proj"`` matches ``"transformer.h.0.attn.c_proj.weight"``. Case-sensitive."""
        return any(fnmatchcase(layer, f"*{pattern}*") for pattern in self.config.critical_patterns)

    def update(self, layer: str, step: int, value: float) -> bool:
        """Feed the layer's metric at ``step``; returns whether it warns now (never during warm-up).

        A NaN or inf value is skipped: no warning, and the EMA, peak and step stay as they were. A second
        value at the same step weighs nothing; a step earlier than the last one raises ValueError."""
        if not math.isfinite(value):
            return False
        trend = self._trends.get(layer)
        if trend is None:
            trend = self._trends[layer] = _Trend(step)
        elif step < trend.step:
            raise ValueError(f"{layer}: step {step} comes before the previous step {trend.step}")
        if step < self.config.warmup_steps:
            trend.step = step
            return False
        if trend.ema is None:
            trend.ema = trend.peak = value
        else:
            keep = self.config.ema_beta ** (step - trend.step)
            trend.ema = keep * trend.ema + (1 - keep) * value
            trend.peak = max(trend.peak, trend.ema)
        trend.step = step
        drop = self.config.critical_drop_threshold if self.is_critical(layer) else self.config.drop_threshold
        return trend.ema < (1 - drop) * trend.peak
