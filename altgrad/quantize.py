"""Exact simulation of rounding to any :mod:`altgrad.formats` format: ``quantize``, ``encode``, ``decode``.

How it rounds: take the float32 exponent of ``x``, clamp it into the format's binades (below: the
subnormal spacing; above: one binade past the max, whose values all overflow), form the power-of-two
ulp ``2**(e - M)`` from bits, and round ``x / ulp`` to an integer (ties to even, or stochastically).
Every step is exact in float32 for every format whose grid fits float32, which ``get_format`` checks.
Overflow then follows the format's policy (ieee: ±inf, fn: NaN, finite: ±max) unless ``saturate``.

The arithmetic is one elementwise expression, so on large tensors it runs as a single fused kernel
built by ``torch.compile`` (Inductor's C++/Triton backends): one read of ``x``, one write of the
result. Small tensors, and machines where compiling fails, use the same expression eagerly; the
tests check that both paths agree bit for bit. Set ``ALTGRAD_COMPILE=0`` to never compile.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from altgrad.formats import FPFormat, get_format

ROUNDINGS = ("nearest", "stochastic")

# Tensors with fewer elements than this run eagerly: a compiled call's fixed cost (guards, launch)
# outweighs the fused kernel's saving on small inputs.
COMPILE_MIN_NUMEL = 1 << 16

# Bit layout of the dtype the arithmetic runs in: (integer view, mantissa bits, exponent bias).
_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _format_params_on(fmt: FPFormat, saturate: bool, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return _format_params(fmt, saturate, _compute_dtype(x.dtype), x.device)


@functools.lru_cache(maxsize=None)
def _format_params(fmt: FPFormat, saturate: bool, compute_dtype: torch.dtype, device: torch.device):
    """The format as 0-d tensors, so one compiled kernel serves every format without recompiling.
    The one Python value, ``field_ties``, picks the kernel variant for formats without mantissa bits."""
    _, _, fbias = _LAYOUT[compute_dtype]
    top_binade = (1 << fmt.exp_bits) - 1 - fmt.bias + 1  # one past the largest normal binade
    overflow = {"ieee": float("inf"), "fn": float("nan"), "finite": fmt.max_value}[fmt.special]
    as_int = functools.partial(torch.tensor, dtype=_LAYOUT[compute_dtype][0], device=device)
    as_float = functools.partial(torch.tensor, dtype=compute_dtype, device=device)
    return {
        "exp_lo": as_int(fmt.emin + fbias),
        "exp_hi": as_int(max(top_binade, fmt.emin) + fbias),
        "man_bits": as_int(fmt.man_bits),
        "field_offset": as_int(fmt.bias - fbias),  # float exponent + this = the format's exponent field
        "field_ties": fmt.man_bits == 0,
        "max_value": as_float(fmt.max_value),
        "overflow_value": as_float(overflow),
        "finite_overflow_value": as_float(fmt.max_value if saturate else overflow),
    }


def _isinf(x):
    return x.abs() == math.inf  # unlike torch.isinf, this vectorizes in Inductor's C++ backend


def _isnan(x):
    return x != x  # likewise for torch.isnan


def _ulp_exponent(work, exp_lo, exp_hi, man_bits):
    """Biased exponent of the grid spacing at each value of ``work`` (float32 or float64)."""
    int_dtype, mant, fbias = _LAYOUT[work.dtype]
    return torch.clamp((work.view(int_dtype) >> mant) & (2 * fbias + 1), exp_lo, exp_hi) - man_bits


def _rungs(x, scale, noise, exp_lo, exp_hi, man_bits, field_offset, field_ties: bool):
    """``x * scale`` in the compute dtype, the biased exponent of its grid spacing, and the rounded
    (signed, integral) number of spacings: the value is ``rungs * 2**ulp_exponent``."""
    work = x.to(_compute_dtype(x.dtype)) * scale
    _, mant, fbias = _LAYOUT[work.dtype]
    ulp_exponent = _ulp_exponent(work, exp_lo, exp_hi, man_bits)
    rungs = work * ((2 * fbias - ulp_exponent) << mant).view(work.dtype)  # exact: times 2**-ulp_exponent
    if noise is not None:
        magnitude = rungs.abs()
        floor = magnitude.floor()
        return work, ulp_exponent, torch.copysign(floor + (noise < magnitude - floor).to(work.dtype), rungs)
    rounded = torch.round(rungs)  # half to even: the even significand is the even code ...
    if field_ties:
        # ... except with no mantissa bits (E7M0), where every normal significand is 1 and the tie
        # 1.5 * 2**e goes to the neighbour whose exponent field is even.
        lower_code_even = ((ulp_exponent + field_offset) & 1) == 0
        rounded = torch.where((rungs.abs() == 1.5) & lower_code_even, torch.sign(rungs), rounded)
    return work, ulp_exponent, rounded


def _round_to_format(x, scale, noise, exp_lo, exp_hi, man_bits, field_offset, field_ties, max_value, overflow_value,
                     finite_overflow_value):
    """Q(x * scale) in the compute dtype. ``noise`` (uniform [0, 1), or None for nearest-even)."""
    work, ulp_exponent, rungs = _rungs(x, scale, noise, exp_lo, exp_hi, man_bits, field_offset, field_ties)
    out = rungs * (ulp_exponent << _LAYOUT[work.dtype][1]).view(work.dtype)
    overflow = torch.where(_isinf(work), overflow_value, finite_overflow_value)
    return torch.where(out.abs() > max_value, torch.copysign(overflow, work), out)


def _quantize_kernel(x, scale, noise, **params):
    return (_round_to_format(x, scale, noise, **params) / scale).to(x.dtype)


def _encode_kernel(x, scale, **code_params):
    """uint8 codes of Q(x * scale)."""
    return _code_numbers(x, scale, **code_params).to(torch.uint8)


def _code_numbers(x, scale, exp_lo, exp_hi, man_bits, field_offset, field_ties, max_code, overflow_code,
                  inf_code, nan_code, signed_zero: bool):
    """The codes of Q(x * scale) as numbers in the compute dtype (exact: they are below 256), which
    vectorizes far better than selecting among integer codes. Codes count rungs: a magnitude's code is
    its rung count within its binade plus 2**M per binade above the lowest, so no float-to-bits
    decoding is needed."""
    work, ulp_exponent, rungs = _rungs(x, scale, None, exp_lo, exp_hi, man_bits, field_offset, field_ties)
    binades_up = ulp_exponent - (exp_lo - man_bits)
    code = (binades_up << man_bits).to(work.dtype) + rungs.abs()
    code = torch.where(code > max_code, overflow_code, code)
    code = torch.where(_isinf(work), inf_code, code)
    code = torch.where(_isnan(work), nan_code, code)
    negative = work.view(_LAYOUT[work.dtype][0]) < 0  # the sign bit, so -0.0 too
    if not signed_zero:
        negative = negative & (code != 0)
    return torch.where(negative, code + 128, code)


@functools.lru_cache(maxsize=None)
def _compiled(kernel):
    # Each input dtype and static option (saturate, E7M0's ties, ...) is a graph of its own: a long test
    # or sweep process can pass dynamo's default limit of 8 per kernel, and hitting it turns compiling off.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # emulate_precision_casts: without it Inductor keeps a cast to bf16/fp16 and back in float32,
    # which would make the native formats' rounding a no-op.
    return torch.compile(kernel, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _compile_enabled() -> bool:
    return os.environ.get("ALTGRAD_COMPILE", "1") != "0"


def _run(kernel, x: torch.Tensor, *args, **kwargs):
    """``kernel(x, ...)`` on x flattened and detached (neither a view nor requiring grad), so that one
    compiled graph serves every tensor; the first (or only) output comes back in x's shape."""
    flat = x.reshape(-1).detach()
    out = _call(kernel, flat.numel(), flat, *args, **kwargs)
    return (out[0].view(x.shape), *out[1:]) if isinstance(out, tuple) else out.view(x.shape)


