"""Row and block scaling (``scaling.granularity``) end to end: a QuantLinear rounds every GEMM operand along
that GEMM's reduction dim, and the optimizers, flip tracking, stats, checkpoints and the CLI follow.

Oracles: a direct reference built from ``quantize_blockwise`` on explicitly transposed operands (the
layer takes column-wise copies with transposed tiles instead), torchao's emulated MXFP8 training matmul
(``mx_mm``, the same three GEMMs) where torchao is installed, block scales recomputed in Python from
``math.frexp``, and the sorted grid ``fmt.grid()`` for the optimizers' rungs.
"""

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from altgrad.cli import main
from altgrad.config import ConfigError, parse_cell
from altgrad.diagnostics import FlipTracker
from altgrad.formats import get_format
from altgrad.layers import QuantConfig, QuantLinear
from altgrad.optim import build_optimizer
from altgrad.quantize import encode, quantize
from altgrad.scaling import ScalingConfig, quantize_blockwise
from altgrad.sweep.spec import parse_sweep
from altgrad.trainer import Trainer

TINY = {"model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16}, "batch_size": 2,
        "steps": 4, "eval_every": 2, "eval_iters": 1, "warmup_steps": 1, "format": "E4M3",
        "diagnostics": {"flips_every": 1, "rank_every": 2}}
# (granularity, block, scale_format, scale_rounding): MX, its ceil rounding, fp32 block scales, 2-D tiles
# with partial edges (48 x 40 operands, 48 tokens), and one scale per row.
SCHEMES = [("block", (1, 32), "e8m0", "floor"), ("block", (1, 32), "e8m0", "ceil"), ("block", (1, 16), "fp32", "floor"),
           ("block", (4, 8), "e8m0", "floor"), ("block", (5, 7), "e8m0", "ceil"), ("row", (1, 32), "e8m0", "floor"),
           ("row", (1, 32), "fp32", "floor")]


def scaling(granularity, block=(1, 32), scale_format="e8m0", scale_rounding="floor") -> ScalingConfig:
    return ScalingConfig(granularity=granularity, block=block, scale_format=scale_format,
                         scale_rounding=scale_rounding)


def reference_operand(t, fmt, config, reduction_dim):
    """``t`` rounded along ``reduction_dim`` by transposing it so that the reduction runs along rows."""
    rows = t if reduction_dim == 1 else t.t()
    block = (1, rows.shape[1]) if config.granularity == "row" else config.block
    q = quantize_blockwise(rows, fmt, block=block, scale_format=config.scale_format,
                           scale_rounding=config.scale_rounding)
    return q if reduction_dim == 1 else q.t()


def forward_backward(layer, x, grad):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def seeded(in_features=48, out_features=40, seed=0, tokens=24):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights over 8 binades, so that a block's scale depends on which way it runs
        linear.weight.mul_(torch.exp2(torch.randint(-4, 5, linear.weight.shape, generator=gen)))
    x = torch.randn(2, tokens, in_features, generator=gen) * torch.exp2(torch.randint(-6, 7, (in_features,), generator=gen))
    grad = torch.randn(2, tokens, out_features, generator=gen) * torch.exp2(torch.randint(-9, 3, (out_features,),
                                                                                       generator=gen))
    return linear, x, grad


@pytest.mark.parametrize("granularity, block, scale_format, scale_rounding", SCHEMES)
def test_every_gemm_operand_is_rounded_along_its_own_reduction_dim(granularity, block, scale_format, scale_rounding):
    config = scaling(granularity, block, scale_format, scale_rounding)
    linear, x, grad = seeded()
    layer = QuantLinear.from_linear(copy.deepcopy(linear), QuantConfig("E4M3", grad="E5M2", scaling=config))
    y, dx, dw, db = forward_backward(layer, x, grad)
    w, rows, g = linear.weight.detach(), x.reshape(-1, 48), grad.reshape(-1, 40)
    assert torch.equal(y, F.linear(reference_operand(rows, "E4M3", config, 1), reference_operand(w, "E4M3", config, 1),
                                   linear.bias.detach()).view(2, 24, 40))
    assert torch.equal(dx, (reference_operand(g, "E5M2", config, 1) @ reference_operand(w, "E4M3", config, 0))
                       .view(2, 24, 48))
    assert torch.equal(dw, reference_operand(g, "E5M2", config, 0).t() @ reference_operand(rows, "E4M3", config, 0))
    assert torch.equal(db, grad.sum((0, 1)))  # the unrounded output gradient
    # The row-wise and column-wise copies differ: the two GEMMs really see different roundings.
    assert not torch.equal(reference_operand(w, "E4M3", config, 1), reference_operand(w, "E4M3", config, 0))


