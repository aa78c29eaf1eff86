"""ULP-measured optimizers: steps in rungs, weights on the grid, plain groups equal to AdamW, resumable."""

import io
import math

import pytest
import torch

from altgrad.formats import get_format
from altgrad.optim import OPTIMIZERS, GridOptim, ManifoldAdamW, build_optimizer
from altgrad.quantize import quantize, ulp


def log_spaced(n=512, lo=1e-3, hi=1e2, seed=0):
    """Magnitudes log-spaced over [lo, hi] with random signs."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return torch.logspace(math.log10(lo), math.log10(hi), n) * signs


def random_grad(shape, step, zero_frac=0.0):
    """A gradient that depends only on the step number, so two runs see the same gradients."""
    g = torch.Generator().manual_seed(1000 + step)
    grad = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < zero_frac, 0.0, grad)


def on_grid(w, fmt, scale):
    return torch.isin(w, get_format(fmt).grid() / torch.as_tensor(scale, dtype=torch.float32))


def fractional_index(w, fmt, scale=None):
    """Where each ``w * scale`` lies in the sorted grid, interpolating linearly between grid points: steps
    measured in rungs, with each stretch counted in the spacing it crosses (in float64)."""
    grid = get_format(fmt).grid().double()
    u = w.double() * (1.0 if scale is None else float(scale))
    i = (torch.searchsorted(grid, u, right=True) - 1).clamp(0, grid.numel() - 2)
    return i + (u - grid[i]) / (grid[i + 1] - grid[i])


def rung_index(w, fmt, scale):
    """Position of each on-grid weight in the sorted grid."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return torch.searchsorted(get_format(fmt).grid(), w * scale)


# ---- ManifoldAdamW ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, scale", [("E5M2", None), ("E4M3", torch.tensor(4.0))])
def test_first_step_moves_every_weight_lr_ulps(fmt, scale):
    """1e-3 .. 1e2: five decades of magnitude, one step size in rungs."""
    lr = 0.5
    w = torch.nn.Parameter(log_spaced())
    before = w.detach().clone()
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    ManifoldAdamW([{"params": [w], "fmt": get_format(fmt), "scale": scale}], lr=lr).step()
    rungs = (fractional_index(w.detach(), fmt, scale) - fractional_index(before, fmt, scale)).abs()
    torch.testing.assert_close(rungs, torch.full_like(rungs, lr, dtype=torch.float64), rtol=1e-3, atol=0)
    assert torch.equal(torch.sign(w.detach() - before), -torch.sign(w.grad))


def test_stiffness_on_the_gradient_cancels():
    """Why the update, not the gradient, is scaled: AdamW normalizes a per-weight gradient factor away,
    so 'gradient * ulp(w)' still moves every weight by the same absolute amount."""
    w = torch.nn.Parameter(log_spaced())
    before = w.detach().clone()
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    w.grad = grad * ulp(before, "E5M2")
    torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0).step()
    step = (w.detach() - before).abs()
    assert step.max() / step.min() < 1.02  # the stiffness cancelled (up to float32 rounding of w + step) ...
    rungs = step / ulp(before, "E5M2")
    assert rungs.max() / rungs.min() > 1e4  # ... so in rungs the step spans four-plus decades


def test_scale_buffer_is_read_live():
    scale = torch.tensor(1.0)
    w = torch.nn.Parameter(log_spaced(64, 1e-2, 1e1))
    opt = ManifoldAdamW([{"params": [w], "fmt": get_format("E4M3"), "scale": scale}], lr=1.0)
    for new_scale in (1.0, 16.0, 0.25):
        scale.fill_(new_scale)  # what the layer's Scaler does in place
        before = w.detach().clone()
        w.grad = torch.ones_like(w)  # constant gradient: Adam's direction stays ±1
        opt.step()
        rungs = (fractional_index(w.detach(), "E4M3", new_scale) - fractional_index(before, "E4M3", new_scale)).abs()
        torch.testing.assert_close(rungs, torch.ones_like(rungs), rtol=1e-3, atol=0)


def test_weight_decay_pulls_lr_times_decay_rungs_toward_zero():
    lr, decay = 0.5, 0.2
    w = torch.nn.Parameter(log_spaced(64, 1e-2, 1e1))
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)
    ManifoldAdamW([{"params": [w], "fmt": get_format("E5M2")}], lr=lr, weight_decay=decay).step()
    rungs = (fractional_index(before, "E5M2") - fractional_index(w.detach(), "E5M2")) * torch.sign(before)
    torch.testing.assert_close(rungs, torch.full_like(rungs, lr * decay, dtype=torch.float64), rtol=1e-3, atol=0)


