"""Simulated low-precision linear layers, and the policies that put them into a model.

:class:`QuantLinear` is an ``nn.Linear`` whose matmul sees its input activation and weight rounded to
a format, each through its own :class:`~altgrad.scaling.Scaler`, and whose output gradient is rounded
on the way back (the FP8 training recipe: E4M3-style forward, E5M2 gradients). The matmul itself runs
in fp32, as an FP8 tensor core accumulates in fp32. Weights stay fp32 masters; rounding passes
gradients straight through.

fp32 goes through the same class and code path with rounding that changes nothing, so the baseline
is bitwise ``nn.Linear`` and differs from the 8-bit runs only in the format.

Each quantization point ("weight", "input", "grad") counts overflow, underflow and NaN on the device
during training; :meth:`QuantLinear.pop_stats` reads them with one host sync.

Under row or block scaling (``ScalingConfig.granularity``) every GEMM operand is rounded along that GEMM's
reduction dim (:class:`_BlockScaledLinear`): the input and weight twice (row-wise for the forward,
column-wise for the backward, as Transformer Engine's MXFP8 recipe does), the output gradient twice in the
backward. The weight's row-wise block scales, the ones its forward value uses, are the layer's
``weight_scale``: one per element, so that optimizers and flip tracking read each weight's own grid.

A layer can switch to *protected mode* (:meth:`QuantLinear.protect`, driven by
:mod:`altgrad.protection`): its forward weight becomes a frozen base plus a trained low-rank product,
``W_p + B @ A``, rounded to the layer's format as the plain weight is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.config import LAYER_POLICIES, ScalingConfig
from altgrad.formats import FPFormat, get_format
from altgrad.quantize import ROUNDINGS, quantize, quantize_with_stats
from altgrad.scaling import Scaler

POINTS = ("weight", "input", "grad")
DEFAULT_GRAD_FORMAT = "E5M2"  # range over precision: gradients span more binades than they need digits

# fp32 and bf16 have fp32's exponent range, so a per-tensor scale buys nothing: they are plain torch casts.
_UNSCALED = ScalingConfig(recipe="none")


def grad_format_for(fmt, eight_bit=DEFAULT_GRAD_FORMAT) -> FPFormat | None:
    """The output-gradient format that goes with weight format ``fmt``: ``eight_bit`` for an 8-bit
    format (None: leave gradients alone), the format itself for bf16/fp16, and None for fp32."""
    fmt = get_format(fmt)
    if fmt.name == "fp32" or (not fmt.is_native and eight_bit is None):
        return None
    return fmt if fmt.is_native else get_format(eight_bit)


@dataclass(frozen=True)
class QuantConfig:
    """The formats and rounding of one :class:`QuantLinear`. Specs are normalised to FPFormat.

    ``activation`` None means the weight's format; ``grad`` "auto" means :func:`grad_format_for`
    the weight's format, and None turns gradient rounding off.
    """

    weight: FPFormat | str = "E4M3"
    activation: FPFormat | str | None = None
    grad: FPFormat | str | None = "auto"
    scaling: ScalingConfig = ScalingConfig()
    saturate: bool = True
    rounding: str = "nearest"

    def __post_init__(self):
        weight = get_format(self.weight)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "activation", get_format(self.activation if self.activation is not None else weight))
        grad = grad_format_for(weight) if self.grad == "auto" else self.grad
        object.__setattr__(self, "grad", None if grad is None else get_format(grad))
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r} is not one of {', '.join(ROUNDINGS)}")

    def format_of(self, point: str) -> FPFormat | None:
        return {"weight": self.weight, "input": self.activation, "grad": self.grad}[point]


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float()


class _QuantizeGrad(torch.autograd.Function):
    """Identity on ``y``; backward rounds the output gradient at the layer's "grad" point, so that the
    weight and input gradients are computed from it, as in FP8 training. The bias, which ``y`` already
    holds (added without autograd), gets the unrounded gradient summed as nn.Linear sums it: only
    GEMM operands are 8-bit, as in Transformer Engine and torchao."""

    @staticmethod
    def forward(ctx, y, bias, layer):
        ctx.layer, ctx.bias_shape = layer, None if bias is None else bias.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        bias_grad = grad.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[1] else None
        return ctx.layer._quantize("grad", grad), bias_grad, None


class QuantLinear(nn.Linear):
    """``nn.Linear`` with simulated low-precision weight, input activation and output gradient.

    Every point is scaled per ``config.scaling`` except fp32 and bf16 ones, which are plain casts.
    The rounded output gradient feeds the input and weight gradients; the bias gradient is the sum of
    the unquantized output gradient (only GEMM operands are 8-bit, as in Transformer Engine and torchao).
    In training mode each call advances the points' amax histories and, when ``stats_enabled``, adds
    to their on-device counts. In eval mode it uses the current scales and changes nothing, so
    evaluating never alters the training run.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: QuantConfig = QuantConfig(), device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config
        self.stats_enabled = True
        self.scalers = nn.ModuleDict({
            point: Scaler(fmt, _point_scaling(fmt, config.scaling))
            for point in POINTS if (fmt := config.format_of(point)) is not None
        }).to(self.weight.device)
        # Per point: overflow, underflow and NaN counts, last amax, last scale (see Scaler.quantize's
        # ``counts``), and under row/block scaling the extreme block scales (Scaler.quantize_blocks's
        # ``extremes``). Not checkpointed.
        for point in POINTS:
            self.register_buffer(f"_stats_{point}", torch.zeros(5, dtype=torch.float64, device=self.weight.device),
                                 persistent=False)
            self.register_buffer(f"_extremes_{point}", torch.zeros(2, dtype=torch.float64,
                                                                   device=self.weight.device), persistent=False)
        self.blocked = any(self._blocked(point) for point in self.scalers)
        if self._blocked("weight"):  # each weight's row-wise block scale, as the last training forward set it
            self.register_buffer("weight_scales", torch.ones_like(self.weight, dtype=torch.float32))
        self._numel = dict.fromkeys(POINTS, 0)
        # Protected mode (see protect()): the frozen base W_p and the trained factors B, A; None when the
        # whole weight trains. The base and factors are module state, so state_dict carries the mode.
        self.register_buffer("protected_base", None)
        self.register_parameter("protected_b", None)
        self.register_parameter("protected_a", None)
        self.effective_grad: torch.Tensor | None = None  # protected mode: the last backward's dL/dW

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        """A QuantLinear that shares ``linear``'s parameters (so tied weights and optimizers still see them).

        >>> layer = QuantLinear.from_linear(nn.Linear(64, 32), QuantConfig(
        ...     weight="E4M3", activation="E4M3", grad="E5M2", scaling=ScalingConfig(recipe="current")))
        >>> layer.extra_repr()
        'in_features=64, out_features=32, bias=True, weight=E4M3, input=E4M3, grad=E5M2'
        """
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.train(linear.training)

    @property
    def weight_format(self) -> FPFormat:
        return self.config.weight

    @property
    def weight_scale(self) -> torch.Tensor:
        """The live weight scale: per tensor, the weight Scaler's 0-d buffer (under delayed scaling the
        scale the next forward uses; under "current" the last forward's; under "none" 1). Under row/block
        scaling, ``weight_scales``: every element's block scale (x's shape, multiplying as a per-tensor
        scale does) from the last training forward."""
        return self.weight_scales if self._blocked("weight") else self.scalers["weight"].scale

    @torch.no_grad()
    def block_weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Every element's scale as the forward would set it for ``weight`` (row/block scaling), changing
        nothing: where GridOptim re-snaps a weight whose block's amax moved binade."""
        scale = torch.empty_like(weight, dtype=self.weight_scales.dtype)
        self.scalers["weight"].quantize_blocks(weight, 1, scale_out=scale, saturate=self.config.saturate)
        return scale

    def _blocked(self, point: str) -> bool:
        """Whether ``point`` has row/block scales (else one per tensor, or none)."""
        return point in self.scalers and not self.scalers[point].config.per_tensor

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass sees it now, without touching the amax history."""
        return self._quantize_frozen("weight", self.effective_weight())

    # ---- protected mode ------------------------------------------------------------------------
    @property
    def protected_rank(self) -> int:
        """Rank of the trained factor B·A in protected mode; 0 when the whole weight trains."""
        return 0 if self.protected_b is None else self.protected_b.shape[1]

    def effective_weight(self) -> torch.Tensor:
        """The fp32 weight the forward rounds: ``weight``, or in protected mode ``W_p + B @ A`` (two
        rounded operations, never a fused addmm, so that :meth:`protect` can build W_p against the very
        product the forward computes)."""
        if self.protected_b is None:
            return self.weight
        return self.protected_base + self.protected_b @ self.protected_a

    @torch.no_grad()
    def protect(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Train only the factors from now on: the forward's weight becomes ``W_p + B @ A`` with
        ``W_p := W - B @ A`` frozen (a buffer), ``B`` (out x r) and ``A`` (r x in) new parameters.

        The effective weight then equals ``W`` to within one float32 rounding of each entry of ``W_p``
        (exact equality is impossible in general: ``W - P + P`` is not ``W`` in floating point when
        ``|W - P| > |W|``). ``weight`` stays the layer's parameter, with no gradient while protected (an
        optimizer skips it and keeps its state), and mirrors the effective weight after every
        :meth:`refresh_weight`, so whatever reads ``weight`` (flips, master ranks) reads the weight that
        trains. Protecting a protected layer merges it first."""
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != self.out_features or a.shape[1] != self.in_features \
                or b.shape[1] != a.shape[0] or b.shape[1] < 1:
            raise ValueError(f"factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not make a "
                             f"{self.out_features} x {self.in_features} weight")
        self.unprotect()
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.protected_b = nn.Parameter(b.detach().to(**like).contiguous().clone())
        self.protected_a = nn.Parameter(a.detach().to(**like).contiguous().clone())
        self.protected_base = self.weight.detach() - self.protected_b @ self.protected_a
        self.refresh_weight()

    @torch.no_grad()
    def unprotect(self) -> None:
        """Merge: ``weight := W_p + B @ A`` exactly as the forward computes it (so the layer's function
        does not change, bit for bit), and train the whole weight again. A no-op when not protected."""
        if self.protected_b is None:
            return
        self.refresh_weight()
        self.protected_base = self.protected_b = self.protected_a = None
        self.effective_grad = None

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Copy the effective weight into ``weight`` after the factors moved (protected mode only)."""
        if self.protected_b is not None:
            self.weight.copy_(self.effective_weight())

    def _keep_effective_grad(self, grad: torch.Tensor) -> None:
        self.effective_grad = grad

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Enter or leave protected mode as the saved state was, then load it (base and factors included)."""
        b, a = state_dict.get(prefix + "protected_b"), state_dict.get(prefix + "protected_a")
        if b is None or a is None:
            self.protected_base = self.protected_b = self.protected_a = None  # weight comes from the state
        elif self.protected_b is None or self.protected_b.shape != b.shape or self.protected_a.shape != a.shape:
            like = {"dtype": self.weight.dtype, "device": self.weight.device}
            self.protected_b = nn.Parameter(torch.empty(b.shape, **like))
            self.protected_a = nn.Parameter(torch.empty(a.shape, **like))
            self.protected_base = torch.empty_like(self.weight, memory_format=torch.contiguous_format).detach()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if weight is not self.weight and weight.requires_grad:
            weight.register_hook(self._keep_effective_grad)  # dL/dW, for the protection check's alignment
        if self.blocked:
            return _BlockScaledLinear.apply(x, weight, self.bias, self)
        x_q, weight_q = self._quantize("input", x), self._quantize("weight", weight)
        if "grad" not in self.scalers or not torch.is_grad_enabled():
            return F.linear(x_q, weight_q, self.bias)
        # The bias stays inside F.linear's fused addmm, detached: _QuantizeGrad gives it its gradient.
        y = F.linear(x_q, weight_q, None if self.bias is None else self.bias.detach())
        return _QuantizeGrad.apply(y, self.bias, self)

    def _quantize(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` at one point: in training advancing its scale and counting, in eval changing nothing."""
        if not self.training:
            return self._quantize_frozen(point, x)
        scaler = self.scalers[point]
        counting = self.stats_enabled and scaler.fmt.name != "fp32"  # fp32 points cannot overflow: not counted
        q = scaler.quantize(x, counts=self._point_stats(point) if counting else None, saturate=self.config.saturate,
                            rounding=self.config.rounding)
        if counting:
            self._numel[point] += x.numel()
        return q

    def _operands(self, point: str, x: torch.Tensor, reduction_dims: tuple[int, ...]) -> list[torch.Tensor]:
        """``x`` (2-D) rounded at ``point`` for each GEMM that reduces it along one of ``reduction_dims``:
        a copy per dim under row/block scaling, one rounding shared by all per tensor (unrounded when the
        point is off)."""
        if point not in self.scalers or not reduction_dims:
            return [x] * len(reduction_dims)
        if not self._blocked(point):
            return [self._quantize(point, x)] * len(reduction_dims)
        return [self._quantize_blocks(point, x, dim) for dim in reduction_dims]

    def _quantize_blocks(self, point: str, x: torch.Tensor, reduction_dim: int) -> torch.Tensor:
        """Round a GEMM operand with block scales along ``reduction_dim``: in training counting, and for the
        weight's row-wise copy setting ``weight_scales``; in eval changing nothing."""
        if not self.training:
            return self._quantize_frozen(point, x, reduction_dim)
        counting = self.stats_enabled
        keep_scale = point == "weight" and reduction_dim == 1
        q = self.scalers[point].quantize_blocks(
            x, reduction_dim, counts=self._point_stats(point) if counting else None,
            extremes=getattr(self, f"_extremes_{point}"), scale_out=self.weight_scales if keep_scale else None,
            saturate=self.config.saturate, rounding=self.config.rounding)
        if counting:
            self._numel[point] += x.numel()
        return q

    def _quantize_frozen(self, point: str, x: torch.Tensor, reduction_dim: int = 1) -> torch.Tensor:
        scaler, kwargs = self.scalers[point], {"saturate": self.config.saturate, "rounding": self.config.rounding}
        if self._blocked(point):
            return scaler.quantize_blocks(x, reduction_dim, **kwargs)
        if scaler.fmt.name == "fp32":
            return quantize(x, scaler.fmt, **kwargs)
        # With stats (left unused): the kernel training already built, so that a first evaluation or
        # rank check mid-run compiles nothing.
        return quantize_with_stats(x, scaler.fmt, scale=scaler.next_scale(_amax(x)), **kwargs)[0]

    def _point_stats(self, point: str) -> torch.Tensor:
        return getattr(self, f"_stats_{point}")

    def pop_stats(self) -> dict[str, dict[str, float]]:
        """``{point: {overflow_frac, underflow_frac, nan_count, amax, scale, scale_spread, numel}}`` over the
        training calls since the last pop, for every point in POINTS; NaN where nothing was counted. Then
        resets. Under row/block scaling ``scale`` is the last call's smallest block scale (that of the block
        holding the amax) and ``scale_spread`` the binades between the smallest and largest block scale
        over the calls (a point's row-wise and column-wise copies alike); per tensor it is NaN."""
        buffers = [self._point_stats(point) for point in POINTS]
        extremes = [getattr(self, f"_extremes_{point}") for point in POINTS]
        rows = torch.cat([torch.stack(buffers), torch.stack(extremes)], dim=1).tolist()  # the one host sync
        torch._foreach_zero_(buffers + extremes)
        stats = {}
        for point, (overflow, underflow, nans, amax, scale, inverse_smallest, largest) in zip(POINTS, rows):
            n = self._numel[point]
            counted = n > 0
            spread = math.log2(inverse_smallest * largest) if counted and inverse_smallest and largest else math.nan
            stats[point] = {
                "overflow_frac": overflow / n if counted else math.nan,
                "underflow_frac": underflow / n if counted else math.nan,
                "nan_count": nans if counted else math.nan,
                "amax": amax if counted else math.nan,
                "scale": scale if counted else math.nan,
                "scale_spread": spread,
                "numel": n,
            }
        self._numel = dict.fromkeys(POINTS, 0)
        return stats

    def extra_repr(self) -> str:
        grad = self.config.grad.name if self.config.grad else "off"
        protected = f", protected_rank={self.protected_rank}" if self.protected_rank else ""
        return (f"{super().extra_repr()}, weight={self.config.weight.name}, "
                f"input={self.config.activation.name}, grad={grad}{protected}")


def _point_scaling(fmt: FPFormat, scaling: ScalingConfig) -> ScalingConfig:
    """A point's scaling: none for fp32/bf16 (plain casts), per tensor for fp16 (block scaling needs an
    8-bit grid), else the layer's."""
    if fmt.exp_bits >= 8:
        return _UNSCALED
    return dataclasses.replace(scaling, granularity="tensor") if fmt.is_native else scaling


class _BlockScaledLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with every GEMM operand rounded along that GEMM's reduction dim
    (row/block scaling, :meth:`QuantLinear._operands`):

    * y = x W^T reduces over in_features: x and W blocked along their rows (dim 1);
    * dX = dY W reduces over out_features: dY along its rows, W down its columns (dim 0);
    * dW = dY^T x reduces over the tokens: dY and x down their columns (x flattened to (tokens, in)).

    The column-wise copies of x and W come from the full-precision tensors in the forward (as Transformer
    Engine takes them) and are saved for the backward, only when the gradient they feed is needed. The bias
    gets the unrounded output gradient's sum: only GEMM operands are 8-bit."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = x.reshape(-1, x.shape[-1])
        x_forward, *x_backward = layer._operands("input", rows, (1, 0) if need_dw else (1,))
        w_forward, *w_backward = layer._operands("weight", weight, (1, 0) if need_dx else (1,))
        y = F.linear(x_forward, w_forward, bias)
        ctx.layer, ctx.x_shape, ctx.bias_shape = layer, x.shape, None if bias is None else bias.shape
        ctx.save_for_backward(*x_backward, *w_backward)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        saved = list(ctx.saved_tensors)
        x_backward = saved.pop(0) if need_dw else None
        w_backward = saved.pop(0) if need_dx else None
        rows = grad.reshape(-1, grad.shape[-1])
        dims = (1,) * need_dx + (0,) * need_dw
        copies = dict(zip(dims, ctx.layer._operands("grad", rows, dims)))
        grad_x = (copies[1] @ w_backward).view(ctx.x_shape) if need_dx else None
        grad_w = copies[0].t() @ x_backward if need_dw else None
        grad_b = grad.sum_to_size(ctx.bias_shape) if need_db else None
        return grad_x, grad_w, grad_b, None


def _policy_patterns(fmt: FPFormat, layers) -> dict[str, str | FPFormat]:
    """A layer policy as an ordered map {name pattern: format}."""
    if isinstance(layers, dict):
        return layers
    named = {
        "all": {"*": fmt},
        "attention": {"*.attn.c_attn": fmt, "*.attn.c_proj": fmt},
        "mlp": {"*.mlp.c_fc": fmt, "*.mlp.c_proj": fmt},
        "no_head": {"lm_head": "fp32", "*": fmt},
    }
    if not isinstance(layers, str) or layers not in named:
        raise ValueError(f"unknown layers policy {layers!r} (known: {', '.join(LAYER_POLICIES)}, "
                         f"or a map {{name-pattern: format}})")
    return named[layers]


def apply_policy(model: nn.Module, fmt, layers, *, grad_format=DEFAULT_GRAD_FORMAT,
                 scaling: ScalingConfig = ScalingConfig(), saturate: bool = True,
                 rounding: str = "nearest") -> dict[str, FPFormat]:
    """Replace every ``nn.Linear`` of ``model`` in place by a :class:`QuantLinear` and return
    ``{qualified layer name: weight format}`` for all of them, in module order.

    ``layers`` picks the quantized ones: a name in LAYER_POLICIES, with format ``fmt`` ("all": every
    Linear, lm_head included; "attention": attn.c_attn and attn.c_proj; "mlp": mlp.c_fc and mlp.c_proj;
    "no_head": all but lm_head), or a map {fnmatch pattern: format spec} where the first matching
    pattern wins (``fmt`` is then unused). Layers left out become fp32 QuantLinears, which compute
    exactly what nn.Linear does, so every layer reports stats the same way. Gradients are rounded
    to ``grad_format`` behind 8-bit layers and to the layer's own format behind bf16/fp16 ones.
    The new layers share the old ones' parameters, so tied weights stay tied.
    """
    fmt = get_format(fmt)
    patterns = {}
    for pattern, spec in _policy_patterns(fmt, layers).items():
        try:
            patterns[pattern] = get_format(spec)
        except ValueError as error:
            raise ValueError(f"layers pattern {pattern!r}: {error}") from None
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    winners = {name: next((p for p in patterns if fnmatchcase(name, p)), None) for name in linears}
    for pattern in patterns:
        if pattern not in winners.values():
            raise ValueError(f"layers pattern {pattern!r} matches no linear layer (or only ones an earlier "
                             f"pattern takes); layers: {', '.join(linears)}")
    chosen = {name: get_format("fp32") if p is None else patterns[p] for name, p in winners.items()}
    for name, layer_fmt in chosen.items():
        config = QuantConfig(weight=layer_fmt, grad=grad_format_for(layer_fmt, grad_format), scaling=scaling,
                             saturate=saturate, rounding=rounding)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), config))
    return chosen
