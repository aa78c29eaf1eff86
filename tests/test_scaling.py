"""Per-tensor scaling: the recipes recover a tensor's range and follow Transformer Engine's rules."""

import pytest
import torch

import altgrad.quantize as quantize_module
from altgrad.formats import get_format
from altgrad.quantize import quantize
from altgrad.scaling import Scaler, ScalingConfig, scale_from_amax


def tiny_tensor(seed=0, magnitude=1e-5):
    return torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * magnitude


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def test_current_scaling_recovers_a_tensor_far_below_the_format_range():
    x = tiny_tensor()
    assert (quantize(x, "E4M3") == 0).float().mean() > 0.99  # unscaled, almost everything underflows
    scaled = Scaler("E4M3", ScalingConfig(recipe="current")).quantize(x, saturate=True)
    assert relative_error(scaled, x) < 2**-4  # E4M3's half-ulp relative error is 2**-4


def test_scale_maps_amax_onto_the_format_max_with_margin_and_powers_of_two():
    fmt = get_format("E5M2")
    assert scale_from_amax(torch.tensor(2.0), fmt).item() == fmt.max_value / 2
    assert scale_from_amax(torch.tensor(2.0), fmt, margin=3).item() == fmt.max_value / 2 / 8
    pow2 = scale_from_amax(torch.tensor(3.0), fmt, power_of_two=True).item()
    assert pow2 == 2.0**14 and pow2 <= fmt.max_value / 3  # rounded down: amax * scale never overflows


def binade_spanning_amaxes(n=20_000, seed=11) -> torch.Tensor:
    """float32 amaxes with random mantissas over 80 binades (2**-40 .. 2**40)."""
    exponent = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80 - 40
    return torch.exp2(exponent).float()


@pytest.mark.parametrize("spec", ["E4M3", "E5M2", "E2M5"])
def test_scale_is_the_format_max_over_amax_in_one_float32_division(spec):
    """Rounded once, as torchao's float64 quotient cast to float32 is: 1 / amax then times max (two
    roundings) is a float32 step off for a share of amaxes, which moves codes at ties."""
    fmt, amax = get_format(spec), binade_spanning_amaxes()
    quotient = torch.tensor(fmt.max_value, dtype=torch.float32) / amax
    assert torch.equal(quotient, (fmt.max_value / amax.double()).float())  # float64 then one rounding: the same
    assert torch.equal(scale_from_amax(amax, fmt), quotient)
    assert torch.equal(scale_from_amax(amax, fmt, margin=3), quotient / 8)  # the margin is an exact power of two
    assert (amax.reciprocal() * fmt.max_value != quotient).float().mean() > 0.05  # the sample tells them apart


@pytest.mark.parametrize("flag", ["0", "1"])
def test_delayed_scale_is_one_float32_division_eager_and_compiled(flag, monkeypatch):
    """The delayed update runs inside the compiled quantizing pass: it divides the same way there."""
    monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setenv("ALTGRAD_COMPILE", flag)
    scaler = Scaler("E4M3", ScalingConfig(recipe="delayed", history_len=1))  # the scale follows the last amax
    gen, off = torch.Generator().manual_seed(12), []
    for step in range(40):
        x = torch.randn(256, generator=gen) * 2.0 ** (step % 20 - 10)
        scaler.quantize(x)
        if not torch.equal(scaler.scale, torch.tensor(448.0) / x.abs().max()):
            off.append(step)
    assert off == []


def test_zero_or_non_finite_amax_keeps_the_previous_scale():
    previous = torch.tensor(5.0)
    for amax in (0.0, float("inf"), float("nan")):
        assert scale_from_amax(torch.tensor(amax), "E4M3", previous=previous).item() == 5.0
    assert scale_from_amax(torch.tensor(0.0), "E4M3").item() == 1.0


def test_delayed_scaling_uses_the_history_not_the_current_tensor():
    scaler = Scaler("E4M3", ScalingConfig(recipe="delayed", history_len=3))
    first = tiny_tensor(magnitude=1.0)
    scaler.quantize(first)  # first call: its own amax
    assert torch.isclose(scaler.scale, torch.tensor(448.0) / first.abs().max())
    big = first * 10
    scaler.quantize(big)  # quantized with the old scale, then recorded
    assert torch.isclose(scaler.scale, torch.tensor(448.0) / big.abs().max())
    for _ in range(3):  # after history_len small tensors the big amax has rolled out
        scaler.quantize(first)
    assert torch.isclose(scaler.scale, torch.tensor(448.0) / first.abs().max())


def test_most_recent_amax_and_state_dict_round_trip():
    config = ScalingConfig(recipe="delayed", history_len=4, amax_compute="most_recent")
    scaler = Scaler("E5M2", config)
    for magnitude in (10.0, 1.0):
        scaler.quantize(tiny_tensor(magnitude=magnitude))
    assert torch.isclose(scaler.scale, torch.tensor(57344.0) / tiny_tensor(magnitude=1.0).abs().max())
    restored = Scaler("E5M2", config)
    restored.load_state_dict(scaler.state_dict())
    x = tiny_tensor(seed=1)
    assert torch.equal(restored.quantize(x), scaler.quantize(x))


def test_recipe_none_and_fp32_do_not_scale():
    x = tiny_tensor()
    assert torch.equal(Scaler("E4M3", ScalingConfig(recipe="none")).quantize(x), quantize(x, "E4M3"))
    assert torch.equal(Scaler("fp32").quantize(x), x)


def test_bad_config_is_rejected():
    for kwargs in ({"recipe": "sometimes"}, {"amax_compute": "mean"}, {"history_len": 0}):
        with pytest.raises(ValueError):
            ScalingConfig(**kwargs)


@pytest.mark.parametrize("spec,config", [
    ("E4M3", ScalingConfig()),
    ("E5M2", ScalingConfig(history_len=2, amax_compute="most_recent", margin=1, power_of_two=True)),
    ("fp16", ScalingConfig(recipe="current")),
])
def test_compiled_scaler_matches_eager_with_its_history_and_counts(spec, config, monkeypatch):
    """Under delayed scaling the history and scale move inside the compiled quantizing pass."""
    monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ALTGRAD_COMPILE", flag)
        scaler, counts, steps = Scaler(spec, config), torch.zeros(5, dtype=torch.float64), []
        for seed, magnitude in enumerate((1.0, 30.0, 0.01, 5.0)):
            q = scaler.quantize(tiny_tensor(seed, magnitude), saturate=True, counts=counts)
            steps.append([q, scaler.last_scale, scaler.last_stats, scaler.amax_history, scaler.scale, counts])
            steps[-1] = [t.clone() for t in steps[-1]]
        runs.append(steps)
    for eager, compiled in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    counts, last_scale = runs[0][-1][-1], runs[0][-1][1]
    assert counts[:3].tolist() == sum(step[2][1:].double() for step in runs[0]).tolist()
    assert counts[3:].tolist() == [runs[0][-1][2][0].item(), last_scale.item()]