@pytest.mark.parametrize("optimizer", [ManifoldAdamW, GridOptim])
def test_plain_group_is_exactly_adamw(optimizer):
    settings = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    init = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_ours = optimizer([{"params": [ours], "fmt": None}], **settings)
    opt_theirs = torch.optim.AdamW([theirs], **settings)
    for step in range(5):
        ours.grad, theirs.grad = random_grad(init.shape, step), random_grad(init.shape, step)
        opt_ours.step()
        opt_theirs.step()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, init)


# ---- GridOptim -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["E2M5", "E4M3", "E7M0", "E0M7"])
def test_weights_stay_on_the_grid(fmt):
    fmt = get_format(fmt)
    init = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    scale = torch.tensor(fmt.max_value / init.abs().max().item())
    w = torch.nn.Parameter(init.clone())
    opt = GridOptim([{"params": [w], "fmt": fmt, "scale": scale}], lr=1.5, weight_decay=0.01)
    for step in range(30):
        if step == 15:
            scale.mul_(0.3)  # the live scale moves: weights are snapped to the new grid
        w.grad = random_grad(w.shape, step)
        opt.step()
        assert on_grid(w.detach(), fmt, scale).all(), f"{fmt.name} step {step}"
    assert not torch.equal(w.detach(), quantize(init, fmt, scale=scale, saturate=True))


@pytest.mark.parametrize("request_rungs", [0.3, -1.7])
def test_stochastic_move_is_unbiased(request_rungs):
    """First step with unit gradients: Adam's direction is ±1, so the request is exactly ±lr rungs."""
    n = 50_000
    w = torch.nn.Parameter(torch.ones(n))  # 1.0, mid-grid in E4M3: room to move either way
    w.grad = torch.full((n,), -math.copysign(1.0, request_rungs))
    opt = GridOptim([{"params": [w], "fmt": get_format("E4M3")}], lr=abs(request_rungs), seed=3)
    before = rung_index(w.detach(), "E4M3", 1.0)
    opt.step()
    moved = (rung_index(w.detach(), "E4M3", 1.0) - before).float()
    floor = math.floor(request_rungs)
    assert set(moved.unique().tolist()) <= {floor, floor + 1}
    frac = request_rungs - floor
    sigma = math.sqrt(frac * (1 - frac) / n)
    assert abs(moved.mean().item() - request_rungs) < 5 * sigma


@pytest.mark.parametrize("clip", [1, 4])
def test_rung_clip(clip):
    w = torch.nn.Parameter(torch.linspace(-2, 2, 101))
    w.grad = torch.sign(torch.randn(101, generator=torch.Generator().manual_seed(0)))
    opt = GridOptim([{"params": [w], "fmt": get_format("E3M4")}], lr=10.0, rung_clip=clip)
    before = rung_index(quantize(w.detach(), "E3M4"), "E3M4", 1.0)
    opt.step()
    moved = rung_index(w.detach(), "E3M4", 1.0) - before
    assert torch.equal(moved, -clip * w.grad.long())


def test_flips_and_updates_match_a_before_after_comparison():
    fmt = get_format("E3M4")
    scale = torch.tensor(2.0)
    a = torch.nn.Parameter(torch.randn(40, 20, generator=torch.Generator().manual_seed(0)))
    b = torch.nn.Parameter(torch.randn(30, generator=torch.Generator().manual_seed(1)))
    plain = torch.nn.Parameter(torch.randn(10))  # fmt=None: not counted
    opt = GridOptim([{"params": [a, b], "fmt": fmt, "scale": scale}, {"params": [plain], "fmt": None}],
                    lr=0.7, betas=(0.5, 0.9))
    for step in range(6):
        grads = [random_grad(p.shape, 10 * step + i, zero_frac=0.4) for i, p in enumerate((a, b, plain))]
        for p, grad in zip((a, b, plain), grads):
            p.grad = grad
        before = [quantize(p.detach(), fmt, scale=scale, saturate=True) for p in (a, b)]
        flips, updates = opt.step()
        assert isinstance(flips, int) and isinstance(updates, int)
        assert flips == sum(int((p.detach() != q).sum()) for p, q in zip((a, b), before))
        assert updates == sum(int((g != 0).sum()) for g in grads[:2])
        assert flips > 0


