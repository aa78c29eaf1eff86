"""Scaling: map a tensor's range onto a format's range before rounding, per tensor, row or block.

Per tensor (``granularity: tensor``, the default), three recipes, as in Transformer Engine:

* ``current``: the scale comes from this tensor's own amax (exact range, one extra read of the tensor);
* ``delayed``: the scale comes from the amax history of earlier calls (TE's default for training);
  the first call, with no history yet, uses its own amax;
* ``none``: scale 1, the raw format.

The scale is ``fmt.max_value / amax / 2**margin`` rounded once to float32 (as torchao computes it),
optionally rounded down to a power of two (so that scaling itself is exact). A zero or non-finite amax
leaves the scale unchanged, as in TE.
Everything stays on the tensor's device: no host synchronisation in the training step.

Per row or block (``granularity: row | block``), each GEMM operand gets one scale per block along that
GEMM's reduction dim, from the operand itself (:func:`~altgrad.blockwise.quantize_blockwise`): an amax
history is one number per tensor, so the recipe's ``delayed`` is read as current here (and ``none``,
``margin`` and ``power_of_two``, which belong to per-tensor scales, are rejected). An operand is laid
out as (other dim, reduction dim); ``block`` = (rows, cols) there, so (1, 32) is OCP MX along the
reduction and ``row`` is one block spanning the whole reduction dim. A tensor used by two GEMMs (a
layer's input in the forward and in the weight gradient) is quantized along each, as Transformer
Engine's MXFP8 recipe keeps row-wise and column-wise copies (see :func:`gemm_block`).
"""

from __future__ import annotations

import torch

from altgrad.blockwise import per_element_scale, quantize_blockwise, quantize_blockwise_with_stats
from altgrad.config import (AMAX_ALGOS, GRANULARITIES, RECIPES, SCALE_FORMATS,  # noqa: F401 (re-exported)
                            SCALE_ROUNDINGS, ScalingConfig)
from altgrad.formats import FPFormat, get_format
from altgrad.quantize import _max_value, _quantize, quantize, quantize_with_stats


def gemm_block(config: ScalingConfig, shape, reduction_dim: int) -> tuple[int, int]:
    """The block over a 2-D GEMM operand of ``shape`` whose reduction runs along ``reduction_dim`` (1:
    along its rows, as x and W in y = x W^T; 0: down its columns, as W in dX = dY W and x, dY in
    dW = dY^T x). ``config.block`` (or, for ``row``, the whole reduction dim) is given for the layout
    (other dim, reduction dim), so along dim 0 it is transposed: the column-wise copy's blocks, taken
    without transposing the tensor."""
    along = max(1, shape[reduction_dim]) if config.granularity == "row" else config.block[1]
    across = 1 if config.granularity == "row" else config.block[0]
    return (across, along) if reduction_dim == 1 else (along, across)


def scale_from_amax(amax: torch.Tensor, fmt: FPFormat | str, *, margin: int = 0, power_of_two: bool = False,
                    previous: torch.Tensor | None = None) -> torch.Tensor:
    """``fmt.max_value / amax / 2**margin``; where amax is 0 or not finite, ``previous`` (default 1)."""
    fmt = get_format(fmt)
    amax = torch.as_tensor(amax, dtype=torch.float32)
    fallback = torch.ones_like(amax) if previous is None else previous
    return _scale_from(amax, _max_value(fmt, torch.float32, amax.device), margin, power_of_two, fallback)


def _scale_from(amax, max_value: torch.Tensor, margin: int, power_of_two: bool, fallback):
    # max_value * 2**-margin / amax rounded once to float32, as torchao computes it: divided in float64 and
    # cast, which is the correctly rounded float32 quotient on every backend (a compiled float32 division
    # is approximate on CUDA, and a Python float over a tensor is 1 / amax times max: two roundings).
    scale = (max_value.double() * 2.0**-margin / amax.double()).float()
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    usable = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale) & (scale > 0)
    return torch.where(usable, scale, fallback.to(scale))


def _record_amax(stats, history, scale, max_value, margin: int, power_of_two: bool, most_recent: bool, counts):
    """Delayed scaling's update after a quantizing pass with the current ``scale``: push its amax
    (``stats[0]``) onto ``history``, add to ``counts`` unless it is None, and move ``scale`` to the one
    the history calls for, all in place. Pure tensor code, so that it runs inside the pass's compiled
    kernel (see ``quantize._with_epilogue``)."""
    history.copy_(torch.cat([stats[:1], history[:-1]]))
    new_scale = _scale_from(stats[0] if most_recent else history.max(), max_value, margin, power_of_two, scale)
    if counts is not None:
        _add_counts(counts, stats, scale)
    scale.copy_(new_scale)


def _add_counts(counts, stats, scale):
    """Add a pass's overflow, underflow and NaN counts (``stats[1:]``) to ``counts[:3]``; set ``counts[3:]``
    to its amax and scale."""
    counts.copy_(torch.cat([counts[:3] + stats[1:], stats[:1], scale.reshape(1)]))


