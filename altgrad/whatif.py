"""What the other scaling recipes would have cost: a tensor's quantization error under per-tensor, per-row
and MX scaling for one 8-bit format, so that one run shows the alternatives (the inspection Transformer
Engine's debug API offers), for any split.

The recipes, each applied to the tensor as it is now (no history):

* ``tensor``: one scale from the tensor's own amax (``scale_from_amax``, the "current" recipe);
* ``row``: one float32 scale per row, along the last dim (a weight's output channel, an input's token);
* ``mx``: one E8M0 (power-of-two) scale per 32 consecutive elements along the last dim, floor rounding
  (OCP MX v1.0).

Each saturates (clamps finite overflow to ±max), as the trainer's layers do by default. For each recipe:
the relative MSE ``||Q(x) - x||² / ||x||²`` and the flushed share, the share of non-zero x that round to 0.
"""

from __future__ import annotations

import torch

from altgrad.formats import FPFormat
from altgrad.scaling import quantize, quantize_blockwise, scale_from_amax

RECIPES = ("tensor", "row", "mx")
MX_BLOCK = 32
MEASURES = ("rel_mse", "flushed")


def quantize_as(x: torch.Tensor, fmt: FPFormat, recipe: str) -> torch.Tensor:
    """``x`` quantized to the 8-bit ``fmt`` under ``recipe`` (one of RECIPES), dequantized."""
    if recipe == "tensor":
        scale = scale_from_amax(x.detach().abs().amax().float(), fmt)
        return quantize(x, fmt, scale=scale, saturate=True)
    if recipe == "row":
        return quantize_blockwise(x, fmt, block=(1, x.shape[-1]), scale_format="fp32")
    if recipe == "mx":
        return quantize_blockwise(x, fmt, block=(1, MX_BLOCK), scale_format="e8m0", scale_rounding="floor")
    raise ValueError(f"recipe={recipe!r} is not one of {', '.join(RECIPES)}")


def column_names(tensor: str) -> list[str]:
    """The ``layers`` columns of one tensor ("weight" or "input"), in :func:`quantization_errors`' order."""
    return [f"whatif_{tensor}_{measure}_{recipe}" for measure in MEASURES for recipe in RECIPES]


@torch.no_grad()
def quantization_errors(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """float64 on x's device: the relative MSE under each recipe, then the flushed share under each, then
    1.0 when x is all finite (else 0.0). 0 / 0 (an all-zero x) is NaN, which callers report as not measured.
    Stays on the device: reading it is the caller's one host sync."""
    x = x.detach()
    exact = x.double()
    nonzero = x != 0
    energy, count = exact.square().sum(), nonzero.sum().double()
    errors, flushed = [], []
    for recipe in RECIPES:
        quantized = quantize_as(x, fmt, recipe)
        errors.append((quantized.double() - exact).square().sum() / energy)
        flushed.append((nonzero & (quantized == 0)).sum().double() / count)
    return torch.stack([*errors, *flushed, torch.isfinite(x).all().double()])