@pytest.mark.parametrize("scale_rounding, mode", [("floor", "FLOOR"), ("ceil", "RCEIL")])
def test_mx_layer_is_bitwise_torchao_mxfp8_training_emulation(scale_rounding, mode):
    """torchao's mx_mm: y = x W^T, dX = dY W, dW = dY^T x, each operand cast to MX (32-element blocks
    along the GEMM's K) in emulation; E4M3 input and weight, E5M2 gradient, as here."""
    mxfp8_linear = pytest.importorskip("torchao.prototype.moe_training.mxfp8_linear",
                                       reason="torchao is not installed (pip install torchao): the comparison "
                                              "with its emulated MXFP8 training matmul needs it")
    from torchao.prototype.mx_formats.config import (MXFP8Dim0CastKernelChoice, MXFP8Dim1CastKernelChoice,
                                                     ScaleCalculationMode)
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    linear, x, grad = seeded(64, 96, seed=1, tokens=32)  # torchao's casts need whole blocks
    linear.bias = None
    layer = QuantLinear.from_linear(copy.deepcopy(linear), QuantConfig(
        "E4M3", grad="E5M2", scaling=scaling("block", scale_rounding=scale_rounding)))
    x_ours = x.clone().requires_grad_()
    y_ours = layer(x_ours)
    y_ours.backward(grad)
    x_ref, w_ref = x.clone().requires_grad_(), linear.weight.detach().clone().requires_grad_()
    y_ref = mxfp8_linear.mx_mm.apply(x_ref, w_ref, torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2, 32,
                                     KernelPreference.EMULATED, MXFP8Dim0CastKernelChoice.TORCH,
                                     MXFP8Dim1CastKernelChoice.TORCH, getattr(ScaleCalculationMode, mode), False)
    y_ref.backward(grad)
    assert torch.equal(y_ours, y_ref)
    assert torch.equal(x_ours.grad, x_ref.grad)
    assert torch.equal(layer.weight.grad, w_ref.grad)


def test_per_tensor_layers_keep_their_state_and_path():
    """The default granularity adds no checkpointed state and rounds each operand once, per tensor."""
    linear, x, grad = seeded()
    layer = QuantLinear.from_linear(copy.deepcopy(linear), QuantConfig("E4M3", scaling=ScalingConfig(recipe="current")))
    assert not layer.blocked and layer.weight_scale.dim() == 0
    assert set(layer.state_dict()) == {"weight", "bias"} | {f"scalers.{p}.{b}" for p in ("weight", "input", "grad")
                                                            for b in ("amax_history", "scale", "observed")}
    y = layer(x)
    w = linear.weight.detach()
    w_scale, x_scale = 448 / w.abs().max(), 448 / x.abs().max()
    expected = F.linear(quantize(x, "E4M3", scale=x_scale, saturate=True), quantize(w, "E4M3", scale=w_scale,
                                                                                     saturate=True), linear.bias)
    assert torch.allclose(y, expected, rtol=0, atol=1e-6)
    assert math.isnan(layer.pop_stats()["input"]["scale_spread"])


def floor_block_scales(t: torch.Tensor, fmt, block: int) -> torch.Tensor:
    """Each (1, block) block's e8m0 floor scale 1 / X, X = 2**(floor(log2 amax) - floor(log2 max)), per element."""
    max_binade = math.frexp(get_format(fmt).max_value)[1] - 1
    amax = t.reshape(t.shape[0], -1, block).abs().amax(-1).tolist()
    scales = [[2.0 ** -(math.frexp(a)[1] - 1 - max_binade) for a in row] for row in amax]
    return torch.tensor(scales).repeat_interleave(block, dim=1)


def test_stats_and_weight_scales_follow_every_block():
    linear, x, grad = seeded(64, 32)
    layer = QuantLinear.from_linear(copy.deepcopy(linear), QuantConfig("E4M3", grad="E5M2", scaling=scaling("block")))
    forward_backward(layer, x, grad)
    w = linear.weight.detach()
    row_wise, column_wise = floor_block_scales(w, "E4M3", 32), floor_block_scales(w.t().contiguous(), "E4M3", 32).t()
    assert torch.equal(layer.weight_scale, row_wise)  # the forward copy's scale of every element
    stats = layer.pop_stats()["weight"]
    both = torch.cat([row_wise.flatten(), column_wise.flatten()])
    overflow = ((w.abs() * row_wise > 448).sum() + (w.abs() * column_wise > 448).sum()).item()
    assert stats["numel"] == 2 * w.numel() and stats["overflow_frac"] == overflow / (2 * w.numel())
    assert stats["amax"] == w.abs().max().item()
    assert stats["scale"] == column_wise.min().item()  # the last call's (the column-wise copy's) smallest
    assert stats["scale_spread"] == math.log2(both.max() / both.min())
    assert stats["scale_spread"] > 0 and layer.pop_stats()["weight"]["numel"] == 0  # popping resets


