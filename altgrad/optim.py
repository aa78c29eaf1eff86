"""Optimizers whose step is measured in rungs of the weight format's grid.

A float grid is roughly logarithmic: its spacing (ULP) at w is about |w| * 2**-M. A plain AdamW step of
fixed size is then far below one rung for large weights (their quantized value never changes) and many
rungs for small ones. Both optimizers here measure the step in rungs instead:

* ``ManifoldAdamW``: AdamW whose update is ``lr`` times Adam's direction in rungs, at the quantized
  layer's live scale, so ``lr = 1`` moves every weight by about one rung whatever its magnitude.
* ``GridOptim``: the FP32 master weights *are* grid points; each step moves a whole number of rungs,
  rounded stochastically from Adam's request so that the expected move equals the request. When
  weights ask to pass the grid's top, it widens the grid by powers of two (see :class:`GridOptim`).

A rung is counted along the grid, in the direction of motion: the format's signed magnitude code, read
as a number and continued past the grid's top, is a coordinate in which every rung has length 1, and a
step of r rungs adds r to it. Within a binade that is ``r * ulp(w)``; a weight on a power of two steps
down by the lower binade's spacing, so one rung up and one rung down are each one grid point, in every
format, at zero and among the subnormals. Measuring by ulp(w), the spacing at the weight's own binade,
made a down-step from a power of two cross 2 grid points in E4M3 and all of them in E7M0, and
zero-mean noise shrank the weights (E7M0: by 2 rungs in 300 steps).

The rung factor must scale the *update*, not the gradient: Adam's m / sqrt(v) is invariant to a fixed
per-weight gradient factor, so a "stiffness" multiplied into the gradient cancels (a predecessor did
that and measured a step ratio of 0.99999).

Weight decay is decoupled and measured in rungs too: it adds ``weight_decay * sign(w)`` to Adam's
direction, i.e. it pulls every weight ``lr * weight_decay`` rungs toward zero per step, each rung being
the spacing toward zero. On the normal range that is a relative shrink within a factor of two of
``lr * weight_decay * 2**-M``, the same for every magnitude, as in AdamW; in E0M7, whose grid is
uniform, it is L1-like (a fixed amount per step).

Groups without an 8-bit format (embeddings, norms, or an fp32/bf16/fp16 "format") take a plain AdamW step
with ``lr`` in parameter units, bit for bit the same as ``torch.optim.AdamW``.

A group's ``scale`` is anything that broadcasts against its weight: a 0-d per-tensor scale, or under row
or block scaling every element's own block scale (``QuantLinear.weight_scale``), so that each weight's
rung is the spacing of its own block's grid.
"""

from __future__ import annotations

import dataclasses

import torch

from altgrad.config import OPTIMIZERS, ScalingConfig
from altgrad.formats import FPFormat, get_format
from altgrad.quantize import _LAYOUT, quantize

# Group keys that point at the model (its format, live scale buffer and block-scale rule): left out of
# checkpoints, and kept from the live optimizer on load, so a resumed run keeps reading the model's own.
_LIVE_KEYS = ("fmt", "scale", "scale_of")


def _grid_format(fmt) -> FPFormat | None:
    """The 8-bit format whose grid measures a group's step, or None for a plain AdamW group.

    fp32/bf16/fp16 count as None: ULP steps are for the 8-bit formats, whose rungs are coarse enough
    that a fixed-size step stalls or jumps."""
    if fmt is None:
        return None
    fmt = get_format(fmt)
    return None if fmt.is_native else fmt


