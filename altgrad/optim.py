"""Optimizers whose step is measured in rungs of the weight format's grid.

A float grid is roughly logarithmic: its spacing (ULP) at w is about |w| * 2**-M. A plain AdamW step of
fixed size is then far below one rung for large weights (their quantized value never changes) and many
rungs for small ones. Both optimizers here measure the step in rungs instead:

* ``ManifoldAdamW``: AdamW whose update is multiplied by ulp(w) at the quantized layer's live scale, so
  ``lr = 1`` moves every weight by about one rung whatever its magnitude.
* ``GridOptim``: the FP32 master weights *are* grid points; each step moves a whole number of rungs,
  rounded stochastically from Adam's request so that the expected move equals the request.

The ULP factor must scale the *update*, not the gradient: Adam's m / sqrt(v) is invariant to a fixed
per-weight gradient factor, so a "stiffness" multiplied into the gradient cancels (a predecessor did
that and measured a step ratio of 0.99999).

Weight decay is decoupled and measured in rungs too: it adds ``weight_decay * sign(w)`` to Adam's
direction before the ULP scaling, i.e. it pulls every weight ``lr * weight_decay`` rungs toward zero per
step. On the normal range that is a relative shrink of ``lr * weight_decay * ulp(w) / |w|``, within a
factor of two of ``lr * weight_decay * 2**-M``, the same for every magnitude, as in AdamW.

Groups without an 8-bit format (embeddings, norms, or an fp32/bf16/fp16 "format") take a plain AdamW step
with ``lr`` in parameter units, bit for bit the same as ``torch.optim.AdamW``.
"""

from __future__ import annotations

import functools

import torch

from altgrad.formats import FPFormat, get_format
from altgrad.quantize import quantize, ulp

OPTIMIZERS = ("adamw", "manifold_adamw", "grid")

# Group keys that point at the model (its format and live scale buffer): left out of checkpoints, and
# kept from the live optimizer on load, so a resumed run keeps reading the model's own scale buffer.
_LIVE_KEYS = ("fmt", "scale")


def _grid_format(fmt) -> FPFormat | None:
    """The 8-bit format whose grid measures a group's step, or None for a plain AdamW group.

    fp32/bf16/fp16 count as None: ULP steps are for the 8-bit formats, whose rungs are coarse enough
    that a fixed-size step stalls or jumps."""
    if fmt is None:
        return None
    fmt = get_format(fmt)
    return None if fmt.is_native else fmt


@functools.lru_cache(maxsize=None)
def _grid_on(fmt: FPFormat, device: torch.device) -> torch.Tensor:
    return fmt.grid().to(device)


def _stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Whole numbers with expectation x: floor(x) + 1 with probability frac(x), else floor(x)."""
    floor = x.floor()
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return floor + (noise < x - floor).to(x.dtype)


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

    def _grid_params(self):
        """Yield ``(p, group, fmt)`` for each parameter with a gradient in a group with an 8-bit format;
        parameters of plain groups take their AdamW step on the way."""
        for group in self.param_groups:
            fmt = _grid_format(group["fmt"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if fmt is None:
                    self._adamw_step(p, group)
                else:
                    yield p, group, fmt

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["param_groups"] = [{k: v for k, v in g.items() if k not in _LIVE_KEYS}
                                 for g in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        live = [{k: g[k] for k in _LIVE_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, live):
            group.update(keys)


class ManifoldAdamW(_AdamBase):
    """AdamW stepping ``lr`` rungs of each weight's grid: ``-lr * ulp(w) * (d + weight_decay * sign(w))``.

    ``d`` is Adam's normalized direction and ``ulp(w)`` the grid spacing of the group's ``fmt`` at
    ``w * scale``, divided by ``scale``. ``scale`` may be the quantized layer's scale buffer (a 0-d
    tensor); it is read afresh at every step. Groups with ``fmt=None`` are plain AdamW.
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
        for p, group, fmt in self._grid_params():
            rungs = self._direction(p, group)
            if group["weight_decay"]:
                rungs.add_(torch.sign(p), alpha=group["weight_decay"])
            p.addcmul_(ulp(p, fmt, scale=group["scale"]), rungs, value=-group["lr"])
        return loss


class GridOptim(_AdamBase):
    """FP32 master weights that always lie exactly on ``fmt.grid() / scale``.

    Each step asks for ``-lr * (d + weight_decay * sign(w))`` rungs (Adam's direction d, lr in rungs),
    rounds that stochastically to a whole number (unbiased; drawn from generators seeded with ``seed`` and
    saved in the state_dict, so a resumed run is bit-identical), clips it to ``±rung_clip`` and moves
    along the sorted grid, stopping at its ends. The current rung is the grid point nearest
    ``w * scale``: exact for a weight on the grid, a snap for one off it (the first step, or after the
    live ``scale`` moved). Groups with ``fmt=None`` are plain AdamW.

    ``step()`` returns ``(flips, updates)``: weights whose grid point changed, and weights with a
    non-zero gradient, over the groups with a format.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rung_clip: int = 4, fmt=None, scale=None, seed: int = 0):
        if rung_clip < 1:
            raise ValueError(f"GridOptim: rung_clip={rung_clip!r} must be >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      rung_clip=rung_clip, fmt=fmt, scale=scale))
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
        counts = [self._grid_step(p, group, fmt) for p, group, fmt in self._grid_params()]
        if not counts:
            return 0, 0
        flips, updates = torch.stack(counts).sum(0).tolist()  # one host sync per step
        return flips, updates

    def _grid_step(self, p: torch.Tensor, group: dict, fmt: FPFormat) -> torch.Tensor:
        """Move p along its grid; return ``[flips, updates]`` for it as a tensor."""
        grid = _grid_on(fmt, p.device)
        scale = torch.as_tensor(1.0 if group["scale"] is None else group["scale"], dtype=p.dtype,
                                device=p.device)
        current = quantize(p * scale, fmt, saturate=True)  # nearest grid point, in grid units
        index = torch.searchsorted(grid, current)
        request = self._direction(p, group)
        if group["weight_decay"]:
            request.add_(torch.sign(current), alpha=group["weight_decay"])
        request.mul_(-group["lr"])
        clip = group["rung_clip"]
        moves = _stochastic_round(request, self._generator(p.device)).clamp_(-clip, clip)
        new_index = (index + moves.long()).clamp_(0, grid.numel() - 1)
        p.copy_(grid[new_index] / scale)
        return torch.stack([(new_index != index).sum(), torch.count_nonzero(p.grad)])

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


def build_optimizer(name: str, groups: list[dict], *, lr: float, ulp_lr: float, betas=(0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0) -> torch.optim.Optimizer:
    """The trainer's optimizer over ``groups`` (dicts with ``params``, ``fmt``, ``scale``).

    Groups with an 8-bit ``fmt`` step ``ulp_lr`` rungs; the rest (``fmt`` None, fp32, bf16, fp16) use
    ``lr`` in parameter units. "adamw" ignores the formats: torch.optim.AdamW over every group.
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
