"""quantize_blockwise against independent oracles, bit for bit.

Oracles: a block-by-block reference in Python (each block's amax, its scale from the contract's formulas
in exact integer exponent arithmetic with math.frexp / math.ldexp, then ``quantize`` on that block alone),
ml_dtypes' element casts of x / X (E4M3, E5M2, E3M4, IEEE-style E4M3), and torchao's MX emulation
(``to_mx`` / ``to_dtype``, FLOOR and RCEIL) where torchao is installed. Inputs span 80 binades across
blocks and 20 within one, with all-zero blocks, partial edge blocks, exact ties and amax at the ceil
boundary. Both the eager and the compiled (fused) path are checked.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import altgrad.quantize as quantize_module
from altgrad.formats import EIGHT_BIT_NAMES, get_format
from altgrad.quantize import quantize
from altgrad.scaling import quantize_blockwise  # the public path; defined in altgrad.blockwise

SPECS = list(EIGHT_BIT_NAMES) + ["E4M3:special=ieee", "E5M2:bias=12", "E3M4:special=finite"]
SCALES = [("e8m0", "floor"), ("e8m0", "ceil"), ("fp32", "floor")]
# (shape, block): a partial last block along the last dim, 1-D input, 2-D tiles with both edges partial.
LAYOUTS = [((3, 5, 100), (32,)), ((7, 100), (1, 32)), ((100,), (32,)), ((37, 70), (16, 48)), ((2, 30, 20), (8, 8))]
ML_DTYPES = {"E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2, "E3M4": ml_dtypes.float8_e3m4,
             "E4M3:special=ieee": ml_dtypes.float8_e4m3}


@pytest.fixture(params=["eager", "compiled"])
def path(request, monkeypatch):
    """Run a test through the eager expression and through the fused torch.compile kernel."""
    monkeypatch.setenv("ALTGRAD_COMPILE", "0" if request.param == "eager" else "1")
    if request.param == "compiled":
        monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    return request.param


def batched(x: torch.Tensor) -> torch.Tensor:
    """x as (batch, rows, cols): the trailing two dims, a 1-D x one row high."""
    return x.reshape(math.prod(x.shape[:-2]), x.shape[-2] if x.dim() > 1 else 1, x.shape[-1])


def tiles(shape, block):
    """(batch, rows, cols) index slices of every block, edge blocks included."""
    rows, cols = (shape[-2] if len(shape) > 1 else 1), shape[-1]
    tile_rows, tile_cols = (1, *block) if len(block) == 1 else block
    for b in range(math.prod(shape[:-2])):
        for r in range(0, rows, tile_rows):
            for c in range(0, cols, tile_cols):
                yield b, slice(r, r + tile_rows), slice(c, c + tile_cols)


def floor_log2(value: float) -> int:
    return math.frexp(value)[1] - 1  # exact, subnormals included


def block_scale(amax: float, spec: str, scale_format: str, scale_rounding: str) -> float:
    """The scale s that the block's elements are multiplied by (s = 1 / X for e8m0), by the contract."""
    max_value = get_format(spec).max_value
    if scale_format == "fp32":
        with np.errstate(over="ignore"):
            s = np.float32(max_value) / np.float32(amax)  # one float32 division, correctly rounded
        return float(s) if np.isfinite(s) else float(np.finfo(np.float32).max)
    k = floor_log2(amax) - floor_log2(max_value)
    if scale_rounding == "ceil" and amax > math.ldexp(max_value, k):  # smallest k with amax <= max * 2**k
        k += 1
    return 2.0 ** -min(max(k, -127), 127)


def per_element_scale(x: torch.Tensor, spec, block, scale_format, scale_rounding="floor") -> torch.Tensor:
    """Each element's block scale (float64), NaN for a block holding NaN or ±inf, 1 for an all-zero one."""
    x3 = batched(x.double())
    scales = torch.empty_like(x3)
    for b, rows, cols in tiles(x.shape, block):
        amax = x3[b, rows, cols].abs().max().item()
        scales[b, rows, cols] = (math.nan if not math.isfinite(amax) else 1.0 if amax == 0
                                 else block_scale(amax, spec, scale_format, scale_rounding))
    return scales.reshape(x.shape)


