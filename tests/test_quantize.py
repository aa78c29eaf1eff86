"""quantize/encode/decode against independent oracles, bit for bit.

Oracles: ml_dtypes (E4M3FN, E5M2, E3M4, IEEE-style E4M3), torch's native float8 casts, and for the
formats no library has, a brute-force search of ``grid()`` with ties to the even code. Inputs: every
bfloat16 value, every code's value, every tie between neighbours and the floats either side of it,
the subnormal/normal boundary and the maximum, ±0, ±inf, NaN, and a seeded random float32 sample.
Both the eager and the compiled (fused) path are checked.
"""

import ml_dtypes
import numpy as np
import pytest
import torch

import altgrad.quantize as quantize_module
from altgrad.formats import EIGHT_BIT_NAMES, get_format
from altgrad.quantize import decode, encode, quantize, quantize_with_stats, ulp

# NaN and inf inputs are on purpose: numpy's warnings about casting them are noise here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ML_DTYPES = {
    "E4M3": ml_dtypes.float8_e4m3fn,
    "E5M2": ml_dtypes.float8_e5m2,
    "E3M4": ml_dtypes.float8_e3m4,
    "E4M3:special=ieee": ml_dtypes.float8_e4m3,
}
# Every 8-bit split at its default, plus overrides that change the bias and the special-value policy.
BRUTE_FORCE_SPECS = list(EIGHT_BIT_NAMES) + ["E3M4:special=finite", "E2M5:special=fn", "E5M2:bias=12",
                                             "E6M1:special=ieee", "E1M6:bias=2"]


@pytest.fixture(params=["eager", "compiled"])
def path(request, monkeypatch):
    """Run a test through the eager expression and through the fused torch.compile kernel."""
    if request.param == "eager":
        monkeypatch.setenv("ALTGRAD_COMPILE", "0")
    else:
        monkeypatch.setenv("ALTGRAD_COMPILE", "1")
        monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    return request.param


def probe_inputs(spec: str) -> np.ndarray:
    """float32 inputs that exercise every rounding decision of the format."""
    fmt = get_format(spec)
    every_bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint32) << 16
    grid = fmt.grid().double().numpy()
    top_ulp = grid[-1] - grid[-2]
    rungs = np.concatenate([grid, [fmt.max_value + top_ulp, -fmt.max_value - top_ulp]])
    rungs.sort()
    ties = (rungs[1:] + rungs[:-1]) / 2  # exact in float32: at most 9 significant bits
    anchors = np.concatenate([rungs, ties, [fmt.min_subnormal / 2]]).astype(np.float32)
    near = [np.nextafter(anchors, np.float32(np.inf)), np.nextafter(anchors, np.float32(-np.inf))]
    rng = np.random.default_rng(0)
    log_range = np.log2([fmt.min_subnormal / 16, fmt.max_value * 16])
    sample = np.exp2(rng.uniform(*log_range, 20_000)) * rng.choice([-1.0, 1.0], 20_000)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e38, -1e38, 1e-40, -1e-40])
    return np.concatenate([every_bf16.view(np.float32), anchors, -anchors, *near, sample.astype(np.float32),
                           special.astype(np.float32)]).astype(np.float32)


def assert_same_floats(ours: torch.Tensor, expected: np.ndarray, inputs: np.ndarray):
    """Bitwise equal, except that any NaN matches any NaN."""
    ours = ours.numpy()
    both_nan = np.isnan(ours) & np.isnan(expected)
    bad = ~both_nan & (ours.view(np.uint32) != expected.astype(np.float32).view(np.uint32))
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. x={inputs[bad][:4]} ours={ours[bad][:4]} ref={expected[bad][:4]}"


