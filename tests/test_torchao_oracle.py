"""QuantLinear against torchao's emulated Float8Linear, an independent implementation of the same recipe:
tensor-wise dynamic ("current") scaling, E4M3 input and weight, E5M2 output gradient, saturating casts and
a float32 matmul (``Float8LinearConfig(emulate=True)`` dequantizes the float8 operands and calls torch.mm).

Bit for bit: the output, the input, weight and bias gradients. Where they part, by design:

* the bias: torchao adds it after the matmul; QuantLinear leaves it inside F.linear's fused addmm, as
  nn.Linear and the fp32 baseline do. Once K passes the CPU BLAS's k-block (K >= 256 here) addmm starts
  the accumulator at the bias, so ~30-57% of outputs differ in float32 summation order (under one eps of
  |x||w| + |b|). Both are the same rounded operands' product plus the bias, asserted exactly below;
* an amax below 1e-12 (torchao clamps it to 1e-12) or a zero or non-finite one (QuantLinear keeps its
  previous scale, as Transformer Engine does): not exercised here.

torchao is optional: ``pip install torchao`` (it declares no dependencies, so it brings no other torch).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

float8 = pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install torchao): "
                                                      "the comparison with its emulated Float8Linear needs it")

from altgrad.layers import QuantConfig, QuantLinear  # noqa: E402
from altgrad.quantize import quantize  # noqa: E402
from altgrad.scaling import ScalingConfig  # noqa: E402

TORCHAO_DYNAMIC = QuantConfig(weight="E4M3", activation="E4M3", grad="E5M2", scaling=ScalingConfig(recipe="current"))


def both_layers(in_features: int, out_features: int, bias: bool, seed: int):
    """torchao's Float8Linear and a QuantLinear on copies of one seeded nn.Linear."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    emulated = float8.convert_to_float8_training(nn.Sequential(copy.deepcopy(linear)),
                                                 config=float8.Float8LinearConfig(emulate=True))[0]
    assert type(emulated).__name__ == "Float8Linear"
    return emulated, QuantLinear.from_linear(copy.deepcopy(linear), TORCHAO_DYNAMIC)


def forward_backward(layer, x, grad):
    """Output, input gradient, weight gradient, bias gradient (None without a bias)."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def seeded_batch(in_features: int, out_features: int, seed: int):
    """Input and output gradient with seeded magnitudes, so that every pass gets scales of its own."""
    gen = torch.Generator().manual_seed(1000 + seed)
    magnitude = 2.0 ** torch.randint(-8, 9, (2,), generator=gen).float()
    x = torch.randn(2, 32, in_features, generator=gen) * magnitude[0]
    return x, torch.randn(2, 32, out_features, generator=gen) * magnitude[1]


@pytest.mark.parametrize("in_features, out_features", [(64, 32), (768, 256)])
@pytest.mark.parametrize("seed", range(6))
def test_without_bias_every_tensor_is_bitwise_torchao(in_features, out_features, seed):
    emulated, ours = both_layers(in_features, out_features, bias=False, seed=seed)
    x, grad = seeded_batch(in_features, out_features, seed)
    expected, got = forward_backward(emulated, x, grad), forward_backward(ours, x, grad)
    for name, a, b in zip(("output", "input grad", "weight grad"), expected[:3], got[:3]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("in_features, out_features", [(64, 32), (768, 256)])
@pytest.mark.parametrize("seed", range(6))
def test_with_bias_the_gradients_are_bitwise_and_the_output_differs_only_in_where_the_bias_enters(
        in_features, out_features, seed):
    emulated, ours = both_layers(in_features, out_features, bias=True, seed=seed)
    x, grad = seeded_batch(in_features, out_features, seed)
    (y_ref, *grads_ref), (y, *grads) = forward_backward(emulated, x, grad), forward_backward(ours, x, grad)
    for name, a, b in zip(("input grad", "weight grad", "bias grad"), grads_ref, grads):
        assert torch.equal(a, b), name
    assert torch.equal(grads[2], grad.sum((0, 1)))  # the unrounded output gradient
    scalers = ours.scalers
    x_q = quantize(x, "E4M3", scale=scalers["input"].last_scale, saturate=True)
    w_q = quantize(ours.weight.detach(), "E4M3", scale=scalers["weight"].last_scale, saturate=True)
    assert torch.equal(y_ref, F.linear(x_q, w_q) + ours.bias.detach())
    assert torch.equal(y, F.linear(x_q, w_q, ours.bias.detach()))