def _record_blocks(stats, block_scales, counts, extremes, scale_out, block) -> None:
    """A block-scaled pass's bookkeeping (see :meth:`Scaler.quantize_blocks`), in place, inside the pass."""
    if counts is not None:
        counts.copy_(torch.cat([counts[:3] + stats[1:4], stats[:1], stats[4:5]]))
        extremes.copy_(torch.maximum(extremes, stats[5:7]))
    if scale_out is not None:
        scale_out.copy_(per_element_scale(block_scales, block, scale_out.shape))


class Scaler(torch.nn.Module):
    """The scale of one quantization point (a weight, an activation or a gradient): per tensor with
    :meth:`quantize`, per row or block with :meth:`quantize_blocks` (which keeps no state).

    Its amax history is a buffer, so it is saved and restored with the model's ``state_dict``.
    """

    def __init__(self, fmt: FPFormat | str, config: ScalingConfig = ScalingConfig()):
        super().__init__()
        self.fmt = get_format(fmt)
        self.config = config
        self.register_buffer("amax_history", torch.zeros(config.history_len))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self._history_seen = False
        self.last_scale = self.last_stats = None

    def next_scale(self, amax: torch.Tensor) -> torch.Tensor | None:
        """The scale :meth:`quantize` would use now for a tensor with this amax (None: unscaled).
        No side effects: evaluation and inspection use it without moving the history."""
        if self.config.recipe == "none" or self.fmt.name == "fp32":
            return None
        fresh = self._scale_for(amax)
        if self.config.recipe == "current":
            return fresh
        return torch.where(self.observed, self.scale, fresh)  # delayed; own amax on the very first call

    def quantize(self, x: torch.Tensor, *, counts: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Quantize ``x`` with this point's scale, then record its amax for later calls. Under delayed
        scaling the amax comes from the quantizing pass itself, so the tensor is read once, and the
        history and scale move inside that pass. ``last_scale`` and ``last_stats`` keep what this call
        used and counted (``[amax, overflow, underflow, nan]``, see
        :func:`~altgrad.quantize.quantize_with_stats`); None for fp32.

        ``counts``, a float64 tensor ``[overflow, underflow, nan, amax, scale]``, accumulates on the
        device: this call adds its counts to the first three and sets the last two (unused for fp32)."""
        if self.fmt.name == "fp32":
            self.last_scale = self.last_stats = None
            return quantize(x, self.fmt, **kwargs)
        recipe = self.config.recipe
        if recipe == "delayed" and self._has_history():
            scale = self.scale.clone()  # what this pass uses: the buffer moves on inside it
            quantized, stats = _quantize(x, self.fmt, scale=scale, epilogue=_record_amax,
                                         epilogue_args=self._record_args(counts), **kwargs)
        else:
            scale = None if recipe == "none" else self.next_scale(x.detach().abs().amax().float())
            quantized, stats = quantize_with_stats(x, self.fmt, scale=scale, **kwargs)
            with torch.no_grad():
                if recipe == "delayed":  # the first call: its own amax opens the history
                    _record_amax(stats, *self._record_args(None))
                    self.observed.fill_(True)
                    self._history_seen = True
                elif recipe == "current":
                    self.scale.copy_(scale)  # readers of .scale (optimizers, flip tracking) see what was used
                if counts is not None:
                    _add_counts(counts, stats, stats.new_ones(()) if scale is None else scale)
        self.last_scale, self.last_stats = scale, stats
        return quantized

    def quantize_blocks(self, x: torch.Tensor, reduction_dim: int, *, counts: torch.Tensor | None = None,
                        extremes: torch.Tensor | None = None, scale_out: torch.Tensor | None = None,
                        **kwargs) -> torch.Tensor:
        """``x`` (a 2-D GEMM operand) quantized with one scale per block along ``reduction_dim`` (see
        :func:`gemm_block`), each from its own amax: row/block granularity. In the same pass, when given,
        ``counts`` (as in :meth:`quantize`, its scale slot the smallest block scale: that of the block
        holding x's amax) accumulate, ``extremes`` (float64 ``[1 / smallest, largest]`` block scale) keep
        their running maxima, and ``scale_out`` (x's shape) receives every element's scale."""
        config = self.config
        block = gemm_block(config, x.shape, reduction_dim)
        common = {"block": block, "scale_format": config.scale_format, "scale_rounding": config.scale_rounding,
                  **kwargs}
        if counts is None and scale_out is None:
            return quantize_blockwise(x, self.fmt, **common)
        return quantize_blockwise_with_stats(x, self.fmt, **common, epilogue=_record_blocks,
                                             epilogue_args=(counts, extremes, scale_out, block))[0]

    def _has_history(self) -> bool:
        """Whether an amax was recorded: read from the buffer once (a host sync), then remembered."""
        if not self._history_seen:
            self._history_seen = bool(self.observed)
        return self._history_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._history_seen = False  # the loaded buffer decides again

    def _scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        return scale_from_amax(amax, self.fmt, margin=self.config.margin,
                               power_of_two=self.config.power_of_two, previous=self.scale)

    def _record_args(self, counts: torch.Tensor | None) -> tuple:
        return (self.amax_history, self.scale, _max_value(self.fmt, torch.float32, self.scale.device),
                self.config.margin, self.config.power_of_two, self.config.amax_compute == "most_recent", counts)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, {self.config}"