def test_zero_gradient_does_not_move():
    """Off-grid weights are snapped to the nearest grid point; with zero gradients nothing else moves."""
    fmt, scale = get_format("E4M3"), torch.tensor(8.0)
    init = torch.randn(256, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(init.clone())
    opt = GridOptim([{"params": [w], "fmt": fmt, "scale": scale}], lr=2.0)
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        assert opt.step() == (0, 0)
        assert torch.equal(w.detach(), quantize(init, fmt, scale=scale, saturate=True))


# ---- factory, scheduler, checkpoints -----------------------------------------------------------

def test_build_optimizer_assigns_lr_by_format():
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    scale = torch.tensor(2.0)
    groups = [{"params": [params[0]], "fmt": get_format("E4M3"), "scale": scale},
              {"params": [params[1]], "fmt": get_format("bf16"), "scale": None},
              {"params": [params[2]], "fmt": None, "scale": None}]
    for name, cls in [("manifold_adamw", ManifoldAdamW), ("grid", GridOptim)]:
        opt = build_optimizer(name, groups, lr=1e-3, ulp_lr=0.5)
        assert type(opt) is cls
        assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3, 1e-3]
        assert [g["fmt"] for g in opt.param_groups] == [get_format("E4M3"), None, None]
        assert opt.param_groups[0]["scale"] is scale
    adamw = build_optimizer("adamw", groups, lr=1e-3, ulp_lr=0.5)
    assert type(adamw) is torch.optim.AdamW
    assert all(g["lr"] == 1e-3 and "fmt" not in g and "scale" not in g for g in adamw.param_groups)
    assert OPTIMIZERS == ("adamw", "manifold_adamw", "grid")
    with pytest.raises(ValueError, match="sgd.*adamw, manifold_adamw, grid"):
        build_optimizer("sgd", groups, lr=1e-3, ulp_lr=0.5)


@pytest.mark.parametrize("name", ["manifold_adamw", "grid"])
def test_lambda_lr_scales_the_rung_step(name):
    w = torch.nn.Parameter(torch.ones(64) * 3.0)
    opt = build_optimizer(name, [{"params": [w], "fmt": get_format("E4M3"), "scale": None}], lr=1e-3, ulp_lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == 1.0
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    result = opt.step()
    sched.step()
    torch.testing.assert_close(before - w.detach(), ulp(before, "E4M3"), rtol=1e-3, atol=0)  # one rung
    if name == "grid":
        assert result == (64, 64)


@pytest.mark.parametrize("name", ["manifold_adamw", "grid"])
@pytest.mark.parametrize("fmt, scale_value", [("E5M2", 4.0), ("E6M1", 2.0**28)])
def test_resume_from_state_dict_is_bit_identical(name, fmt, scale_value):
    """E6M1 at scale 2**28 puts some of these weights at the grid's top (two rungs a binade), so GridOptim
    widens it before and after the save: the scale lives in the model's checkpoint (here: beside the
    weights), the optimizer's state_dict holds no scale."""
    scale = torch.tensor(scale_value)
    init = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 10

    def make(weights, scale_value):
        scale.fill_(scale_value)  # the layer's buffer, restored with the model
        w, emb = torch.nn.Parameter(weights[0].clone()), torch.nn.Parameter(weights[1].clone())
        groups = [{"params": [w], "fmt": get_format(fmt), "scale": scale},
                  {"params": [emb], "fmt": None, "scale": None}]
        opt = build_optimizer(name, groups, lr=1e-2, ulp_lr=0.6, weight_decay=0.1, seed=7)
        return (w, emb), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    def run(params, opt, sched, steps):
        for step in steps:
            for i, p in enumerate(params):
                p.grad = random_grad(p.shape, 10 * step + i) - 2 * torch.sign(p.detach())  # mostly: grow
            opt.step()
            sched.step()

    params, opt, sched = make((init, init[:4]), scale_value)
    run(params, opt, sched, range(3))
    buffer = io.BytesIO()
    torch.save({"weights": [p.detach() for p in params], "scale": scale.clone(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buffer)
    run(params, opt, sched, range(3, 6))
    final_scale = scale.clone()

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, opt2, sched2 = make(checkpoint["weights"], checkpoint["scale"].item())
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    assert opt2.param_groups[0]["scale"] is scale  # still the live buffer, not a copy from the file
    run(resumed, opt2, sched2, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    assert torch.equal(scale, final_scale)
    if name == "grid" and fmt == "E6M1":
        assert final_scale < checkpoint["scale"] < scale_value  # the grid widened before and after the save