def brute_force(spec: str, x: np.ndarray) -> np.ndarray:
    """Nearest finite grid value, ties to the even code; overflow by the format's rule, unsaturated."""
    fmt = get_format(spec)
    codes = fmt.code_values.numpy()
    finite_codes = [c for c in range(128) if np.isfinite(codes[c])]
    magnitudes = codes[finite_codes].astype(np.float64)  # ascending with the code
    top_ulp = magnitudes[-1] - magnitudes[-2]
    # Rounding treats the grid as if it continued one rung past the max (an odd code, the last one).
    magnitudes = np.append(magnitudes, magnitudes[-1] + top_ulp)
    code_of = np.append(np.array(finite_codes), finite_codes[-1] + 1)
    a = np.abs(x.astype(np.float64))
    upper = np.clip(np.searchsorted(magnitudes, a), 1, len(magnitudes) - 1)
    lo, hi = magnitudes[upper - 1], magnitudes[upper]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (code_of[upper] % 2 == 0))
    out = np.where(pick_hi, hi, lo)
    overflow = {"ieee": np.inf, "fn": np.nan, "finite": fmt.max_value}[fmt.special]
    out = np.where((out > fmt.max_value) | np.isinf(a), overflow, out)
    out = np.where(a > magnitudes[-1], overflow, out)
    out = np.where(np.isnan(a), np.nan, out)
    return np.copysign(out, x).astype(np.float32)


@pytest.mark.parametrize("spec,dtype", ML_DTYPES.items())
def test_quantize_matches_ml_dtypes(spec, dtype, path):
    x = probe_inputs(spec)
    assert_same_floats(quantize(torch.from_numpy(x), spec), x.astype(dtype).astype(np.float32), x)


@pytest.mark.parametrize("spec,dtype", ML_DTYPES.items())
def test_encode_matches_ml_dtypes(spec, dtype, path):
    x = probe_inputs(spec)
    codes, expected = encode(torch.from_numpy(x), spec).numpy(), x.astype(dtype).view(np.uint8)
    # NaN has several codes; the libraries pick different ones (ml_dtypes a quiet-NaN pattern, torch all ones).
    nan = np.isnan(x.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(codes[~nan], expected[~nan])
    assert np.isnan(decode(torch.from_numpy(codes[nan]), spec).numpy()).all()


@pytest.mark.parametrize("spec", BRUTE_FORCE_SPECS)
def test_quantize_matches_brute_force_grid_search(spec, path):
    x = probe_inputs(spec)
    assert_same_floats(quantize(torch.from_numpy(x), spec), brute_force(spec, x), x)


@pytest.mark.parametrize("spec", list(ML_DTYPES) + BRUTE_FORCE_SPECS)
def test_saturate_clamps_finite_overflow_only(spec):
    fmt = get_format(spec)
    x = torch.tensor([fmt.max_value * 1.9, -fmt.max_value * 1.9, 1e38, float("inf"), float("-inf"), float("nan")])
    q = quantize(x, spec, saturate=True)
    assert q[:3].tolist() == [fmt.max_value, -fmt.max_value, fmt.max_value]
    expected_inf = {"ieee": float("inf"), "fn": float("nan"), "finite": fmt.max_value}[fmt.special]
    assert_same_floats(q[3:5], np.array([expected_inf, -expected_inf]), x[3:5].numpy())
    assert torch.isnan(q[5])


@pytest.mark.parametrize("name,dtype", [("E4M3", torch.float8_e4m3fn), ("E5M2", torch.float8_e5m2)])
def test_matches_torch_native_casts(name, dtype, path):
    """torch's float8_e4m3fn cast saturates out-of-range input (±inf too), so it is the oracle for
    saturate=True on finite input; float8_e5m2 follows IEEE and matches unsaturated, codes included."""
    x = torch.from_numpy(probe_inputs(name))
    native = x.to(dtype)
    if name == "E4M3":
        x, native = x[torch.isfinite(x)], native[torch.isfinite(x)]
        assert_same_floats(quantize(x, name, saturate=True), native.float().numpy(), x.numpy())
        in_range = x.abs() < 464  # beyond, the OCP conversion (and ours) gives NaN; torch saturates
        assert torch.equal(encode(x[in_range], name), native[in_range].view(torch.uint8))
    else:
        assert_same_floats(quantize(x, name), native.float().numpy(), x.numpy())
        assert torch.equal(encode(x, name), native.view(torch.uint8))


@pytest.mark.parametrize("spec", list(ML_DTYPES) + BRUTE_FORCE_SPECS)
def test_encode_decode_round_trip_every_code(spec):
    fmt = get_format(spec)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = decode(codes, spec)
    assert torch.equal(values.view(torch.int32)[~values.isnan()], fmt.code_values.view(torch.int32)[~values.isnan()])
    if fmt.has_nan:
        assert torch.equal(encode(values, spec)[~values.isnan()], codes[~values.isnan()])
        assert torch.isnan(decode(encode(values[values.isnan()], spec), spec)).all()
    else:
        assert torch.equal(encode(values, spec), codes)


def test_encode_refuses_nan_for_a_format_without_nan():
    with pytest.raises(ValueError, match="no NaN"):
        encode(torch.tensor([1.0, float("nan")]), "E2M5")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_keep_their_dtype_and_round_the_same(dtype, path):
    x = torch.linspace(-300, 300, 4001, dtype=torch.float64).to(dtype)
    q = quantize(x, "E4M3")
    assert q.dtype == dtype and q.shape == x.shape
    # float64 rounds in float64 (no double rounding through float32): compare with the grid search.
    expected = brute_force("E4M3", x.double().numpy())
    assert torch.equal(q.double(), torch.from_numpy(expected).double())
    exact = x.float().to(dtype)  # float32 values, so that encoding them in float32 changes nothing
    assert torch.equal(encode(exact, "E4M3"), encode(exact.float(), "E4M3"))


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
def test_native_formats_use_torch_casts(name, input_dtype, path):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=input_dtype) * 1e3
    dtype = get_format(name).torch_dtype
    assert torch.equal(quantize(x, name), x.to(dtype).to(input_dtype))
    assert torch.equal(quantize(x, name, scale=8.0), (x * 8).to(dtype).to(input_dtype) / 8)
    big = torch.tensor([1e39, -1e39], dtype=torch.float64)
    assert quantize(big, name, saturate=True).abs().max() == get_format(name).max_value


