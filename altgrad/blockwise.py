"""Block scaling: one scale per block of a tensor, for every 8-bit format (``quantize_blockwise``).

A block is a run of elements along the last dim (``(32,)`` or ``(1, 32)``: OCP MX; ``(1, 128)``:
DeepSeek-style activation tiles) or a tile over the trailing two dims (``(128, 128)``: weight tiles).
A partial block at an edge gets its own scale. Each block's amax sets its scale:

* ``scale_format="e8m0"``: X = 2**k with k clamped to [-127, 127], the result X * Q(x / X).
  ``scale_rounding="floor"`` takes k = floor(log2(amax)) - floor(log2(max)) (OCP MX v1.0, torchao's
  FLOOR): the block's top binade lands on the format's, so elements up to 2x max saturate (or overflow,
  unsaturated). ``"ceil"`` takes k = ceil(log2(amax / max)) (Transformer Engine's MXFP8, torchao's RCEIL):
  the smallest X with amax / X <= max, so nothing overflows. Both come from the exponent and fraction
  bits of amax and max, so they are exact (float log2 is not, next to powers of two).
* ``scale_format="fp32"``: s = max / amax rounded once to float32, the result Q(x * s) / s. Where
  max / amax overflows float32 (a subnormal amax) s is float32's largest finite value, as in TE.

An all-zero block stays zero (its scale is immaterial). A block holding NaN or ±inf has no finite scale:
all of its elements become NaN, as an MX block with a NaN scale does (what torchao's emulation gives).
Elements round with :mod:`altgrad.quantize`'s own arithmetic (nearest-even, or stochastic from one
uniform draw per element in x's order, exactly as ``quantize`` draws them); gradients pass straight through.

The amax reduction and the rounding are one expression, compiled on large tensors into one kernel (a
pass over x for the block amaxes, a pass that rounds, no other tensor of x's size) exactly as
``quantize`` is (same size threshold, same ``ALTGRAD_COMPILE=0`` switch), eager otherwise; the tests
check that both paths agree bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from altgrad.config import SCALE_FORMATS, SCALE_ROUNDINGS, block_tile
from altgrad.formats import FPFormat, get_format
from altgrad.quantize import (ROUNDINGS, _LAYOUT, _call, _check_input, _compute_dtype, _count, _format_params,
                              _isinf, _isnan, _round_to_format, _StraightThrough)

E8M0_MAX_EXPONENT = 127  # E8M0 holds 2**-127 .. 2**127 (its 255 is NaN)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def quantize_blockwise(x: torch.Tensor, fmt, *, block, scale_format: str, scale_rounding: str = "floor",
                       rounding: str = "nearest", saturate: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """x quantized to ``fmt`` with one scale per ``block`` (sizes over x's trailing dims), dequantized:
    x's shape and dtype. See the module docstring for the scale rules; ``scale_rounding`` applies to
    e8m0 scales only. Bad arguments raise ValueError naming the key and value."""
    return _quantize_blockwise(x, fmt, block=block, scale_format=scale_format, scale_rounding=scale_rounding,
                               rounding=rounding, saturate=saturate, generator=generator)


def quantize_blockwise_with_stats(x: torch.Tensor, fmt, *, block, scale_format: str, scale_rounding: str = "floor",
                                  rounding: str = "nearest", saturate: bool = True,
                                  generator: torch.Generator | None = None, epilogue=None, epilogue_args=()):
    """:func:`quantize_blockwise`, plus from the same pass what training diagnostics count: a float32
    tensor ``[amax, overflow, underflow, nan, min scale, 1 / min scale, max scale]`` (overflow counts
    ``|x * s| > max`` before saturation, underflow non-zero x rounded to zero, nan NaN results; the scales
    are the blocks' multipliers s, ``1 / X`` for e8m0, over blocks with a finite non-zero amax, 0 where
    there is none), and the blocks' scales s, shaped (batch, row tiles, 1, col tiles, 1) (see
    :func:`per_element_scale`). ``epilogue(stats, block_scales, *epilogue_args)``, which updates tensors
    in place, runs inside the same (compiled) call, as a Scaler's bookkeeping does in ``quantize``."""
    return _quantize_blockwise(x, fmt, block=block, scale_format=scale_format, scale_rounding=scale_rounding,
                               rounding=rounding, saturate=saturate, generator=generator, with_stats=True,
                               epilogue=epilogue, epilogue_args=epilogue_args)


