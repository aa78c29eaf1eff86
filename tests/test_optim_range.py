"""GridOptim widens its grid when weights ask to grow past its top, keeping them exactly on the grid."""

import pytest
import torch
import torch.nn.functional as F

from altgrad.formats import EIGHT_BIT_NAMES, get_format
from altgrad.layers import QuantConfig, QuantLinear
from altgrad.optim import GridOptim, build_optimizer, grid_weight_scaling
from altgrad.quantize import quantize, ulp
from altgrad.scaling import Scaler, ScalingConfig


def grid_step(params_and_grads, fmt, scale, **settings):
    """One GridOptim step (betas (0, 0): Adam's direction is the gradient's sign) over one group."""
    params = []
    for weights, grad in params_and_grads:
        p = torch.nn.Parameter(weights.clone())
        p.grad = grad
        params.append(p)
    opt = GridOptim([{"params": params, "fmt": get_format(fmt), "scale": scale}], lr=1.0, betas=(0.0, 0.0),
                    **settings)
    return opt.step(), [p.detach() for p in params]


def on_grid(w, fmt, scale):
    return torch.equal(quantize(w, fmt, scale=scale, saturate=True), w)


@pytest.mark.parametrize("fmt", EIGHT_BIT_NAMES)
def test_a_weight_at_the_top_halves_the_scale_and_keeps_growing(fmt):
    """+max asks to grow one rung; every other grid point stands still. The grid halves: +max lands one
    rung past its old top, each grid point g with g / 2 on the grid keeps its value, and the others
    (the bottom; E0M7's and E1M6's odd codes) go to a neighbour of g / 2 on the grid."""
    fmt = get_format(fmt)
    grid = fmt.grid()
    scale = torch.tensor(4.0)
    rest = grid[grid < fmt.max_value]
    start = torch.cat([torch.tensor([fmt.max_value]), rest]) / scale
    grad = torch.zeros_like(start)
    grad[0] = -1.0
    (flips, updates), (moved,) = grid_step([(start, grad)], fmt, scale)  # scale: the buffer, written in place
    assert scale.item() == 2.0
    assert on_grid(moved, fmt, scale)
    top = torch.tensor(fmt.max_value)
    assert moved[0] == (top + ulp(top, fmt)) / 4.0  # one rung of the grid continued past max
    survives = torch.isin(rest / 2, grid)
    assert torch.equal(moved[1:][survives], start[1:][survives])
    half = rest[~survives] / 2
    above = torch.searchsorted(grid, half)
    landed = moved[1:][~survives] * 2.0  # in the new grid's units
    assert ((landed == grid[above]) | (landed == grid[above - 1])).all()
    assert (flips, updates) == (1 + int((~survives).sum()), 1)


def test_without_a_scale_tensor_the_top_stops_the_weight():
    fmt = get_format("E4M3")
    start = torch.tensor([fmt.max_value, -fmt.max_value])
    (flips, _), (moved,) = grid_step([(start, -torch.sign(start))], fmt, None)
    assert torch.equal(moved, start) and flips == 0


def test_the_group_shares_its_scale():
    """Two weights under one scale: the one that grows widens the grid for both."""
    fmt, scale = get_format("E3M4"), torch.tensor(1.0)
    grows = torch.tensor([fmt.max_value, 1.0])
    still = torch.tensor([3.0, -0.5, 7.75])
    _, (a, b) = grid_step([(grows, torch.tensor([-1.0, 0.0])), (still, torch.zeros(3))], fmt, scale, rung_clip=4)
    assert scale.item() == 0.5
    assert a[0] == fmt.max_value + ulp(torch.tensor(fmt.max_value), fmt) and a[1] == 1.0
    assert torch.equal(b, still) and on_grid(a, fmt, scale) and on_grid(b, fmt, scale)


def test_a_request_far_past_the_top_halves_as_often_as_needed():
    """E7M0: a rung is a binade, so four rungs past the top need four halvings."""
    fmt, scale = get_format("E7M0"), torch.tensor(1.0)
    p = torch.nn.Parameter(torch.tensor([fmt.max_value]))
    p.grad = torch.tensor([-1.0])
    GridOptim([{"params": [p], "fmt": fmt, "scale": scale}], lr=4.0, betas=(0.0, 0.0), rung_clip=4).step()
    assert scale.item() == 2.0**-4 and p.item() == fmt.max_value * 2.0**4
    assert on_grid(p.detach(), fmt, scale)


