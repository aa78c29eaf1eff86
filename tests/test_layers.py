import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import altgrad.quantize as quantize_module
from altgrad.formats import get_format
from altgrad.layers import LAYER_POLICIES, QuantConfig, QuantLinear, apply_policy
from altgrad.model import GPT, GPTConfig
from altgrad.quantize import quantize
from altgrad.scaling import ScalingConfig, scale_from_amax

UNSCALED = ScalingConfig(recipe="none")
SMALL = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
ATTENTION = [f"transformer.h.{i}.attn.{name}" for i in range(2) for name in ("c_attn", "c_proj")]
MLP = [f"transformer.h.{i}.mlp.{name}" for i in range(2) for name in ("c_fc", "c_proj")]


def quant_linear(config: QuantConfig, seed: int = 0, in_features: int = 16, out_features: int = 8) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), config)


def q(x, fmt, **kwargs):
    return quantize(x, fmt, saturate=True, **kwargs)


def test_config_defaults_follow_the_hybrid_recipe():
    e4m3 = QuantConfig("E4M3")
    assert (e4m3.weight.name, e4m3.activation.name, e4m3.grad.name) == ("E4M3", "E4M3", "E5M2")
    assert QuantConfig("bf16").grad.name == "bf16"
    assert QuantConfig("fp32").grad is None
    assert QuantConfig("E3M4", activation="E5M2", grad=None).grad is None
    with pytest.raises(ValueError, match="E9M9"):
        QuantConfig("E9M9")


def test_from_linear_takes_the_documented_keywords():
    """The research API: every point's format and the scaling recipe, on the linear's own parameters."""
    linear = nn.Linear(16, 8)
    scaling = ScalingConfig(recipe="current", margin=1)
    layer = QuantLinear.from_linear(linear, QuantConfig(weight="E3M4", activation="E5M2", grad="E4M3", scaling=scaling))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert [(p, s.fmt.name, s.config) for p, s in layer.scalers.items()] == [
        ("weight", "E3M4", scaling), ("input", "E5M2", scaling), ("grad", "E4M3", scaling)]
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(12))
    x_q = q(x, "E5M2", scale=scale_from_amax(x.abs().max(), "E5M2", margin=1))
    w_q = q(linear.weight.detach(), "E3M4", scale=scale_from_amax(linear.weight.abs().max(), "E3M4", margin=1))
    assert torch.equal(layer(x), F.linear(x_q, w_q, linear.bias))


def test_fp32_is_bitwise_nn_linear_forward_and_backward():
    torch.manual_seed(0)
    reference = nn.Linear(16, 8)
    layer = QuantLinear.from_linear(copy.deepcopy(reference), QuantConfig("fp32"))
    x = torch.randn(4, 16) * 100
    x_ref, x_q = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 8)
    y_ref, y_q = reference(x_ref), layer(x_q)
    y_ref.backward(grad)
    y_q.backward(grad)
    assert torch.equal(y_ref, y_q)
    assert torch.equal(x_ref.grad, x_q.grad)
    assert torch.equal(reference.weight.grad, layer.weight.grad)
    assert torch.equal(reference.bias.grad, layer.bias.grad)


def test_e4m3_forward_is_quantized_input_and_weight_through_f_linear():
    layer = quant_linear(QuantConfig("E4M3", scaling=UNSCALED))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    expected = F.linear(q(x, "E4M3"), q(layer.weight, "E4M3"), layer.bias)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_output_gradient_is_quantized_in_backward():
    layer = quant_linear(QuantConfig("E4M3", scaling=UNSCALED))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, generator=gen).requires_grad_()
    grad = torch.randn(4, 8, generator=gen)
    layer(x).backward(grad)
    grad_q, w_q = q(grad, "E5M2"), q(layer.weight.detach(), "E4M3")
    torch.testing.assert_close(x.grad, grad_q @ w_q, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, grad_q.T @ q(x.detach(), "E4M3"), rtol=0, atol=0)
    assert not torch.allclose(x.grad, grad @ w_q)  # the unrounded gradient gives something else


@pytest.mark.parametrize("spec", ["E4M3", "bf16"])
def test_bias_gradient_sums_the_unrounded_output_gradient(spec):
    """As in Transformer Engine and torchao only the GEMM operands are rounded: the bias gradient is
    nn.Linear's (dY summed over all but the last dim), while the weight gradient comes from rounded dY."""
    torch.manual_seed(0)
    reference = nn.Linear(16, 8)
    layer = QuantLinear.from_linear(copy.deepcopy(reference), QuantConfig(spec))
    gen = torch.Generator().manual_seed(10)
    x, grad = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 8, generator=gen) * 1e-3
    reference(x).backward(grad)
    layer(x).backward(grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)
    assert torch.equal(layer.bias.grad, grad.sum((0, 1)))
    grad_q = q(grad, layer.config.grad, scale=layer.scalers["grad"].last_scale)
    assert not torch.equal(grad_q.sum((0, 1)), grad.sum((0, 1)))  # rounding dY would have shown
    weight_q = q(layer.weight.detach(), spec, scale=layer.scalers["weight"].last_scale).requires_grad_()
    F.linear(q(x, spec, scale=layer.scalers["input"].last_scale), weight_q).backward(grad_q)
    assert torch.equal(layer.weight.grad, weight_q.grad)


