"""Per-layer training diagnostics, cheap enough to leave on in every run.

* :class:`FlipTracker` counts, per weight, how many quantized codes changed (flips) against how many
  entries got a gradient (updates). ``stall_ratio = 1 - flips / updates`` is the share of updates the
  format swallowed: the weight moved, but not across a grid point, so the forward pass saw nothing.
* :func:`rank_metrics`: stable rank, effective rank and spectral norm from the singular values.
* :func:`critical_layer_metrics`: the same plus the two "clobbering" signals (how far the top-k
  singular subspace rotated since the last check, and how much of the gradient pushes on it), for the
  layers whose collapse ends a run.
* :class:`RankTrendDetector`: rank-collapse warnings from a per-layer EMA of a rank metric.

The spectra come from the eigenvalues (and, for critical layers, eigenvectors) of the smaller Gram
matrix, ``WᵀW`` or ``WWᵀ``, in float64: two to three times cheaper than an SVD of ``W`` on a CPU, and,
since float64 more than absorbs the squared condition number, at least as accurate as a float32 SVD.

Every function returns Python floats after at most one host synchronisation, so the trainer can put
the results straight into Parquet rows. A value that cannot be measured is NaN, never a sentinel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch

from altgrad.formats import FPFormat, get_format
from altgrad.quantize import _call, _code_numbers, _code_params, _compute_dtype, _count, _scale_tensor, encode

RANK_KEYS = ("stable_rank", "effective_rank", "spectral_norm")
CLOBBER_KEYS = ("subspace_angle_deg", "grad_topk_share")

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
    flips: float  # entries whose code changed since the previous measure(); NaN at the first measure()
    updates: float  # entries with a non-zero gradient at this measure()


def stall_ratio(flips: float, updates: float) -> float:
    """``1 - flips / updates``; NaN when nothing was updated or flips are unknown.

    Not clamped: it goes negative when more codes flip than entries got a gradient (AdamW momentum and
    weight decay move weights with a zero gradient; a changed scale moves the whole grid)."""
    return 1.0 - flips / updates if updates > 0 else math.nan


@dataclass
class _Tracked:
    weight: torch.Tensor
    fmt: FPFormat
    scale: torch.Tensor | None
    codes: torch.Tensor | None = None  # as of the previous measure()


class FlipTracker:
    """Counts code flips and gradient updates per named weight, keeping only the codes between calls.

    Call :meth:`measure` right after ``optimizer.step()``, while ``.grad`` still holds the step's
    gradient: then the codes are those the next forward sees, and the updates are this step's. Flips
    are counted against the previous measure(), so they cover one optimizer step when measure() runs
    every step (``flips_every: 1``) and the whole interval otherwise. The first measure() after
    :meth:`track` has nothing to compare with and reports NaN flips: the codes at ``track`` time would
    use a scale the first forward has not set yet.
    """

    def __init__(self):
        self._tracked: dict[str, _Tracked] = {}

    def track(self, name: str, weight: torch.Tensor, fmt, scale: torch.Tensor | None = None) -> None:
        """Follow ``weight`` (the parameter itself, read at every measure) as ``fmt`` quantizes it.

        ``scale`` is the tensor the forward multiplies by before rounding, also read at every measure:
        pass the ``Scaler.scale`` buffer, which the scaler updates in place. A scale change that moves
        the grid counts as flips, since the forward's values change. Tracking a name again restarts it."""
        self._tracked[name] = _Tracked(weight, get_format(fmt), scale)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The codes of the last measure, so a resumed run counts its first flips against them."""
        return {name: t.codes for name, t in self._tracked.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        for name, codes in state.items():
            self._tracked[name].codes = codes

    @property
    def nbytes(self) -> int:
        """Memory held between calls: 1 byte a weight for 8-bit formats, 2 for bf16/fp16, 4 for fp32."""
        return sum(t.codes.nbytes for t in self._tracked.values() if t.codes is not None)

    @torch.no_grad()
    def measure(self) -> dict[str, FlipCount]:
        """Flips since the previous call and current updates, per tracked name, read back in one host
        sync. 8-bit weights are encoded, compared and counted in fused passes, all in one call."""
        if not self._tracked:
            return {}
        tracked = list(self._tracked.values())
        firsts = [t.codes is None for t in tracked]
        codes, counts = _codes_and_counts(tracked)
        for t, c in zip(tracked, codes):
            t.codes = c
        return {name: FlipCount(math.nan if first else float(flips), float(updates))
                for name, first, (flips, updates) in zip(self._tracked, firsts, counts.tolist())}


def _codes_and_counts(tracked: list[_Tracked]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each weight's forward codes, and int64 ``[[flips against its previous codes, non-zero gradient
    entries], ...]`` (0 without previous codes or gradient)."""
    fused = [t for t in tracked if not t.fmt.is_native]
    weights = [_flat(f.weight) for f in fused]
    previous = [_flat(f.codes) for f in fused]
    grads = [_flat(f.weight.grad) for f in fused]
    scales = [_scale_tensor(f.scale, f.weight) for f in fused]
    params = [_code_params(f.fmt, True, 0x7F if f.fmt.has_nan else 0, _compute_dtype(f.weight.dtype), f.weight.device)
              for f in fused]  # the codes forward_codes gives
    # The first measure, with no codes to compare, is not worth compiling a graph for.
    size = sum(w.numel() for w in weights) if all(p is not None for p in previous) else 0
    fused_out = iter(_call(_flip_kernel, size, weights, previous, grads, scales, params))
    codes, counts = [], []
    for t in tracked:
        if t.fmt.is_native:
            code = forward_codes(t.weight, t.fmt, t.scale)
            count = _flip_counts(code, t.codes, t.weight.grad)
        else:
            code, count = next(fused_out)
        codes.append(code.view(t.weight.shape))
        counts.append(count)
    return codes, torch.stack(counts)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1).detach()  # not a view: the compiled graph's guards stay put