def test_the_bottom_resnap_is_unbiased():
    """E0M7 halved: every odd code lies between two grid points and goes to either with probability 1/2."""
    fmt, scale = get_format("E0M7"), torch.tensor(1.0)
    n = 20_000
    odd = torch.full((n,), 3 / 128)
    top = torch.tensor([fmt.max_value])
    _, (grew, moved) = grid_step([(top, torch.tensor([-1.0])), (odd, torch.zeros(n))], fmt, scale)
    assert scale.item() == 0.5 and grew.item() == 1.0
    assert set(moved.unique().tolist()) == {2 / 128, 4 / 128}
    mean_error = (moved.double().mean() - 3 / 128).abs().item()
    assert mean_error < 5 * (1 / 128) / n**0.5


def regression(fmt, optimizer, *, power_of_two=True, steps=150):
    """Fit y = X @ W_true with W_true 25x the initial weights, through one QuantLinear; return the final
    loss, the largest weight, and whether every step left the master weights exactly on the grid of the
    scale the next training forward used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    init = torch.randn(4, 16, generator=g) * 0.02
    # The target has the initial signs: in rungs, crossing zero is a long way through the bottom binades,
    # which would measure something else than the range.
    w_true = torch.sign(init) * torch.randn(4, 16, generator=g).abs() * 0.5
    y = x @ w_true.T
    layer = QuantLinear(16, 4, bias=False, config=QuantConfig(weight=fmt))
    with torch.no_grad():
        layer.weight.copy_(init)
    if power_of_two:  # the weight recipe GridOptim agrees with exactly (see GridOptim's docstring)
        layer.scalers["weight"] = Scaler(fmt, grid_weight_scaling(ScalingConfig(margin=2)))
    scaler = layer.scalers["weight"]
    opt = build_optimizer(optimizer, [{"params": [layer.weight], "fmt": layer.weight_format,
                                       "scale": layer.weight_scale}], lr=2e-2, ulp_lr=1.0)
    exact = True
    for step in range(steps):
        scale_next = layer.weight_scale.clone()
        loss = F.mse_loss(layer(x), y)
        if step > 0:  # the first forward sets the scale from the (off-grid) initial weights
            exact &= torch.equal(scaler.last_scale, scale_next)
            exact &= torch.equal(quantize(layer.weight.detach(), fmt, scale=scale_next, saturate=True),
                                 layer.weight.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.mse_loss(layer(x), y).item()
    return final, layer.weight.detach().abs().max().item(), exact


@pytest.mark.parametrize("fmt", ["E4M3", "E5M2"])
def test_grid_regression_reaches_adamw(fmt):
    adamw_loss, _, _ = regression(fmt, "adamw", power_of_two=False)
    grid_loss, grid_amax, exact = regression(fmt, "grid")
    assert exact
    assert grid_amax > 10 * 0.02 * 2.5  # grown far past the initial weights' amax (about 2.5 sigma)
    assert grid_loss < 10 * adamw_loss
    assert adamw_loss < 0.05  # both fit; the frozen range left the loss above 5 (y's variance is 4)


def test_grid_regression_under_delayed_scaling_that_is_not_a_power_of_two():
    """The default recipe still lets the grid widen and keeps the weights on the forward's grid; its
    non-power-of-two rescales re-snap every weight, which costs precision (see the docstring)."""
    loss, amax, exact = regression("E4M3", "grid", power_of_two=False)
    assert exact and amax > 0.5 and loss < 0.1


def test_grid_weight_scaling_keeps_the_history_and_makes_scales_powers_of_two():
    config = ScalingConfig(recipe="current", history_len=4, amax_compute="most_recent", margin=2)
    assert grid_weight_scaling(config) == ScalingConfig(recipe="delayed", history_len=4, amax_compute="most_recent",
                                                        margin=0, power_of_two=True)