def _call(kernel, size: int, *args, **kwargs):
    """``kernel(*args, **kwargs)``, which reads ``size`` elements: fused through torch.compile when
    that is large, eagerly otherwise or on failure."""
    if size >= COMPILE_MIN_NUMEL and _compile_enabled() and not torch.compiler.is_compiling():
        try:
            return _compiled(kernel)(*args, **kwargs)
        except Exception as error:  # no C++ compiler, unsupported device, ...: stay correct, warn once
            os.environ["ALTGRAD_COMPILE"] = "0"
            warnings.warn(f"altgrad: torch.compile failed ({error!s:.200}); quantizing eagerly from now on")
    return kernel(*args, **kwargs)


def _scale_tensor(scale, like: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(like.dtype)
    return _one(dtype, like.device) if scale is None else torch.as_tensor(scale, dtype=dtype, device=like.device)


@functools.lru_cache(maxsize=None)
def _one(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _max_value(fmt: FPFormat, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(fmt.max_value, dtype=dtype, device=device)


def _check_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{what} needs a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor. Backward: the incoming gradient unchanged."""

    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize(x: torch.Tensor, fmt, *, scale=None, rounding: str = "nearest", saturate: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """``Q(x * scale) / scale`` with x's dtype and shape; gradients pass straight through.

    ``rounding``: "nearest" (ties to even) or "stochastic" (unbiased: up with probability equal to the
    distance from the lower neighbour in ulps). ``saturate=True`` clamps finite overflow to ±max;
    otherwise overflow follows the format (ieee ±inf, fn NaN, finite ±max). NaN stays NaN, and ±inf
    stays ±inf where the format has inf. fp32/bf16/fp16 use torch's own casts.
    """
    return _quantize(x, fmt, scale=scale, rounding=rounding, saturate=saturate, generator=generator)


def quantize_with_stats(x: torch.Tensor, fmt, *, scale=None, rounding: str = "nearest", saturate: bool = False,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize`, plus what training diagnostics count, from the same fused pass over ``x``:
    a float32 tensor ``[amax(|x|), overflow, underflow, nan]`` where overflow counts ``|x * scale| >
    max`` (before saturation), underflow counts non-zero x rounded to zero, and nan counts NaN results.
    It stays on x's device: reading it is the caller's one host sync."""
    return _quantize(x, fmt, scale=scale, rounding=rounding, saturate=saturate, generator=generator,
                     with_stats=True)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """How many entries of ``mask`` are true. In int32 below 2**31 elements: exact, and it vectorizes
    better in a fused kernel than a bool sum's int64."""
    return mask.sum(dtype=torch.int32 if mask.numel() < 2**31 else torch.int64)


def _stats(x, quantized, scale, max_value):
    magnitude = x.to(scale.dtype).abs()
    counts = (magnitude * scale > max_value, (x != 0) & (quantized == 0), _isnan(quantized))
    return torch.stack([magnitude.amax().float(), *(_count(c).float() for c in counts)])


def _quantize_stats_kernel(x, scale, noise, **params):
    quantized = _quantize_kernel(x, scale, noise, **params)
    return quantized, _stats(x, quantized, scale, params["max_value"])


def _native_kernel(x, scale, max_value, dtype: torch.dtype, saturate: bool):
    work = x * scale
    if saturate:  # clamp finite overflow; ±inf stays ±inf
        work = torch.where(_isinf(work), work, work.clamp(-max_value, max_value))
    return (work.to(dtype).to(x.dtype) / scale).to(x.dtype)


def _native_stats_kernel(x, scale, max_value, dtype: torch.dtype, saturate: bool):
    quantized = _native_kernel(x, scale, max_value, dtype, saturate)
    return quantized, _stats(x, quantized, scale, max_value)


def _with_epilogue(x, *args, stats_kernel, epilogue, epilogue_args, **kwargs):
    """``stats_kernel``, then ``epilogue(stats, *epilogue_args)``, which updates tensors in place, in the
    same call: compiled, the epilogue's small updates (a scaler's amax history, say) add no dispatches
    of their own. Its tensors must not alias the kernel's arguments (that costs dynamo dearly)."""
    quantized, stats = stats_kernel(x, *args, **kwargs)
    epilogue(stats, *epilogue_args)
    return quantized, stats


def _quantize(x, fmt, *, scale=None, rounding="nearest", saturate=False, generator=None, with_stats=False,
              epilogue=None, epilogue_args=()):
    """:func:`quantize`, or with ``with_stats`` :func:`quantize_with_stats`, which an ``epilogue``
    implies (see :func:`_with_epilogue`)."""
    fmt = get_format(fmt)
    _check_input(x, "quantize")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not one of {', '.join(ROUNDINGS)}")
    with_stats = with_stats or epilogue is not None
    scale_tensor = _scale_tensor(scale, x)
    if fmt.is_native:
        if rounding != "nearest":
            raise ValueError(f"rounding={rounding!r} is not available for {fmt.name}, a native torch cast")
        if fmt.torch_dtype == x.dtype and not with_stats:  # a dtype rounded to itself: the identity
            return x
        kernel = _native_stats_kernel if with_stats else _native_kernel
        args = (scale_tensor, _max_value(fmt, scale_tensor.dtype, x.device))
        kwargs = {"dtype": fmt.torch_dtype, "saturate": saturate}
    else:
        noise = None
        if rounding == "stochastic":
            noise = torch.rand(x.numel(), generator=generator, device=x.device, dtype=scale_tensor.dtype)
        kernel = _quantize_stats_kernel if with_stats else _quantize_kernel
        args, kwargs = (scale_tensor, noise), _format_params_on(fmt, saturate, x)
    if epilogue is not None:
        kwargs = {**kwargs, "stats_kernel": kernel, "epilogue": epilogue, "epilogue_args": epilogue_args}
        kernel = _with_epilogue
    with torch.no_grad():
        out = _run(kernel, x, *args, **kwargs)
    quantized, *rest = out if with_stats else (out,)
    if x.requires_grad and torch.is_grad_enabled():
        quantized = _StraightThrough.apply(x, quantized)
    return (quantized, *rest) if with_stats else quantized


def ulp(x: torch.Tensor, fmt, *, scale=None) -> torch.Tensor:
    """The format's grid spacing at each value of ``x`` (in x's units: the spacing at ``x * scale``,
    divided by ``scale``). Below the smallest normal it is the subnormal spacing; past the largest
    binade, that binade's spacing. Computed in float32 (float64 for float64 input); for fp32 itself
    it is exact for normal values only."""
    fmt = get_format(fmt)
    _check_input(x, "ulp")
    work_scale = _scale_tensor(scale, x)
    work = x.detach().to(work_scale.dtype) * work_scale
    _, mant, _ = _LAYOUT[work.dtype]
    params = _format_params_on(fmt, False, x)
    exponent = _ulp_exponent(work, params["exp_lo"], params["exp_hi"], params["man_bits"])
    return (exponent << mant).view(work.dtype) / work_scale


@functools.lru_cache(maxsize=None)
def _code_params(fmt: FPFormat, saturate: bool, nan_code: int, compute_dtype: torch.dtype,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The format's code layout as 0-d tensors: the highest finite magnitude code, and the codes that
    overflow, ±inf and NaN take under the format's rules (or ``saturate``)."""
    params = _format_params(fmt, saturate, compute_dtype, device)
    as_code = functools.partial(torch.tensor, dtype=compute_dtype, device=device)
    max_code = fmt._num_finite_magnitudes - 1
    inf_code = {"ieee": ((1 << fmt.exp_bits) - 1) << fmt.man_bits, "fn": 0x7F, "finite": max_code}[fmt.special]
    return {**{k: params[k] for k in ("exp_lo", "exp_hi", "man_bits", "field_offset", "field_ties")},
            "max_code": as_code(max_code), "overflow_code": as_code(max_code if saturate else inf_code),
            "inf_code": as_code(inf_code), "nan_code": as_code(nan_code)}


def encode(x: torch.Tensor, fmt, *, scale=None, saturate: bool = False, nan_code: int | None = None,
           signed_zero: bool = True) -> torch.Tensor:
    """The format's uint8 bit codes of ``x * scale`` (bit 7 sign, then exponent, then mantissa), rounded
    to nearest-even with the format's overflow rule (or clamped to ±max with ``saturate``).

    NaN gets the all-ones code with x's sign bit. A format without NaN raises on NaN input unless
    ``nan_code`` (a magnitude code, 0..127) says which code stands for it; then no check pass runs.
    ``signed_zero=False`` gives -0 the code of +0 (for comparing codes by the value they stand for)."""
    fmt = get_format(fmt)
    _check_input(x, "encode")
    if fmt.bits != 8:
        raise ValueError(f"encode gives 8-bit codes; {fmt.name} is a {fmt.bits}-bit format")
    if fmt.has_nan:
        nan_code = 0x7F
    elif nan_code is None:
        if torch.isnan(x).any():
            raise ValueError(f"{fmt.name} has no NaN code, and the input holds NaN (pass nan_code to choose one)")
        nan_code = 0x7F
    with torch.no_grad():
        return _run(_encode_kernel, x, _scale_tensor(scale, x), signed_zero=signed_zero,
                    **_code_params(fmt, saturate, nan_code, _compute_dtype(x.dtype), x.device))


def decode(codes: torch.Tensor, fmt, *, scale=None) -> torch.Tensor:
    """float32 values of uint8 codes (divided by ``scale`` when given): the inverse of :func:`encode`."""
    fmt = get_format(fmt)
    if fmt.bits != 8:
        raise ValueError(f"decode reads 8-bit codes; {fmt.name} is a {fmt.bits}-bit format")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError(f"decode needs a uint8 tensor of codes, got {getattr(codes, 'dtype', type(codes).__name__)}")
    values = fmt.code_values.to(codes.device)[codes.long()]
    return values if scale is None else values / torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