@pytest.mark.parametrize("fmt", ["E4M3", "E2M5", "E5M2"])
def test_manifold_adamw_moves_each_weight_one_rung_of_its_own_blocks_grid(fmt):
    """Two blocks per row, 2**12 apart in magnitude: lr 1 moves every weight to its grid neighbour at its
    own block's scale (the oracle: the sorted grid)."""
    gen = torch.Generator().manual_seed(5)
    magnitude = torch.exp2(torch.tensor([-9.0] * 32 + [3.0] * 32))
    weight = (torch.rand(8, 64, generator=gen) + 0.5) * magnitude * (torch.randint(0, 2, (8, 64), generator=gen) * 2 - 1)
    layer = QuantLinear(64, 8, bias=False, config=QuantConfig(fmt, scaling=scaling("block")))
    with torch.no_grad():
        layer.weight.copy_(quantize_blockwise(weight, fmt, block=(32,), scale_format="e8m0"))  # on the grid
    layer(torch.randn(4, 64)).sum().backward()  # sets weight_scale
    scale = layer.weight_scale.clone()
    assert scale[:, 0].ne(scale[:, -1]).all()
    start = layer.weight.detach() * scale
    grid = get_format(fmt).grid()
    index = torch.searchsorted(grid, start)
    assert torch.equal(grid[index], start)
    layer.weight.grad = -torch.sign(start)  # every weight asks to grow one rung
    build_optimizer("manifold_adamw", [{"params": [layer.weight], "fmt": get_format(fmt), "scale": layer.weight_scale}],
                    lr=1e-3, ulp_lr=1.0, betas=(0.0, 0.0)).step()
    outward = torch.where(start > 0, index + 1, index - 1)
    assert torch.equal(layer.weight.detach(), grid[outward] / scale)


@pytest.mark.parametrize("scale_rounding", ["floor", "ceil"])
@pytest.mark.parametrize("fmt", ["E4M3", "E2M5", "E5M2", "E0M7", "E7M0"])
def test_grid_optim_keeps_every_weight_on_the_forward_grid_as_block_scales_move(fmt, scale_rounding):
    """Regression toward a target whose blocks are 2**6 larger and smaller than the start: block amaxes
    cross binades both ways, so scales move, and after every step the forward rounds each master weight
    to itself."""
    gen = torch.Generator().manual_seed(7)
    layer = QuantLinear(64, 16, bias=False, config=QuantConfig(fmt, scaling=scaling("block", scale_rounding=scale_rounding)))
    target = torch.randn(16, 64, generator=gen) * torch.exp2(torch.tensor([6.0] * 32 + [-6.0] * 32)) * 0.05
    optimizer = build_optimizer("grid", [{"params": [layer.weight], "fmt": get_format(fmt), "scale": layer.weight_scale,
                                          "scale_of": layer.block_weight_scale}], lr=1e-3, ulp_lr=4.0)
    x = torch.randn(32, 64, generator=gen)
    scales_seen = set()
    for _ in range(40):
        loss = (layer(x) - x @ target.t()).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(layer.quantized_weight(), layer.weight.detach())
        assert torch.equal(layer.block_weight_scale(layer.weight.detach()), layer.weight_scale)  # what it wrote
        scales_seen.update(layer.weight_scale.unique().tolist())
    assert len(scales_seen) > 3  # the block scales moved


@pytest.mark.parametrize("moved", ["scale", "weights"])
def test_flips_are_counted_at_each_blocks_fixed_scale(moved):
    gen = torch.Generator().manual_seed(3)
    weight = nn.Parameter(torch.randn(16, 64, generator=gen) * torch.exp2(torch.tensor([-8.0] * 32 + [2.0] * 32)))
    scale = floor_block_scales(weight.detach(), "E4M3", 32)  # moved in place, as weight_scales is
    old_scale = scale.clone()
    tracker = FlipTracker()
    tracker.track("w", weight, "E4M3", scale)
    weight.grad = torch.ones_like(weight)
    tracker.measure()
    before = weight.detach().clone()
    with torch.no_grad():
        if moved == "weights":
            weight.mul_(1 + 0.05 * torch.randn(weight.shape, generator=gen))
        else:
            scale[:4, :32] *= 2  # four blocks' scales move
    flips, updates, recoded = tracker.measure()["w"]

    def codes(w, s):
        return encode(w * s, "E4M3", saturate=True, signed_zero=False)

    assert flips == (codes(weight.detach(), old_scale) != codes(before, old_scale)).sum().item()
    assert recoded == (codes(weight.detach(), scale) != codes(weight.detach(), old_scale)).sum().item()
    assert updates == weight.numel()
    assert (flips > 0) == (moved == "weights") and (recoded > 0) == (moved == "scale")
    if moved == "scale":
        assert 0 < recoded <= 4 * 32  # only the moved blocks re-code


