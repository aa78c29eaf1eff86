"""What-if quantization errors against direct per-row / per-block references and ml_dtypes, and the probe that
writes them at rank checks."""

import math

import ml_dtypes
import numpy as np
import pandas as pd
import pytest
import torch

from altgrad import whatif
from altgrad.config import parse_cell
from altgrad.formats import get_format
from altgrad.probes import _measured
from altgrad.quantize import quantize
from altgrad.results import read_rows
from altgrad.trainer import Trainer

TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 64, "block_size": 16}, "batch_size": 4,
        "eval_every": 5, "eval_iters": 1, "warmup_steps": 2}
SPLITS = ("E4M3", "E5M2", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0")


def _many_binades(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows, each scaled by its own power of two in 2**-30 .. 2**30, with a few exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    x = x * torch.exp2(torch.randint(-30, 31, (rows, 1), generator=generator).float())
    return torch.where(torch.rand(rows, cols, generator=generator) < 0.02, 0.0, x)


def _floor_log2(value: float) -> int:
    return math.frexp(value)[1] - 1  # value = m * 2**e, m in [0.5, 1): floor(log2(value)) = e - 1, exactly


def _per_row_reference(x: torch.Tensor, fmt) -> torch.Tensor:
    """Each row through plain ``quantize`` with its own scale max / amax, rounded once to float32."""
    out = torch.zeros_like(x)
    for i, row in enumerate(x):
        amax = float(row.abs().max())
        scale = float(np.float32(fmt.max_value / amax)) if amax else 1.0
        out[i] = quantize(row, fmt, scale=scale, saturate=True)
    return out


def _per_block_reference(x: torch.Tensor, fmt, block: int = 32) -> torch.Tensor:
    """Each run of ``block`` elements of a row through ``quantize`` with scale 2**-k, k = floor(log2 amax) -
    floor(log2 max) (OCP MX v1.0)."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], block):
            piece = x[i, j:j + block]
            amax = float(piece.abs().max())
            k = _floor_log2(amax) - _floor_log2(fmt.max_value) if amax else 0
            out[i, j:j + block] = quantize(piece, fmt, scale=2.0 ** -max(-127, min(127, k)), saturate=True)
    return out


def _errors(x: torch.Tensor, quantized: torch.Tensor) -> tuple[float, float]:
    """(relative MSE, flushed share) computed in numpy float64."""
    a, q = x.double().numpy(), quantized.double().numpy()
    nonzero = a != 0
    return float(((q - a) ** 2).sum() / (a ** 2).sum()), float((nonzero & (q == 0)).sum() / nonzero.sum())


@pytest.mark.parametrize("spec", SPLITS)
def test_row_and_mx_match_direct_references_on_rows_spanning_many_binades(spec):
    fmt = get_format(spec)
    x = _many_binades(24, 80, seed=SPLITS.index(spec))  # 80 columns: a partial MX block per row
    references = {"row": _per_row_reference(x, fmt), "mx": _per_block_reference(x, fmt)}
    measured = whatif.quantization_errors(x, fmt).tolist()
    for recipe, reference in references.items():
        assert torch.equal(whatif.quantize_as(x, fmt, recipe), reference), recipe
        rel_mse, flushed = _errors(x, reference)
        position = whatif.RECIPES.index(recipe)
        assert measured[position] == pytest.approx(rel_mse, rel=1e-12)
        assert measured[len(whatif.RECIPES) + position] == pytest.approx(flushed, abs=1e-15)
    assert measured[-1] == 1.0
    if fmt.binades < 60:  # rows 2**60 apart: one scale for all loses the small rows, their own scales keep them
        assert measured[3] > measured[4]


def test_e4m3_per_tensor_is_the_ml_dtypes_cast_of_the_scaled_tensor():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 0.02
    scale = np.float32(448.0 / float(x.abs().max()))
    expected = ((x.numpy() * scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / scale)
    quantized = whatif.quantize_as(x, get_format("E4M3"), "tensor")
    np.testing.assert_array_equal(quantized.numpy(), expected)
    measured = whatif.quantization_errors(x, get_format("E4M3")).tolist()
    rel_mse, flushed = _errors(x, torch.from_numpy(expected))
    assert measured[0] == pytest.approx(rel_mse, rel=1e-12) and measured[3] == flushed


@pytest.mark.parametrize("spec", ["E4M3", "E5M2", "E3M4"])
def test_one_huge_outlier_costs_per_tensor_scaling_more_than_mx(spec):
    fmt = get_format(spec)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(7))
    x[5, 17] = 8 * fmt.max_value / fmt.min_subnormal  # its scale puts |x| < 4 below half the smallest subnormal
    measured = whatif.quantization_errors(x, fmt).tolist()
    errors, flushed = dict(zip(whatif.RECIPES, measured[:3])), dict(zip(whatif.RECIPES, measured[3:6]))
    assert errors["mx"] < errors["tensor"] and errors["row"] < errors["tensor"]
    assert flushed["tensor"] > 0.5 > flushed["mx"]  # one scale for all: most values sink below the grid


def test_an_all_zero_tensor_is_not_measured_not_nan():
    values = whatif.quantization_errors(torch.zeros(4, 64), get_format("E4M3"))
    assert values[-1] == 1.0 and _measured(values[:-1], values[-1] == 1) == [None] * 6
    nonfinite = whatif.quantization_errors(torch.tensor([[1.0, float("inf")]]), get_format("E5M2"))
    assert nonfinite[-1] == 0.0 and any(v != v for v in _measured(nonfinite[:-1], nonfinite[-1] == 1))


def test_the_probe_writes_the_columns_at_rank_checks_only_and_nulls_for_fp32_layers(tmp_path, monkeypatch):
    cell = parse_cell({**TINY, "steps": 10, "format": "E4M3", "layers": "no_head",
                       "diagnostics": {"flips_every": 1, "rank_every": 5}})
    trainer = Trainer(cell, trial_id="t", results_root=str(tmp_path / "res"), progress=False)
    name, layer = "transformer.h.0.mlp.c_fc", trainer.layers["transformer.h.0.mlp.c_fc"]
    inputs = {}
    layer.register_forward_pre_hook(  # training forwards only: an evaluation follows the check
        lambda m, args: inputs.__setitem__(trainer.step + 1, args[0].detach().clone()) if m.training else None)
    measured_tensors = []
    original = whatif.quantization_errors
    monkeypatch.setattr(whatif, "quantization_errors", lambda x, fmt: measured_tensors.append(x.shape) or original(x, fmt))
    trainer.run()
    eight_bit = [n for n, fmt in trainer.layers.items() if not fmt.weight_format.is_native]
    assert "lm_head" not in eight_bit and len(eight_bit) == 4
    assert len(measured_tensors) == 2 * 2 * len(eight_bit)  # two checks, a weight and an input each
    layers = pd.DataFrame(read_rows(str(tmp_path / "res"), "layers", "t"))
    columns = whatif.column_names("weight") + whatif.column_names("input")
    assert sorted(layers["step"].unique()) == [5, 10]
    assert layers.loc[layers["layer"] == "lm_head", columns].isna().all().all()
    assert layers.loc[layers["layer"] != "lm_head", columns].notna().all().all()
    row = layers[(layers["layer"] == name) & (layers["step"] == 10)].iloc[0]
    x = inputs[10]  # the check step's input, per-tensor E4M3 by ml_dtypes
    scale = np.float32(448.0 / float(x.abs().max()))
    cast = (x.numpy() * scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / scale
    rel_mse, flushed = _errors(x, torch.from_numpy(cast))
    assert row["whatif_input_rel_mse_tensor"] == pytest.approx(rel_mse, rel=1e-9)
    assert row["whatif_input_flushed_tensor"] == pytest.approx(flushed, abs=1e-12)
    rel_mse, flushed = _errors(layer.weight.detach(), _per_row_reference(layer.weight.detach(), layer.weight_format))
    assert row["whatif_weight_rel_mse_row"] == pytest.approx(rel_mse, rel=1e-9)
    assert row["whatif_weight_flushed_row"] == pytest.approx(flushed, abs=1e-12)
    assert all(0 < row[f"whatif_weight_rel_mse_{recipe}"] < 0.01 for recipe in whatif.RECIPES)  # E4M3: ~1e-3
    assert len(layer._forward_pre_hooks) == 1  # the test's own: the probes' hooks are gone
