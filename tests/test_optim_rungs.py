"""ManifoldAdamW's rung is the grid spacing in the direction of motion: one rung up or down, no drift.

The oracle is the sorted grid itself (``fmt.grid()``): a weight at grid index i moved one rung lands on
index i + 1 or i - 1, whatever the binade, at zero, among the subnormals and at a scale."""

import pytest
import torch

from altgrad.formats import EIGHT_BIT_NAMES, get_format
from altgrad.optim import build_optimizer
from altgrad.quantize import quantize, ulp

FORMATS = EIGHT_BIT_NAMES  # E0M7 .. E7M0; E3M4, E4M3 and E5M2 are the IEEE/OCP-style ones
SCALES = (1.0, 8.0, 2.0**-5)  # powers of two: the moved weight is exactly the neighbour / scale


def step_manifold(weights, grad, fmt, scale, *, ulp_lr=1.0, **settings):
    """Weights after one ManifoldAdamW step with gradient ``grad``."""
    p = torch.nn.Parameter(weights.clone())
    p.grad = grad
    build_optimizer("manifold_adamw", [{"params": [p], "fmt": get_format(fmt), "scale": scale}],
                    lr=1e-3, ulp_lr=ulp_lr, **settings).step()
    return p.detach()


def neighbours(fmt, direction):
    """Indices i of the sorted grid that have a neighbour i + direction, and those neighbours' indices."""
    n = get_format(fmt).grid().numel()
    index = torch.arange(n)
    has = (index + direction >= 0) & (index + direction < n)
    return index[has], index[has] + direction


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("direction", [1, -1])
def test_one_rung_from_every_grid_point(fmt, scale, direction):
    """betas (0, 0): Adam's direction is exactly the gradient's sign, so the request is exactly one rung."""
    grid, scale = get_format(fmt).grid(), torch.tensor(scale)
    start, end = neighbours(fmt, direction)
    moved = step_manifold(grid[start] / scale, torch.full((start.numel(),), -float(direction)), fmt, scale,
                          betas=(0.0, 0.0))
    assert torch.equal(moved, grid[end] / scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_rung_with_default_betas_at_a_scale_that_is_no_power_of_two(fmt):
    """The trainer's betas and a delayed-scaling-like scale: the step lands on the neighbour, to float32."""
    grid, scale = get_format(fmt).grid(), torch.tensor(448.0 / 3.7)
    for direction in (1, -1):
        start, end = neighbours(fmt, direction)
        moved = step_manifold(grid[start] / scale, torch.full((start.numel(),), -float(direction)), fmt, scale)
        assert torch.equal(quantize(moved, fmt, scale=scale), quantize(grid[end] / scale, fmt, scale=scale))
        rung = (grid[end] - grid[start]).abs()
        assert ((moved * scale - grid[end]).abs() <= 1e-3 * rung).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_top_grows_by_the_top_binades_spacing(fmt):
    """A weight at ±max/scale asking to grow is not stopped: it moves one rung of the top binade outward
    (the layer's delayed scale then follows its amax)."""
    fmt, scale = get_format(fmt), torch.tensor(4.0)
    top = torch.tensor([fmt.max_value, -fmt.max_value])
    moved = step_manifold(top / scale, -torch.sign(top), fmt, scale, betas=(0.0, 0.0))
    assert torch.equal(moved * scale, top + torch.sign(top) * ulp(top, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_decay_pulls_one_rung_toward_zero(fmt):
    """Zero gradient, ulp_lr * weight_decay = 1: every non-zero grid point moves to its neighbour toward
    zero (a power of two steps down by the lower binade's spacing); zero stays."""
    grid, scale = get_format(fmt).grid(), torch.tensor(8.0)
    moved = step_manifold(grid / scale, torch.zeros_like(grid), fmt, scale, weight_decay=1.0)
    index = torch.arange(grid.numel())
    toward_zero = index - torch.sign(grid).long()
    assert torch.equal(moved, grid[toward_zero] / scale)


def code_index(w, fmt, scale):
    """Position of the grid point nearest each weight in the sorted grid."""
    return torch.searchsorted(get_format(fmt).grid(), quantize(w, fmt, scale=scale, saturate=True) * scale)


@pytest.mark.parametrize("fmt", ["E7M0", "E5M2"])
def test_zero_mean_noise_does_not_drift(fmt):
    """A seeded walk under zero-mean noise gradients: the code index, counted outward from zero, moves
    by 0 in the median and by less than 0.2 rungs in the mean (3 standard errors). The one-sided ULP
    moved it by -2.0 and -0.4 rungs on average in E7M0 and E5M2 (and by -0.2 in E4M3, too little to
    tell apart cheaply)."""
    fmt, scale = get_format(fmt), torch.tensor(2.0)
    grid = fmt.grid()
    positive = grid[grid > 0]
    middle = positive[positive.numel() // 3: 2 * positive.numel() // 3]  # far from zero and from the top
    g = torch.Generator().manual_seed(0)
    n = 16 * 1024
    start = middle[torch.randint(0, middle.numel(), (n,), generator=g)]
    start = start * (torch.randint(0, 2, start.shape, generator=g) * 2 - 1)
    w = torch.nn.Parameter(start / scale)
    opt = build_optimizer("manifold_adamw", [{"params": [w], "fmt": fmt, "scale": scale}], lr=1e-3, ulp_lr=0.5)
    for _ in range(300):
        w.grad = torch.randn(w.shape, generator=g)
        opt.step()
    outward = (code_index(w.detach(), fmt, scale) - code_index(start / scale, fmt, scale)) * torch.sign(start).long()
    outward = outward.float()
    assert outward.abs().mean() > 5  # the walk did spread the weights over several rungs
    assert outward.median() == 0
    assert abs(outward.mean().item()) < 0.2