def test_scale_is_applied_before_rounding_and_undone_after():
    x = torch.tensor([0.001, 0.0011, -0.07])
    scale = torch.tensor(1024.0)
    assert torch.equal(quantize(x, "E4M3", scale=scale), quantize(x * scale, "E4M3") / scale)
    assert torch.equal(encode(x, "E4M3", scale=scale), encode(x * scale, "E4M3"))
    assert torch.equal(decode(encode(x, "E4M3", scale=scale), "E4M3", scale=scale), quantize(x, "E4M3", scale=scale))


def test_gradients_pass_straight_through():
    x = torch.randn(64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.arange(64.0)
    for spec in ("E4M3", "E7M0", "bf16"):
        x.grad = None
        (quantize(x, spec, scale=3.0, saturate=True) * weights).sum().backward()
        assert torch.equal(x.grad, weights)


# ---- stochastic rounding --------------------------------------------------------------------------
DRAWS = 60_000  # per point; below the compile threshold, so this stays fast


@pytest.mark.parametrize("spec", ["E4M3", "E0M7", "E7M0", "E2M5"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.875])
def test_stochastic_rounding_is_unbiased(spec, fraction):
    """Between neighbours lo < hi, the result is lo or hi, P(hi) = (x - lo) / (hi - lo), and the mean is x.
    Bound: 5 standard errors of a Bernoulli mean over DRAWS samples (false alarm < 1e-6)."""
    grid = get_format(spec).grid().double()
    generator = torch.Generator().manual_seed(1234)
    for lo, hi in [(grid[-3], grid[-2]), (grid[len(grid) // 2 + 3], grid[len(grid) // 2 + 4]), (-grid[5], -grid[4])]:
        x = lo + fraction * (hi - lo)
        q = quantize(torch.full((DRAWS,), x, dtype=torch.float64), spec, rounding="stochastic", generator=generator)
        assert set(q.unique().tolist()) <= {lo.item(), hi.item()}
        p_hi = (q == hi).double().mean().item()
        bound = 5 * np.sqrt(fraction * (1 - fraction) / DRAWS)
        assert abs(p_hi - fraction) < bound
        assert abs((q.mean() - x).item()) < bound * (hi - lo).item()


def test_stochastic_rounding_keeps_grid_values_and_is_reproducible():
    grid = get_format("E3M4").grid()
    assert torch.equal(quantize(grid, "E3M4", rounding="stochastic"), grid)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    first = quantize(x, "E3M4", rounding="stochastic", generator=torch.Generator().manual_seed(7))
    second = quantize(x, "E3M4", rounding="stochastic", generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert torch.signbit(quantize(torch.tensor([-1e-6]), "E3M4", rounding="stochastic")).item()  # keeps -0.0


def test_stochastic_compiled_equals_eager(monkeypatch):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 100
    monkeypatch.setenv("ALTGRAD_COMPILE", "0")
    eager = quantize(x, "E5M2", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("ALTGRAD_COMPILE", "1")
    monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    compiled = quantize(x, "E5M2", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("spec", ["E4M3", "E5M2", "E2M5", "E7M0", "fp16"])
def test_stats_count_what_they_say_compiled_and_eager(spec, monkeypatch):
    fmt = get_format(spec)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5)) * fmt.max_value / 4
    x[:7] = fmt.max_value * 3  # overflow once scaled by 2
    x[7:12] = fmt.min_subnormal / 8  # underflow, at any scale up to 2
    x[12:14] = torch.tensor([float("nan"), float("inf")])
    scale = torch.tensor(2.0)
    results = {}
    for mode in ("eager", "compiled"):
        monkeypatch.setenv("ALTGRAD_COMPILE", "0" if mode == "eager" else "1")
        monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
        results[mode] = quantize_with_stats(x, spec, scale=scale, saturate=True)
    (q, stats), (q_compiled, stats_compiled) = results.values()
    assert_same_floats(q_compiled, q.numpy(), x.numpy())
    assert_same_floats(quantize(x, spec, scale=scale, saturate=True), q.numpy(), x.numpy())
    torch.testing.assert_close(stats_compiled, stats, rtol=0, atol=0, equal_nan=True)  # amax is NaN here
    magnitude = x.abs()
    expected = [magnitude.max(), (magnitude * 2 > fmt.max_value).sum(), ((x != 0) & (q == 0)).sum(), q.isnan().sum()]
    assert stats.tolist() == pytest.approx([float(v) for v in expected], nan_ok=True)


@pytest.mark.parametrize("kwargs,fragment", [({"rounding": "up"}, "rounding"), ({}, "floating-point")])
def test_bad_arguments_raise_value_error(kwargs, fragment):
    x = torch.ones(3) if kwargs else torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=fragment):
        quantize(x, "E4M3", **kwargs)
    with pytest.raises(ValueError, match="known"):
        quantize(torch.ones(3), "E4M4")


def test_ulp_is_the_local_grid_spacing():
    fmt = get_format("E4M3")
    grid = fmt.grid()
    positives = grid[grid > 0].double()
    spacing = positives[1:] - positives[:-1]
    assert torch.equal(ulp(positives[:-1].float(), fmt).double(), spacing)  # the gap above each value
    assert torch.equal(ulp(torch.tensor([3.0]), fmt, scale=4.0), torch.tensor([0.25]))  # 12 lies in [8, 16)


@pytest.mark.parametrize("spec", list(ML_DTYPES) + BRUTE_FORCE_SPECS)
def test_encode_saturated_codes_are_the_codes_of_the_saturated_values(spec, path):
    x = torch.from_numpy(probe_inputs(spec))
    x = x[~x.isnan()]
    assert torch.equal(encode(x, spec, saturate=True), encode(quantize(x, spec, saturate=True), spec))


def test_encode_options_for_comparing_codes():
    codes = encode(torch.tensor([-0.0, 0.0, -1e-9, float("nan")]), "E2M5", nan_code=0, signed_zero=False)
    assert codes.tolist() == [0, 0, 0, 0]
    assert encode(torch.tensor([-0.0, -1e-9]), "E2M5").tolist() == [0x80, 0x80]