def test_a_layer_without_bias_rounds_its_output_gradient():
    layer = QuantLinear.from_linear(nn.Linear(16, 8, bias=False), QuantConfig("E4M3", scaling=UNSCALED))
    gen = torch.Generator().manual_seed(11)
    x, grad = torch.randn(4, 16, generator=gen).requires_grad_(), torch.randn(4, 8, generator=gen)
    layer(x).backward(grad)
    assert layer.bias is None
    assert torch.equal(x.grad, q(grad, "E5M2") @ q(layer.weight.detach(), "E4M3"))


@pytest.mark.parametrize("recipe", ["delayed", "current", "none"])
def test_reported_scales_are_the_ones_the_forward_used(recipe):
    layer = quant_linear(QuantConfig("E4M3", scaling=ScalingConfig(recipe=recipe, history_len=2)))
    gen = torch.Generator().manual_seed(3)
    for magnitude in (1.0, 30.0, 0.01, 5.0):
        x = torch.randn(4, 16, generator=gen) * magnitude
        y = layer(x)
        stats = layer.pop_stats()
        scale_in, scale_w = (torch.tensor(stats[p]["scale"]) for p in ("input", "weight"))
        assert torch.equal(y, F.linear(q(x, "E4M3", scale=scale_in), q(layer.weight, "E4M3", scale=scale_w), layer.bias))
        assert stats["input"]["amax"] == pytest.approx(x.abs().max().item())


def test_stats_count_overflow_underflow_and_nan():
    layer = quant_linear(QuantConfig("E4M3", scaling=UNSCALED))
    x = torch.ones(4, 16)
    x[0, :3] = 1000.0  # E4M3's max is 448
    x[1, :5] = 1e-6  # below half its smallest subnormal, 2**-9
    x[2, 0] = math.nan
    layer(x).sum().backward()
    stats = layer.pop_stats()
    assert set(stats) == {"weight", "input", "grad"}
    assert stats["input"]["overflow_frac"] == 3 / 64
    assert stats["input"]["underflow_frac"] == 5 / 64
    assert stats["input"]["nan_count"] == 1
    assert math.isnan(stats["input"]["amax"])  # amax of a tensor holding NaN
    assert stats["weight"]["overflow_frac"] == 0 and stats["weight"]["scale"] == 1
    assert stats["grad"]["overflow_frac"] == 0 and stats["grad"]["amax"] == 1  # d(sum)/dy is all ones
    after = layer.pop_stats()  # popping resets: nothing counted since
    assert all(math.isnan(v) for point in after.values() for k, v in point.items() if k != "numel")
    assert all(point["numel"] == 0 for point in after.values())


def test_delayed_scaling_overflows_when_the_range_jumps():
    layer = quant_linear(QuantConfig("E4M3"))
    layer(torch.linspace(-1, 1, 64).reshape(4, 16))  # first call: scale = 448 / 1
    layer.pop_stats()
    layer(torch.linspace(-4, 4, 64).reshape(4, 16))  # judged by the old scale: |x| > 1 overflows
    stats = layer.pop_stats()["input"]
    assert stats["scale"] == 448.0
    assert stats["overflow_frac"] == pytest.approx(48 / 64)


def test_eval_and_quantized_weight_change_nothing():
    layer = quant_linear(QuantConfig("E4M3"))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    layer(x)
    layer.pop_stats()
    state = copy.deepcopy(layer.state_dict())
    expected = q(layer.weight.detach(), "E4M3", scale=layer.weight_scale)
    assert torch.equal(layer.quantized_weight(), expected)
    layer.eval()
    with torch.no_grad():
        y = layer(3 * x)
    assert torch.equal(y, F.linear(q(3 * x, "E4M3", scale=layer.scalers["input"].scale), expected, layer.bias))
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    assert all(math.isnan(point["overflow_frac"]) for point in layer.pop_stats().values())


def test_weight_scale_is_the_live_buffer():
    layer = quant_linear(QuantConfig("E4M3"))
    scale = layer.weight_scale
    layer(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)))
    assert layer.weight_scale is scale
    assert scale.item() == pytest.approx(448 / layer.weight.abs().max().item())
    assert layer.weight_format is get_format("E4M3")