def _stochastic_round(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Whole numbers with expectation x, given uniform [0, 1) ``noise``: floor(x) + 1 with probability
    frac(x), else floor(x)."""
    floor = x.floor()
    return floor + (noise < x - floor).to(x.dtype)


# ---- rung coordinates ---------------------------------------------------------------------------
# A format's magnitude code counts rungs: 2**M codes per binade, the subnormals spaced like the lowest
# normal binade. Read as a number, the signed code of the grid continued past its top (binade after
# binade) is a coordinate in which every rung has length 1, piecewise linear in the value. Here binade
# k >= 1 holds the magnitudes [2**(emin + k), 2**(emin + k + 1)), coordinates [(k + 1), (k + 2)) * 2**M,
# spaced 2**(emin - M + k); binade 0 holds the subnormals and the lowest normal binade, the magnitudes
# below 2**(emin + 1), spaced 2**(emin - M): on both sides of zero, the coordinates (-2, 2) * 2**M.

def _pow2(exponent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """2**exponent (integers in the normal range) in like's dtype, built from bits: exact."""
    int_dtype, mant, bias = _LAYOUT[like.dtype]
    return ((exponent.to(int_dtype) + bias) << mant).view(like.dtype)


def _binade(u: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The binade k of each |u| (grid units) in the continued grid, and its spacing 2**(emin - M + k)."""
    emin = 1 - fmt.bias
    _, exponent = torch.frexp(u.abs().clamp_min(2.0**emin))  # |u| = m * 2**exponent, m in [0.5, 1)
    k = exponent - (1 + emin)
    return k, _pow2(k + (emin - fmt.man_bits), u)


def _coordinate(u: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """The signed rung coordinate of each u (grid units): on the grid, the signed magnitude code."""
    k, spacing = _binade(u, fmt)
    return u / spacing + torch.sign(u) * (k << fmt.man_bits).to(u.dtype)


def _value(coordinate: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """The grid-unit value at each rung coordinate: the inverse of :func:`_coordinate`."""
    emin, man_bits = 1 - fmt.bias, fmt.man_bits
    magnitude = coordinate.abs()
    k = (torch.floor(magnitude * 2.0**-man_bits) - 1).clamp_min(0)
    spacing = _pow2(k.to(torch.int32) + (emin - man_bits), coordinate)
    return torch.copysign((magnitude - k * 2.0**man_bits) * spacing, coordinate)


def _rung_move(u: torch.Tensor, rungs: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """How far ``u`` (grid units) travels when it moves ``rungs`` (signed, fractional) along the grid.

    Within u's binade that is ``rungs`` times its spacing, as float32 computes ``u + rungs * ulp``;
    a move that leaves the binade (a down-step from a power of two, say) goes through the rung
    coordinate, so that each stretch of it is measured by the spacing it crosses."""
    k, spacing = _binade(u, fmt)
    local = u / spacing  # in binade k: |local| in [2**M, 2**(M+1)); binade 0 reaches down through zero
    moved = local + rungs
    one, two = 2.0**fmt.man_bits, 2.0**(fmt.man_bits + 1)
    within = (moved.abs() < two) & ((k == 0) | ((moved.abs() >= one) & (moved * local > 0)))
    crossing = _value(moved + torch.sign(u) * (k << fmt.man_bits).to(u.dtype), fmt) - u
    return torch.where(within, rungs * spacing, crossing)


def _scale_of(group: dict, p: torch.Tensor) -> torch.Tensor:
    """The group's scale (1 when None) as a tensor in p's dtype, on p's device: 0-d, or broadcasting
    against p (one scale per element, row or block)."""
    return torch.as_tensor(1.0 if group["scale"] is None else group["scale"], dtype=p.dtype, device=p.device)


class _AdamBase(torch.optim.Optimizer):
    """Adam's moments, shared by both optimizers, and checkpoints that leave the live fmt/scale alone."""

    def __init__(self, params, defaults: dict):
        beta1, beta2 = defaults["betas"]
        for key in ("lr", "eps", "weight_decay"):
            if not defaults[key] >= 0:
                raise ValueError(f"{type(self).__name__}: {key}={defaults[key]!r} must be >= 0")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"{type(self).__name__}: betas={defaults['betas']!r} must lie in [0, 1)")
        super().__init__(params, defaults)

    def _moments(self, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Advance p's moments; return ``(m, denom, bias1)``, Adam's direction being m / denom / bias1.

        These are torch.optim.AdamW's own operations in its order, so a plain group matches it exactly."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** state["step"]) ** 0.5).add_(group["eps"])
        return m, denom, 1 - beta1 ** state["step"]

    def _direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Adam's normalized direction m_hat / (sqrt(v_hat) + eps): about ±1 per weight."""
        m, denom, bias1 = self._moments(p, group)
        return (m / denom).div_(bias1)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        """A group without an 8-bit format: torch.optim.AdamW's step, lr in parameter units."""
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        m, denom, bias1 = self._moments(p, group)
        p.addcdiv_(m, denom, value=-(group["lr"] / bias1))

    def _grid_groups(self):
        """Yield ``(group, fmt, params)`` for each group with an 8-bit format and its parameters with a
        gradient; parameters of plain groups take their AdamW step on the way."""
        for group in self.param_groups:
            fmt = _grid_format(group["fmt"])
            params = [p for p in group["params"] if p.grad is not None]
            if fmt is None:
                for p in params:
                    self._adamw_step(p, group)
            elif params:
                yield group, fmt, params

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["param_groups"] = [{k: v for k, v in g.items() if k not in _LIVE_KEYS}
                                 for g in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        live = [{k: g[k] for k in _LIVE_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, live):
            group.update(keys)


class ManifoldAdamW(_AdamBase):
    """AdamW stepping ``lr`` rungs of each weight's grid: ``-lr * (d + weight_decay * sign(w))`` rungs.

    ``d`` is Adam's normalized direction. A rung is the spacing of the group's ``fmt`` grid at
    ``w * scale`` in the direction of motion (divided by ``scale``): a weight on a power of two steps
    down by the lower binade's spacing, so one rung up and one rung down are one grid point each way,
    and zero-mean noise does not drift the weights toward zero. ``scale`` may be the quantized layer's
    scale buffer (0-d, or one scale per element under row/block scaling: each weight's rung is then its
    own block's); it is read afresh at every step. Groups with ``fmt=None`` are plain AdamW.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fmt=None, scale=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      fmt=fmt, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, fmt, params in self._grid_groups():
            for p in params:
                rungs = self._direction(p, group)
                if group["weight_decay"]:
                    rungs.add_(torch.sign(p), alpha=group["weight_decay"])
                scale = _scale_of(group, p)
                p.add_(_rung_move(p * scale, rungs.mul_(-group["lr"]), fmt).div_(scale))
        return loss


class GridOptim(_AdamBase):
    """FP32 master weights that always lie exactly on ``fmt.grid() / scale``, on a grid that widens
    when they ask to grow past its top.

    Each step asks for ``-lr * (d + weight_decay * sign(w))`` rungs (Adam's direction d, lr in rungs),
    rounds that stochastically to a whole number (unbiased; drawn from generators seeded with ``seed`` and
    saved in the state_dict, so a resumed run is bit-identical), clips it to ``±rung_clip`` and moves
    that many grid points along the grid. The current rung is the grid point nearest ``w * scale``:
    exact for a weight on the grid, a snap for one off it (the first step, or after the live ``scale``
    moved).

    The grid's top does not stop a weight. The move is made on the grid continued past its top
    (binade after binade); when a weight of the group lands beyond ``max / scale``, the group's scale
    is divided by the smallest power of two that brings it back, and written into the ``scale`` tensor
    in place (the layer's weight-scale buffer, which the next forward reads). A power-of-two rescale
    keeps every grid point on the grid except at the bottom (subnormals, E7M0's smallest normal,
    E0M7's odd codes), which is re-snapped stochastically, with the step's own uniform draw; so the
    forward still quantizes every master weight to itself. Lowering the scale as weights grow is the
    optimizer's job; raising it as they shrink is left to the layer's recipe. With delayed scaling
    and ``power_of_two`` (margin 0) the two agree exactly: the recipe's next scale, the power of two
    that puts the amax history's max in the top binade, is the one the optimizer wrote, and raising
    waits until the grown amax leaves the history (a hysteresis that keeps the bottom from being
    re-snapped at every step). A scale that is not a tensor cannot move: then moves stop at the
    grid's ends. Groups with ``fmt=None`` are plain AdamW.

    ``step()`` returns ``(flips, updates)``: weights whose forward value changed (a move, or a
    re-snap when the grid widened) and weights with a non-zero gradient, over the groups with a format.

    Under row or block scaling the forward sets each block's scale from the block's own amax, so the
    grid moves by itself: a group (one weight) then carries ``scale_of``, the layer's rule for the
    per-element scales of a weight (``QuantLinear.block_weight_scale``), and ``scale``, one per element.
    Each weight moves on its own block's continued grid; then every landing point is re-snapped onto the
    grid of the scale its block will get (stochastically, with the step's draw; a whole-grid point stays
    put unless the scale coarsened under it), clamped to ±max (under floor e8m0 scales a block's top binade
    reaches past max, and the forward saturates there), and ``scale`` gets the new scales. With e8m0
    (power-of-two) scales the next forward then quantizes every master weight to itself: the block's
    amax stays in the binade that set its scale (floor), or a finer scale's grid holds every point (ceil).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rung_clip: int = 4, fmt=None, scale=None, seed: int = 0, scale_of=None):
        if rung_clip < 1:
            raise ValueError(f"GridOptim: rung_clip={rung_clip!r} must be >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      rung_clip=rung_clip, fmt=fmt, scale=scale, scale_of=scale_of))
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device) -> torch.Generator:
        """One generator per device, so the noise is drawn where the weights live."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(key).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def step(self) -> tuple[int, int]:
        counts = [self._group_step(group, fmt, params) for group, fmt, params in self._grid_groups()]
        if not counts:
            return 0, 0
        flips, updates = torch.stack(counts).sum(0).tolist()  # one host sync per step
        return flips, updates

    def _group_step(self, group: dict, fmt: FPFormat, params: list[torch.Tensor]) -> torch.Tensor:
        """Move the group's weights along its grid, widening it (one scale for the group) if they pass its
        top; return ``[flips, updates]`` for the group as a tensor."""
        widen = isinstance(group["scale"], torch.Tensor)
        top = float((fmt.num_finite - 1) // 2)  # the coordinate of max: the largest magnitude code
        moved = []
        for p in params:
            scale = _scale_of(group, p)
            current = quantize(p * scale, fmt, saturate=True)  # nearest grid point, in grid units
            request = self._direction(p, group)
            if group["weight_decay"]:
                request.add_(torch.sign(current), alpha=group["weight_decay"])
            request.mul_(-group["lr"])
            noise = torch.rand(p.shape, generator=self._generator(p.device), device=p.device, dtype=p.dtype)
            clip = group["rung_clip"]
            target = _coordinate(current, fmt) + _stochastic_round(request, noise).clamp_(-clip, clip)
            if not widen:
                target.clamp_(-top, top)
            moved.append((p, scale, current, _value(target, fmt), noise))
        if group.get("scale_of") is not None:
            return self._resnap_to_block_scales(group, fmt, moved)
        # The halvings that bring the group's largest landing point back under max (0 if none passed it).
        amax = torch.stack([v.abs().amax().to(params[0].device) for _, _, _, v, _ in moved]).max()
        halvings = torch.where(amax > fmt.max_value, torch.ceil(torch.log2(amax / fmt.max_value)), 0).to(torch.int32)
        halvings += (amax * _pow2(-halvings, amax) > fmt.max_value).to(torch.int32)  # log2's rounding
        counts = []
        for p, scale, current, value, noise in moved:
            shrink = _pow2(-halvings.to(p.device), value)
            snapped = _value(_stochastic_round(_coordinate(value * shrink, fmt), noise), fmt)
            new_scale = scale * shrink
            before = current / scale
            p.copy_(snapped / new_scale)
            counts.append(torch.stack([(p != before).sum(), torch.count_nonzero(p.grad)]))
        if widen:
            group["scale"].mul_(_pow2(-halvings.to(group["scale"].device), group["scale"]))
        return torch.stack(counts).sum(0)

    @staticmethod
    def _resnap_to_block_scales(group: dict, fmt: FPFormat, moved: list) -> torch.Tensor:
        """Row/block scales: land each moved weight on the grid its block's next scale gives (see the class
        docstring), write those scales into ``group["scale"]``; return ``[flips, updates]``."""
        counts = []
        for p, scale, current, value, noise in moved:
            landing = value / scale  # exact: power-of-two scales
            new_scale = group["scale_of"](landing)
            snapped = _value(_stochastic_round(_coordinate(landing * new_scale, fmt), noise), fmt)
            before = current / scale
            p.copy_(snapped.clamp_(-fmt.max_value, fmt.max_value) / new_scale)
            group["scale"].copy_(group["scale_of"](p))  # the snap may have moved a block's amax down a binade
            counts.append(torch.stack([(p != before).sum(), torch.count_nonzero(p.grad)]))
        return torch.stack(counts).sum(0)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["generators"] = {device: g.get_state() for device, g in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        self._generators = {}
        for device, generator_state in generators.items():
            self._generator(device).set_state(generator_state)


def grid_weight_scaling(config: ScalingConfig) -> ScalingConfig:
    """The weight-point recipe GridOptim agrees with exactly: per tensor, ``config``'s delayed scaling (its
    history length and amax rule), scales rounded down to powers of two, no margin; row/block scaling as
    it is (e8m0 block scales are powers of two already; see :class:`GridOptim`)."""
    if not config.per_tensor:
        return config
    return dataclasses.replace(config, recipe="delayed", power_of_two=True, margin=0)


def build_optimizer(name: str, groups: list[dict], *, lr: float, ulp_lr: float, betas=(0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of OPTIMIZERS) over ``groups``, public and stable for research scripts.

    ``groups``: dicts ``{"params": [...], "fmt": FPFormat | None, "scale": Tensor | None}``, ``scale``
    being the quantized layer's weight-scale buffer (``QuantLinear.weight_scale``: 0-d, or one per element
    under row/block scaling, where "grid" also needs ``"scale_of": layer.block_weight_scale``, one weight
    per group). Groups with an 8-bit
    ``fmt`` step ``ulp_lr`` rungs ("manifold_adamw", "grid"); the rest (``fmt`` None, fp32, bf16, fp16)
    use ``lr`` in parameter units. "adamw" ignores the formats: torch.optim.AdamW over every group.
    "grid" writes a widened grid's scale into ``scale`` in place; give its layers delayed weight scaling
    with ``power_of_two`` (see :class:`GridOptim`). ``seed`` seeds GridOptim's stochastic rounding.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    common = dict(betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        plain = [{k: v for k, v in g.items() if k not in _LIVE_KEYS} for g in groups]
        return torch.optim.AdamW(plain, lr=lr, **common)
    resolved = []
    for group in groups:
        fmt = _grid_format(group.get("fmt"))
        resolved.append({**group, "fmt": fmt, "lr": lr if fmt is None else ulp_lr})
    if name == "manifold_adamw":
        return ManifoldAdamW(resolved, lr=lr, **common)
    return GridOptim(resolved, lr=lr, seed=seed, **common)