def _flip_kernel(weights, previous, grads, scales, params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per flat 8-bit weight: its uint8 codes and counts (see :func:`_codes_and_counts`). Compiled,
    one call serves every weight."""
    out = []
    for weight, before, grad, scale, code_params in zip(weights, previous, grads, scales, params):
        codes = _code_numbers(weight, scale, signed_zero=False, **code_params)  # compared as numbers: faster
        before = None if before is None else before.to(codes.dtype)
        out.append((codes.to(torch.uint8), _flip_counts(codes, before, grad)))
    return out


def _flip_counts(codes, previous, grad):
    zero = torch.zeros((), dtype=torch.int64, device=codes.device)
    return torch.stack([zero if previous is None else _count(codes != previous).long(),
                        zero if grad is None else _count(grad != 0).long()])


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


def _topk_share(grad: torch.Tensor, u_k: torch.Tensor, v_k: torch.Tensor) -> torch.Tensor:
    # ‖U_k U_kᵀ G V_k V_kᵀ‖F = ‖U_kᵀ G V_k‖F for orthonormal columns; 0 / 0 is NaN for a zero gradient.
    return (u_k.mT @ grad @ v_k).square().sum() / grad.square().sum()


def gradient_topk_share(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, k: int) -> float:
    """Share of ‖G‖F² that falls in the span of the top-k singular directions, ‖U_k U_kᵀ G V_k V_kᵀ‖F²
    / ‖G‖F², in [0, 1]; the rest is orthogonal to them on at least one side. NaN for a zero gradient.

    ``u`` and ``v`` hold the left and right singular vectors as columns (``v = Vh.mT``). Near 1 the step
    rewrites the directions the layer already uses; a random gradient puts about k² / (m n) there."""
    return _topk_share(grad.float(), u[:, :k].float(), v[:, :k].float()).item()


def critical_layer_metrics(weight: torch.Tensor, *, grad: torch.Tensor | None = None,
                           previous_basis: torch.Tensor | None = None, k: int = 8,
                           ) -> tuple[dict[str, float], torch.Tensor | None]:
    """:func:`rank_metrics` plus ``subspace_angle_deg`` and ``grad_topk_share``, from one eigen-
    decomposition of the Gram matrix.

    Returns ``(metrics, basis)``: ``basis`` is the top-k left singular vectors (k capped at min(m, n)),
    float32; pass it back as ``previous_basis`` at the layer's next check. The angle is NaN without a
    previous basis, the share NaN without a gradient or with a zero one. Both are NaN, and ``basis`` is
    None, when the top-k subspace is not defined: fewer than k singular values above the noise floor (the
    decomposition then fills the subspace with arbitrary null directions) or a non-finite weight. A tie
    between the k-th and (k+1)-th singular values also leaves it undefined, which no cheap test can see.
    """
    matrix, finite = _finite_matrix(weight)
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
    basis, v_k = (t.float() for t in ((other, top) if tall else (top, other)))
    nan = torch.full((), math.nan, device=s.device)
    angle = nan if previous_basis is None else _subspace_angle_deg(previous_basis.float(), basis)
    share = nan if grad is None else _topk_share(grad.detach().float(), basis, v_k)
    defined = finite & (s[k - 1] > floor)
    *values, ok = torch.cat([
        torch.where(finite, _rank_values(s, matrix.shape), math.nan),
        torch.where(defined, torch.stack([angle, share]).double(), math.nan),
        defined.double()[None],
    ]).tolist()
    return dict(zip(RANK_KEYS + CLOBBER_KEYS, values)), basis if ok else None


# ---- rank-collapse warnings -----------------------------------------------------------------------

@dataclass(frozen=True)
class RankTrendConfig:
    """Knobs of :class:`RankTrendDetector`. Every duration is in training steps, whatever the check
    interval, so ``rank_every`` changes how often the detector looks, not when it may warn."""

    warmup_steps: int = 200  # no warning before this step; the reference level is taken from here on
    ema_beta: float = 0.98  # EMA decay per training step: a memory of about 1 / (1 - beta) = 50 steps
    drop_threshold: float = 0.5  # warn when the EMA falls below (1 - this) x its peak since warm-up
    critical_drop_threshold: float = 0.3  # the same for critical layers: smaller, so they warn sooner
    critical_patterns: tuple[str, ...] = ("lm_head", "c_proj")  # globs matched anywhere in the name
    metric: str = "stable_rank"  # the rank_metrics key the trainer feeds to update()

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        for key in ("drop_threshold", "critical_drop_threshold"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if isinstance(self.critical_patterns, str):
            raise ValueError(f"critical_patterns must be a sequence of patterns, got the string "
                             f"{self.critical_patterns!r}")
        if self.metric not in RANK_KEYS[:2]:
            raise ValueError(f"metric must be one of {', '.join(RANK_KEYS[:2])}, got {self.metric!r}")


@dataclass
class _Trend:
    ema: float
    step: int  # of the last finite value
    peak: float = -math.inf  # highest EMA since warm-up ended


class RankTrendDetector:
    """Warns when a layer's rank metric has fallen well below its post-warm-up peak.

    Per layer it keeps an EMA that decays by ``ema_beta`` per training step, so a sparse check weighs
    the new value by ``1 - ema_beta ** steps_since_last_check``. From ``warmup_steps`` on it records
    the EMA's peak and warns while the EMA is below ``(1 - drop_threshold) x peak`` (the critical
    threshold for critical layers). The peak rather than the level at the end of warm-up, so that a
    layer that first grows and then collapses is caught. Warm-up is where ranks are expected to move: a
    collapse inside it becomes the reference, not a warning.
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
        """Feed the layer's metric at ``step``; returns whether it warns now.

        A NaN or inf value is skipped: no warning, and the EMA, peak and step stay as they were. A second
        value at the same step weighs nothing; a step earlier than the last one raises ValueError."""
        if not math.isfinite(value):
            return False
        trend = self._trends.get(layer)
        if trend is None:
            trend = self._trends[layer] = _Trend(ema=value, step=step)
        elif step < trend.step:
            raise ValueError(f"{layer}: step {step} comes before the previous step {trend.step}")
        else:
            keep = self.config.ema_beta ** (step - trend.step)
            trend.ema = keep * trend.ema + (1 - keep) * value
            trend.step = step
        if step < self.config.warmup_steps:
            return False
        trend.peak = max(trend.peak, trend.ema)
        drop = self.config.critical_drop_threshold if self.is_critical(layer) else self.config.drop_threshold
        return trend.ema < (1 - drop) * trend.peak