def test_stats_can_be_switched_off_without_changing_numbers():
    on, off = quant_linear(QuantConfig("E5M2")), quant_linear(QuantConfig("E5M2"))
    off.stats_enabled = False
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    for _ in range(2):
        assert torch.equal(on(x), off(x))
    assert math.isnan(off.pop_stats()["input"]["overflow_frac"])


def test_bf16_casts_weights_activations_and_gradients():
    layer = quant_linear(QuantConfig("bf16"))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 16, generator=gen).requires_grad_()
    grad = torch.randn(4, 8, generator=gen)
    w_bf16 = layer.weight.detach().bfloat16().float()
    y = layer(x)
    assert torch.equal(y, F.linear(x.detach().bfloat16().float(), w_bf16, layer.bias))
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad.bfloat16().float() @ w_bf16, rtol=0, atol=0)


def quantized_names(formats: dict, fmt: str = "E5M2") -> list[str]:
    return [name for name, f in formats.items() if f.name == fmt]


@pytest.mark.parametrize("policy, expected", [
    ("all", ATTENTION[:2] + MLP[:2] + ATTENTION[2:] + MLP[2:] + ["lm_head"]),
    ("attention", ATTENTION),
    ("mlp", MLP),
    ("no_head", ATTENTION[:2] + MLP[:2] + ATTENTION[2:] + MLP[2:]),
])
def test_named_policies_pick_their_layers(policy, expected):
    torch.manual_seed(0)
    model = GPT(SMALL)
    formats = apply_policy(model, "E5M2", policy)
    assert sorted(quantized_names(formats)) == sorted(expected)
    assert len(formats) == 9 and all(f.name in ("E5M2", "fp32") for f in formats.values())
    for name, fmt in formats.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.weight_format == fmt
        assert (layer.config.grad is None) == (fmt.name == "fp32")
    assert set(LAYER_POLICIES) == {"all", "attention", "mlp", "no_head"}


def test_mixed_policy_first_match_wins_and_grads_follow_the_format():
    torch.manual_seed(0)
    model = GPT(SMALL)
    formats = apply_policy(model, "E5M2", {"lm_head": "bf16", "*.mlp.*": "E3M4", "*.h.1.*": "E2M5"},
                           grad_format="E4M3")
    assert formats["lm_head"].name == "bf16" and model.lm_head.config.grad.name == "bf16"
    assert quantized_names(formats, "E3M4") == MLP
    assert quantized_names(formats, "E2M5") == ATTENTION[2:]
    assert quantized_names(formats, "fp32") == ATTENTION[:2]
    assert model.transformer.h[0].mlp.c_fc.config.grad.name == "E4M3"


def test_apply_policy_keeps_parameters_and_tied_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL.__dict__, "tie_weights": True}))
    before = [id(p) for p in model.parameters()]
    apply_policy(model, "E4M3", "all")
    assert [id(p) for p in model.parameters()] == before
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(8))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layers, message", [
    ("heads", r"'heads'.*all, attention, mlp, no_head"),
    (["all"], r"\['all'\].*known"),
    ({"*.mlp.c_fc": "E4M3", "*.attn.c_q": "E4M3"}, r"'\*\.attn\.c_q' matches no.*transformer\.h\.0\.attn\.c_attn"),
    ({"*": "E4M3", "lm_head": "bf16"}, r"'lm_head' matches no"),
    ({"lm_head": "E9M9"}, r"'lm_head'.*'E9M9'.*known"),
])
def test_bad_policies_raise_naming_the_culprit(layers, message):
    with pytest.raises(ValueError, match=message):
        apply_policy(GPT(SMALL), "E4M3", layers)


def test_gpt_trains_in_e5m2_without_nan():
    torch.manual_seed(0)
    model = GPT(SMALL)
    apply_policy(model, "E5M2", "all")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(32, (4, 17), generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    stats = model.lm_head.pop_stats()
    assert stats["grad"]["nan_count"] == 0 and stats["weight"]["scale"] > 1


@pytest.mark.parametrize("spec", ["E4M3", "fp16"])
def test_compiled_training_steps_match_eager_bit_for_bit(spec, monkeypatch):
    """Forward, gradients and stats, through the fused kernels (with the scalers' updates inside them)."""
    monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ALTGRAD_COMPILE", flag)
        layer, gen, steps = quant_linear(QuantConfig(spec)), torch.Generator().manual_seed(8), []
        for magnitude in (1.0, 30.0, 0.01):
            x = (torch.randn(4, 16, generator=gen) * magnitude).requires_grad_()
            y = layer(x)
            y.backward(torch.randn(4, 8, generator=gen))
            steps.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone(), layer.pop_stats()))
            layer.weight.grad = layer.bias.grad = None
        runs.append(steps)
    for eager, compiled in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(eager[:4], compiled[:4]))
        assert eager[4] == compiled[4]