def reference(x: torch.Tensor, spec, block, scale_format, scale_rounding="floor", saturate=True) -> torch.Tensor:
    """quantize on each block alone, with the block's scale."""
    scales = batched(per_element_scale(x, spec, block, scale_format, scale_rounding))
    x3, out = batched(x), batched(torch.empty_like(x))
    for b, rows, cols in tiles(x.shape, block):
        scale = scales[b, rows, cols][0, 0].item()
        out[b, rows, cols] = (math.nan if math.isnan(scale)
                              else quantize(x3[b, rows, cols], spec, scale=scale, saturate=saturate))
    return out.reshape(x.shape)


def probe_input(shape, block, spec, seed: int = 0) -> torch.Tensor:
    """float32 x whose rows sit up to 80 binades apart and span 20 binades each, with an all-zero first
    block, and in the two rows after it: exact ties at a known scale (amax max * 2**j, so X = 2**j under
    every rule), and an amax just above max * 2**j (where ceil takes the next scale up)."""
    fmt = get_format(spec)
    rng = np.random.default_rng(seed)
    x = np.zeros((math.prod(shape[:-1]), shape[-1]))
    x[:] = np.exp2(rng.uniform(-40, 40, (len(x), 1)) + rng.uniform(-18, 2, x.shape)) * rng.choice([-1, 1], x.shape)
    block_rows, width = (1 if len(block) == 1 else block[0]), min(block[-1], shape[-1])
    j = int(rng.integers(-20, 20))
    edge = fmt.max_value * 2.0**j
    if len(x) >= block_rows + 2:
        grid = fmt.grid().double().numpy()
        ties = (grid[1:] + grid[:-1])[grid[1:] > 0] / 2  # midpoints of neighbours: exact in float32
        tie_row, edge_row = x[block_rows], x[block_rows + 1]
        tie_row[:width] = np.resize(ties[::max(1, len(ties) // width)], width) * 2.0**j
        tie_row[0] = edge
        edge_row[:width] *= edge / np.abs(edge_row[:width]).max()
        edge_row[0] = np.nextafter(np.float32(edge), np.float32(np.inf))
    x[:block_rows, :width] = 0.0
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def assert_same(ours: torch.Tensor, expected: torch.Tensor):
    """Bitwise equal (so -0.0 != 0.0), except that NaN matches NaN."""
    ours, expected = ours.float().numpy(), expected.float().numpy()
    both_nan = np.isnan(ours) & np.isnan(expected)
    bad = ~both_nan & (ours.view(np.uint32) != expected.view(np.uint32))
    assert not bad.any(), f"{bad.sum()} mismatches, e.g. ours={ours[bad][:4]} expected={expected[bad][:4]}"


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("scale_format,scale_rounding", SCALES)
@pytest.mark.parametrize("shape,block", LAYOUTS)
def test_matches_the_block_by_block_reference(spec, scale_format, scale_rounding, shape, block):
    x = probe_input(shape, block, spec)
    ours = quantize_blockwise(x, spec, block=block, scale_format=scale_format, scale_rounding=scale_rounding)
    assert_same(ours, reference(x, spec, block, scale_format, scale_rounding))
    block_rows = 1 if len(block) == 1 else block[0]
    assert (ours.reshape(-1, shape[-1])[:block_rows, :block[-1]] == 0).all()  # the all-zero block


# Each block shape and scale rule is a compiled graph of its own (seconds each): every rule for E4M3 on
# every layout, and the formats with their own kernel variant (E7M0's ties) or edge cases (E0M7) once.
COMPILED_CASES = [("E4M3", *scales, *layout) for scales in SCALES
                  for layout in [LAYOUTS[0], LAYOUTS[3], ((256, 384), (128, 128))]]
COMPILED_CASES += [("E7M0", "e8m0", "ceil", (256, 384), (128, 128)), ("E0M7", "fp32", "floor", *LAYOUTS[3]),
                   ("E2M5", "e8m0", "floor", *LAYOUTS[0])]


@pytest.mark.parametrize("spec,scale_format,scale_rounding,shape,block", COMPILED_CASES)
def test_compiled_equals_eager_and_reference(spec, scale_format, scale_rounding, shape, block, monkeypatch):
    x = probe_input(shape, block, spec, seed=1)
    results = []
    for compile_flag in ("0", "1"):
        monkeypatch.setenv("ALTGRAD_COMPILE", compile_flag)
        monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
        results.append(quantize_blockwise(x, spec, block=block, scale_format=scale_format,
                                          scale_rounding=scale_rounding))
    assert_same(results[1], results[0])
    assert_same(results[0], reference(x, spec, block, scale_format, scale_rounding))


@pytest.mark.parametrize("spec,dtype", ML_DTYPES.items())
@pytest.mark.parametrize("scale_format,scale_rounding", SCALES)
def test_elements_are_ml_dtypes_casts_of_the_scaled_input(spec, dtype, scale_format, scale_rounding, path):
    """e8m0: ours / X == cast(x / X); fp32: ours == cast(x * s) / s in float32, with the cast saturating
    (clipped to ±max first: ml_dtypes' own overflow is NaN or inf)."""
    shape, block = (6, 96), (32,)
    x = probe_input(shape, block, spec, seed=2)
    ours = quantize_blockwise(x, spec, block=block, scale_format=scale_format, scale_rounding=scale_rounding).numpy()
    scales = per_element_scale(x, spec, block, scale_format, scale_rounding).numpy()
    max_value = get_format(spec).max_value
    if scale_format == "e8m0":
        scaled = x.double().numpy() * scales  # exact: a power of two
        cast = np.clip(scaled, -max_value, max_value).astype(dtype).astype(np.float64)
        np.testing.assert_array_equal(ours.astype(np.float64) * scales, cast)
    else:
        scales = scales.astype(np.float32)
        cast = np.clip(x.numpy() * scales, -max_value, max_value).astype(dtype).astype(np.float32)
        assert_same(torch.from_numpy(ours), torch.from_numpy(cast / scales))


@pytest.mark.parametrize("elem_name,elem_dtype", [("E4M3", torch.float8_e4m3fn), ("E5M2", torch.float8_e5m2)])
@pytest.mark.parametrize("scale_rounding,mode", [("floor", "FLOOR"), ("ceil", "RCEIL")])
def test_matches_torchao_mx_emulation(elem_name, elem_dtype, scale_rounding, mode, path):
    """torchao's MX emulation: FLOOR is the OCP rule, RCEIL (cuBLAS/TE: E8M0 of amax / max rounded up) our
    ceil. torchao's CEIL is not: it rounds log2(amax) up before subtracting max's binade. Inputs keep amax
    above 2**-100 (torchao clamps scales at float32's smallest normal, 2**-126)."""
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor",
                                    reason="torchao is not installed (pip install --no-deps torchao): "
                                           "the comparison with its MX emulation needs it")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    rng = np.random.default_rng(3)
    x = np.exp2(rng.uniform(-60, 60, (64, 1)) + rng.uniform(-20, 0, (64, 256))) * rng.choice([-1, 1], (64, 256))
    x = torch.from_numpy(x.astype(np.float32))
    x[5, 32:64] = 0.0
    scale, data = mx_tensor.to_mx(x, elem_dtype, 32, getattr(ScaleCalculationMode, mode))
    expected = mx_tensor.to_dtype(data, scale, elem_dtype, 32, torch.float32)
    ours = quantize_blockwise(x, elem_name, block=(32,), scale_format="e8m0", scale_rounding=scale_rounding)
    assert_same(ours, expected)


@pytest.mark.parametrize("spec", ["E4M3", "E2M5", "E7M0"])
@pytest.mark.parametrize("scale_format", ["e8m0", "fp32"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.875])
def test_stochastic_rounding_is_unbiased(spec, scale_format, fraction):
    """Each row is one block: its amax max * 2**5 (so its scale is 2**-5 under every rule) and values a
    fraction of the way between neighbours lo < hi (times 2**5). The result is lo or hi, P(hi) = fraction
    within 5 standard errors over DRAWS rows (false alarm < 1e-6)."""
    draws = 16_000  # rows of 4: below the compile threshold, so this stays fast
    fmt = get_format(spec)
    grid = fmt.grid().double()
    pairs = [(grid[-3], grid[-2]), (grid[len(grid) // 2 + 3], grid[len(grid) // 2 + 4]), (-grid[5], -grid[4])]
    row = torch.tensor([fmt.max_value] + [lo + fraction * (hi - lo) for lo, hi in pairs]) * 2.0**5
    x = row.float().repeat(draws, 1)
    q = quantize_blockwise(x, spec, block=(4,), scale_format=scale_format, rounding="stochastic",
                           generator=torch.Generator().manual_seed(11)).double() / 2.0**5
    bound = 5 * math.sqrt(fraction * (1 - fraction) / draws)
    for column, (lo, hi) in enumerate(pairs, start=1):
        assert set(q[:, column].unique().tolist()) <= {lo.item(), hi.item()}
        assert abs((q[:, column] == hi).double().mean().item() - fraction) < bound


def test_stochastic_rounding_draws_as_quantize_does(path):
    """Same generator state, same per-element scales: bit for bit quantize's stochastic rounding."""
    x = probe_input((9, 70), (32,), "E3M4", seed=4)
    ours = quantize_blockwise(x, "E3M4", block=(32,), scale_format="e8m0", rounding="stochastic",
                              generator=torch.Generator().manual_seed(5))
    scales = per_element_scale(x, "E3M4", (32,), "e8m0").float()
    expected = quantize(x.reshape(-1), "E3M4", scale=scales.reshape(-1), rounding="stochastic", saturate=True,
                        generator=torch.Generator().manual_seed(5))
    assert_same(ours, expected.reshape(x.shape))
    again = quantize_blockwise(x, "E3M4", block=(32,), scale_format="e8m0", rounding="stochastic",
                               generator=torch.Generator().manual_seed(6))
    assert not torch.equal(ours, again)


def test_gradients_pass_straight_through():
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.arange(320.0).reshape(4, 80)
    for block, scale_format in [((32,), "e8m0"), ((2, 16), "fp32")]:
        x.grad = None
        (quantize_blockwise(x, "E4M3", block=block, scale_format=scale_format) * weights).sum().backward()
        assert torch.equal(x.grad, weights)


def test_e8m0_exponent_is_clamped_to_plus_minus_127(path):
    """Unclamped, both blocks below would come back exactly; clamped, the tiny one underflows and the huge
    one (E0M7's max is below 1, so k would be 128) saturates to max * 2**127."""
    tiny = torch.tensor([2.0**-140, 2.0**-141])  # E4M3: k = -140 - 8 = -148 -> -127, x / X = 2**-13 -> 0
    assert quantize_blockwise(tiny, "E4M3", block=(2,), scale_format="e8m0").tolist() == [0.0, 0.0]
    just_above = torch.tensor([2.0**-118, 2.0**-119])  # k = -126: inside the range, kept exactly
    assert torch.equal(quantize_blockwise(just_above, "E4M3", block=(2,), scale_format="e8m0"), just_above)
    at_the_limit = torch.tensor([2.0**-127, 2.0**-136])  # a subnormal amax, k = -135 -> -127: x / X = 1, 2**-9
    assert torch.equal(quantize_blockwise(at_the_limit, "E4M3", block=(2,), scale_format="e8m0"), at_the_limit)
    e0m7 = get_format("E0M7")
    huge = torch.tensor([1.5 * 2.0**127, 2.0**126])
    for scale_rounding in ("floor", "ceil"):
        q = quantize_blockwise(huge, "E0M7", block=(2,), scale_format="e8m0", scale_rounding=scale_rounding)
        assert q.tolist() == [e0m7.max_value * 2.0**127, 0.5 * 2.0**127]


EXTREME_AMAX = [[2.0**-127, 2.0**-136, 2.0**-130, -(2.0**-149)],  # subnormal amaxes: k is clamped to -127
                [2.0**-140, 2.0**-141, 0.0, 2.0**-149],
                [1.5 * 2.0**127, 2.0**126, 1.0, -3e38],  # k past +127 for formats whose max is below 2
                [3.4028234e38, 1e-45, 2.0**-126, 1.0]]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("scale_format,scale_rounding", SCALES)
def test_extreme_amax_matches_the_reference(spec, scale_format, scale_rounding):
    """Subnormal and near-overflow amaxes: e8m0 exponents at and past ±127, fp32 scales that overflow."""
    x = torch.tensor(EXTREME_AMAX)
    ours = quantize_blockwise(x, spec, block=(4,), scale_format=scale_format, scale_rounding=scale_rounding)
    assert_same(ours, reference(x, spec, (4,), scale_format, scale_rounding))


def test_ceil_takes_the_next_scale_exactly_past_max_times_a_power_of_two():
    """amax = max * 2**j: X = 2**j under both rules. The float just above: floor keeps X (and the amax
    saturates to max * 2**j), ceil doubles X, which the block's small element 2**-16 shows: 2**-16 / X is
    E4M3's smallest subnormal 2**-9 under X = 2**-7, and half of it, a tie that rounds to 0, under 2**-6."""
    edge = np.float32(get_format("E4M3").max_value * 2.0**-7)  # 3.5
    above = float(np.nextafter(edge, np.float32(np.inf)))
    x = torch.tensor([[float(edge), 2.0**-16], [above, 2.0**-16]])
    floor = quantize_blockwise(x, "E4M3", block=(2,), scale_format="e8m0", scale_rounding="floor")
    ceil = quantize_blockwise(x, "E4M3", block=(2,), scale_format="e8m0", scale_rounding="ceil")
    assert floor.tolist() == [[3.5, 2.0**-16], [3.5, 2.0**-16]]
    assert ceil.tolist() == [[3.5, 2.0**-16], [3.5, 0.0]]


def test_non_finite_blocks_become_nan_and_leave_the_others_alone(path):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    x[0, 5], x[1, 40] = float("nan"), float("-inf")
    for scale_format in ("e8m0", "fp32"):
        q = quantize_blockwise(x, "E5M2", block=(32,), scale_format=scale_format)
        assert q[0, :32].isnan().all() and q[1, 32:].isnan().all()
        clean = torch.cat([x[0, 32:], x[1, :32], x[2]])
        assert torch.equal(torch.cat([q[0, 32:], q[1, :32], q[2]]),
                           quantize_blockwise(clean, "E5M2", block=(32,), scale_format=scale_format))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_input_dtypes_keep_dtype_and_match_the_reference(dtype, path):
    x = probe_input((5, 70), (32,), "E4M3", seed=6).to(dtype)
    ours = quantize_blockwise(x, "E4M3", block=(32,), scale_format="e8m0", scale_rounding="ceil")
    assert ours.dtype == dtype and ours.shape == x.shape
    assert_same(ours, reference(x, "E4M3", (32,), "e8m0", "ceil"))


def test_unsaturated_floor_overflows_by_the_format_rule_and_ceil_does_not():
    """Floor scaling puts amax up to 2x above max: unsaturated, E4M3 (fn) gives NaN there, E5M2 (ieee) inf;
    ceil scaling never overflows."""
    x = torch.tensor([500.0, 1.0])  # E4M3: k = 8 - 8 = 0, 500 > 448 (and past 464, the last tie)
    assert quantize_blockwise(x, "E4M3", block=(2,), scale_format="e8m0").tolist() == [448.0, 1.0]
    assert quantize_blockwise(x, "E4M3", block=(2,), scale_format="e8m0", saturate=False)[0].isnan()
    # ceil: k = 1, 500 / 2 = 250 rounds to 256: nothing overflows, saturated or not
    assert quantize_blockwise(x, "E4M3", block=(2,), scale_format="e8m0", scale_rounding="ceil",
                              saturate=False).tolist() == [512.0, 1.0]
    y = torch.tensor([65000.0, 1.0])  # E5M2: k = 15 - 15 = 0, 65000 > 57344 (past 61440, the last tie)
    assert quantize_blockwise(y, "E5M2", block=(2,), scale_format="e8m0", saturate=False)[0].item() == math.inf


@pytest.mark.parametrize("kwargs,key", [
    ({"block": (0, 32)}, "block"), ({"block": (32, -1)}, "block"), ({"block": (1.5,)}, "block"),
    ({"block": (True,)}, "block"), ({"block": 32}, "block"), ({"block": (1, 2, 3)}, "block"),
    ({"block": (2, 32), "x": torch.ones(64)}, "block"), ({"scale_format": "e4m3"}, "scale_format"),
    ({"scale_rounding": "up"}, "scale_rounding"), ({"rounding": "up"}, "rounding"),
    ({"fmt": "fp32"}, "format"), ({"fmt": "bf16"}, "format"), ({"fmt": "E4M4"}, "E4M4"),
])
def test_bad_arguments_raise_value_error_naming_the_key(kwargs, key):
    arguments = {"x": torch.ones(4, 64), "fmt": "E4M3", "block": (32,), "scale_format": "e8m0", **kwargs}
    x, fmt = arguments.pop("x"), arguments.pop("fmt")
    with pytest.raises(ValueError, match=key):
        quantize_blockwise(x, fmt, **arguments)