def _cell(tmp_path, **keys):
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump({**TINY, **keys}))
    return path


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_altgrad_train_per_granularity_writes_its_tables(tmp_path, granularity):
    cell = _cell(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(cell), "--out", str(out), "--set", f"scaling.granularity={granularity}"]) == 0
    steps = pd.read_parquet(out / "cell" / "steps")
    layers = pd.read_parquet(out / "cell" / "layers")
    trials = pd.read_parquet(out / "cell" / "trials")
    assert len(steps) == 4 and trials["status"].tolist() == ["completed"]
    assert '"granularity": "%s"' % granularity in trials["config"].iloc[0]
    for point in ("weight", "input", "grad"):
        assert steps[f"amax_{point}"].gt(0).all()
        spread = steps[f"scale_spread_{point}"]
        assert spread.isna().all() if granularity == "tensor" else spread.ge(0).all()
    assert steps["flips"].iloc[1:].gt(0).all() and layers["weight_scale"].gt(0).all()
    if granularity != "tensor":
        assert steps["scale_spread_input"].gt(0).all()  # the input's blocks span binades


class _Crash(Exception):
    pass


def _crash_at_step_3(metrics, checkpoint):
    if metrics["step"] == 3:  # its checkpoint is on disk
        raise _Crash


def test_grid_cells_under_block_scales_stay_on_the_grid_and_resume_bit_identically(tmp_path):
    cell = parse_cell({**TINY, "optimizer": "grid", "ulp_lr": 2.0, "steps": 6, "eval_every": 3,
                       "scaling": {"granularity": "block", "block": [16], "scale_rounding": "ceil"}})

    def trainer(root):
        return Trainer(cell, trial_id="t", results_root=str(root), checkpoint_path=root / "t.pt", progress=False)

    straight = trainer(tmp_path / "a")
    straight.run()
    for name, layer in straight.layers.items():
        assert torch.equal(layer.quantized_weight(), layer.weight.detach()), name
    with pytest.raises(_Crash):
        trainer(tmp_path / "b").run(report=_crash_at_step_3)
    resumed = trainer(tmp_path / "b")
    resumed.run(resume=True)
    for table in ("steps", "layers"):
        a = pd.read_parquet(tmp_path / "a" / table).drop(columns="tokens_per_s", errors="ignore")
        b = pd.read_parquet(tmp_path / "b" / table).drop(columns="tokens_per_s", errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    for (name, a), b in zip(straight.layers.items(), resumed.layers.values()):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale), name


def test_granularity_is_a_sweep_axis():
    spec = parse_sweep({"name": "g", "trial": TINY, "matrix": {"scaling.granularity": ["tensor", "row", "block"]}})
    assert [c.config.scaling.granularity for c in spec.cells] == ["tensor", "row", "block"]


@pytest.mark.parametrize("keys, expected", [
    ({"scaling": {"granularity": "block", "block": [0]}}, "block=[0]"),
    ({"scaling": {"granularity": "block", "block": [3, 5, 7]}}, "block=[3, 5, 7]"),
    ({"scaling": {"granularity": "blok"}}, "granularity='blok'"),
    ({"scaling": {"granularity": "block", "scale_format": "e5m2"}}, "scale_format='e5m2'"),
    ({"scaling": {"scale_rounding": "up"}}, "scale_rounding='up'"),
    ({"scaling": {"granularity": "row", "recipe": "none"}}, "recipe='none'"),
    ({"scaling": {"granularity": "block", "margin": 1}}, "margin=1"),
    ({"optimizer": "grid", "scaling": {"granularity": "block", "scale_format": "fp32"}}, "scaling.scale_format"),
])
def test_bad_scaling_is_one_line_and_exit_2(tmp_path, capsys, keys, expected):
    cell = _cell(tmp_path, **keys)
    out = tmp_path / "out"
    assert main(["train", str(cell), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(cell) in err and "scaling" in err and expected in err, err
    assert not out.exists()


def test_bad_granularity_from_the_command_line(tmp_path, capsys):
    cell = _cell(tmp_path)
    assert main(["train", str(cell), "--out", str(tmp_path / "out"), "--set", "scaling.granularity=blok"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "granularity='blok'" in err, err
    with pytest.raises(ConfigError, match="block=32"):
        parse_cell({**TINY, "scaling": {"granularity": "block", "block": 32}})