def per_element_scale(block_scales: torch.Tensor, block, shape) -> torch.Tensor:
    """The blocks' scales from :func:`quantize_blockwise_with_stats` spread over a tensor of ``shape``:
    each element's multiplier s (what broadcasts against the tensor, as a per-tensor scale does)."""
    tile = block_tile(block, len(shape))
    rows, cols = (shape[-2] if len(shape) > 1 else 1), shape[-1]
    return _per_element(block_scales, tile, (block_scales.shape[0], rows, cols)).reshape(shape)


def _quantize_blockwise(x, fmt, *, block, scale_format, scale_rounding, rounding, saturate, generator,
                        with_stats=False, epilogue=None, epilogue_args=()):
    fmt = get_format(fmt)
    _check_input(x, "quantize_blockwise")
    tile = block_tile(block, x.dim())
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format={scale_format!r} is not one of {', '.join(SCALE_FORMATS)}")
    if scale_rounding not in SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding={scale_rounding!r} is not one of {', '.join(SCALE_ROUNDINGS)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if fmt.is_native:
        raise ValueError(f"format={fmt.name!r} is a native torch dtype; block scaling needs an 8-bit format")
    compute_dtype = _compute_dtype(x.dtype)
    rows, cols = (x.shape[-2] if x.dim() > 1 else 1), x.shape[-1]
    batched = x.detach().reshape(math.prod(x.shape[:-2]), rows, cols)
    noise = None
    if rounding == "stochastic":  # the draws quantize makes for x: one per element, in x's order
        noise = torch.rand(x.numel(), generator=generator, device=x.device, dtype=compute_dtype).view(batched.shape)
    kernel, extra = _blockwise_kernel, {}
    if with_stats:
        kernel, extra = _blockwise_stats_kernel, {"epilogue": epilogue, "epilogue_args": tuple(epilogue_args)}
    # specialize_int: compiled with dynamic shapes, the block sizes would otherwise become symbolic, and
    # the block layout with them (generic loops, and a copy to cut the padding off).
    with torch.no_grad(), torch._dynamo.config.patch(specialize_int=True):
        out = _call(kernel, x.numel(), batched, noise, tile=tile, scale_format=scale_format,
                    round_up=scale_format == "e8m0" and scale_rounding == "ceil", **extra,
                    **_block_params(fmt, saturate, compute_dtype, x.device))
    quantized, *rest = out if with_stats else (out,)
    quantized = quantized.view(x.shape)
    if x.requires_grad and torch.is_grad_enabled():
        quantized = _StraightThrough.apply(x, quantized)
    return (quantized, *rest) if with_stats else quantized


@functools.lru_cache(maxsize=None)
def _block_params(fmt: FPFormat, saturate: bool, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """quantize's format parameters, plus max's binade and fraction field (for the e8m0 exponents)."""
    int_dtype, mant, _ = _LAYOUT[compute_dtype]
    fraction, exponent = math.frexp(fmt.max_value)  # max = fraction * 2**exponent, fraction in [0.5, 1)
    as_int = functools.partial(torch.tensor, dtype=int_dtype, device=device)
    return {**_format_params(fmt, saturate, compute_dtype, device), "max_binade": as_int(exponent - 1),
            "max_fraction_field": as_int(int((2 * fraction - 1) * 2**mant))}


def _blockwise_kernel(x, noise, **kwargs):
    """The quantized ``x`` (batch, rows, cols), each ``tile`` block with its own scale. The scales come
    from one reduction over blocks; the rounding then runs over x itself, each element reading its
    block's scale, so that torch.compile makes one pass over x for each and no other tensor of x's size."""
    return _blockwise(x, noise, **kwargs)[0]


def _blockwise_stats_kernel(x, noise, *, epilogue, epilogue_args, **kwargs):
    """:func:`_blockwise_kernel`, plus the counts and block scales of :func:`quantize_blockwise_with_stats`."""
    quantized, scale, block_scale, amax = _blockwise(x, noise, **kwargs)
    max_value = kwargs["max_value"]
    magnitude = x.to(scale.dtype).abs()
    counts = (magnitude * scale > max_value, (x != 0) & (quantized == 0), _isnan(quantized))
    usable = (amax > 0) & (amax < math.inf)
    smallest = torch.where(usable, block_scale, math.inf).amin()
    stats = torch.stack([amax.amax(), *(_count(c).to(amax.dtype) for c in counts), torch.where(usable.any(), smallest, 0),
                         torch.where(usable.any(), 1 / smallest, 0), torch.where(usable, block_scale, 0).amax()]).float()
    if epilogue is not None:
        epilogue(stats, block_scale, *epilogue_args)
    return quantized, stats, block_scale


def _blockwise(x, noise, *, tile, scale_format: str, round_up: bool, max_binade, max_fraction_field, **params):
    """The quantized x, each element's scale s (x's shape), the blocks' scales and their amaxes (block
    layout): x's one reduction over blocks and one rounding pass, shared by both kernels."""
    work_dtype = params["max_value"].dtype
    amax = _as_blocks(x, tile).to(work_dtype).abs().amax(dim=(2, 4), keepdim=True)
    finite = amax < math.inf  # else NaN scales: a block holding NaN or ±inf comes out all NaN
    if scale_format == "e8m0":
        k = _e8m0_exponent(amax, max_binade, max_fraction_field, round_up)
        block_scale = torch.where(finite, _power_of_two(-k), math.nan)
        scale = _per_element(block_scale, tile, x.shape)
        rounded = _round_to_format(x, scale, noise, **params)
        return (rounded * _per_element(_power_of_two(k), tile, x.shape)).to(x.dtype), scale, block_scale, amax
    # max / amax correctly rounded to float32 on every backend: divided in float64 (as scaling does)
    block_scale = (params["max_value"].double() / amax.double()).float()
    block_scale = torch.where(amax == 0, 1.0, torch.where(_isinf(block_scale), _FLOAT32_MAX, block_scale))
    block_scale = torch.where(finite, block_scale.to(work_dtype), math.nan)
    scale = _per_element(block_scale, tile, x.shape)
    return (_round_to_format(x, scale, noise, **params) / scale).to(x.dtype), scale, block_scale, amax


def _as_blocks(x, tile):
    """(batch, rows, cols) zero-padded to whole tiles (zeros leave every amax as it is) and viewed as
    (batch, row tiles, tile rows, col tiles, tile cols)."""
    pad_rows, pad_cols = -x.shape[1] % tile[0], -x.shape[2] % tile[1]
    if pad_rows or pad_cols:
        x = F.pad(x, (0, pad_cols, 0, pad_rows))
    return x.view(x.shape[0], x.shape[1] // tile[0], tile[0], x.shape[2] // tile[1], tile[1])


def _per_element(per_block, tile, shape):
    """One value per block, (batch, row tiles, 1, col tiles, 1), spread over its block's elements:
    (batch, rows, cols), the padding cut off. Compiled, this is indexing, not a tensor."""
    batch, row_tiles, _, col_tiles, _ = per_block.shape
    spread = per_block.expand(batch, row_tiles, tile[0], col_tiles, tile[1])
    return spread.reshape(batch, row_tiles * tile[0], col_tiles * tile[1])[:, :shape[1], :shape[2]]


def _e8m0_exponent(amax, max_binade, max_fraction_field, round_up: bool):
    """k for each block, from bits: amax = (1 + f) * 2**e exactly (a subnormal amax is first scaled up by
    2**64), so floor(log2(amax)) = e, and ceil(log2(amax / max)) = e - max_binade, plus one where amax's
    fraction exceeds max's."""
    int_dtype, mant, fbias = _LAYOUT[amax.dtype]
    subnormal = amax < 2.0 ** (1 - fbias)
    bits = torch.where(subnormal, amax * 2.0**64, amax).view(int_dtype)
    binade = ((bits >> mant) & (2 * fbias + 1)) - fbias - (subnormal.to(int_dtype) << 6)
    if round_up:
        binade = binade + ((bits & ((1 << mant) - 1)) > max_fraction_field).to(int_dtype)
    return torch.clamp(binade - max_binade, -E8M0_MAX_EXPONENT, E8M0_MAX_EXPONENT)


def _power_of_two(k):
    """2**k exactly in the float type ``k``'s integer type views, for k in [-127, 127]. Built from bits;
    2**-127, a float32 subnormal, has no exponent field of its own, so it comes in as a constant."""
    float_dtype = {torch.int32: torch.float32, torch.int64: torch.float64}[k.dtype]
    _, mant, fbias = _LAYOUT[float_dtype]
    field = k + fbias
    return torch.where(field > 0, (field.clamp(min=1) << mant).view(float_dtype), 2.0 ** -fbias)
