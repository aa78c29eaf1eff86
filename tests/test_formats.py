"""Format properties against independent references: ml_dtypes' and torch's finfo and code tables."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.formats import EIGHT_BIT_NAMES, FORMATS, get_format, same_grid_up_to_scale

# Formats an independent library implements, with that library's dtype.
ML_DTYPES = {
    "E4M3": ml_dtypes.float8_e4m3fn,
    "E5M2": ml_dtypes.float8_e5m2,
    "E3M4": ml_dtypes.float8_e3m4,
    "E4M3:special=ieee": ml_dtypes.float8_e4m3,
}


def ml_code_values(dtype) -> np.ndarray:
    return np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)


@pytest.mark.parametrize("spec,dtype", ML_DTYPES.items())
def test_properties_match_ml_dtypes(spec, dtype):
    fmt, info = get_format(spec), ml_dtypes.finfo(dtype)
    assert fmt.max_value == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    values = ml_code_values(dtype)
    assert fmt.num_finite == len(np.unique(values[np.isfinite(values)]))


@pytest.mark.parametrize("spec,dtype", ML_DTYPES.items())
def test_every_code_value_matches_ml_dtypes(spec, dtype):
    ours, theirs = get_format(spec).code_values.numpy(), ml_code_values(dtype)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), theirs[finite].view(np.uint32))  # -0.0 too


@pytest.mark.parametrize("name,dtype", [("E4M3", torch.float8_e4m3fn), ("E5M2", torch.float8_e5m2),
                                        ("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_properties_match_torch_finfo(name, dtype):
    fmt, info = get_format(name), torch.finfo(dtype)
    assert fmt.max_value == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.bits == info.bits


def test_e4m3_max_is_448_not_480():
    assert get_format("E4M3").max_value == 448.0


@pytest.mark.parametrize("name", EIGHT_BIT_NAMES)
def test_grid_is_sorted_unique_finite_with_one_zero(name):
    fmt = get_format(name)
    grid = fmt.grid()
    assert grid.dtype == torch.float32
    assert torch.all(grid[1:] > grid[:-1])
    assert grid.numel() == fmt.num_finite
    assert (grid == 0).sum() == 1
    assert grid[-1] == fmt.max_value and grid[0] == -fmt.max_value
    assert grid[grid > 0][0] == fmt.min_subnormal


def test_default_splits():
    expected = {  # name: (bias, special, max)
        "E0M7": (1, "finite", 127 / 128), "E1M6": (0, "finite", 127 / 32), "E2M5": (1, "finite", 7.875),
        "E3M4": (3, "ieee", 15.5), "E4M3": (7, "fn", 448.0), "E5M2": (15, "ieee", 57344.0),
        "E6M1": (31, "finite", 1.5 * 2.0**32), "E7M0": (63, "finite", 2.0**64),
    }
    for name, (bias, special, max_value) in expected.items():
        fmt = get_format(name)
        assert (fmt.bias, fmt.special, fmt.max_value) == (bias, special, max_value), name
        assert fmt.exp_bits + fmt.man_bits == 7


def test_e0m7_is_fixed_point_without_normals():
    fmt = get_format("E0M7")
    positives = fmt.grid()[fmt.grid() >= 0]
    torch.testing.assert_close(positives, torch.arange(128) / 128.0, rtol=0, atol=0)
    assert math.isnan(fmt.min_normal)


def test_e1m6_is_e0m7_times_four_and_no_other_pair_is_a_scaled_copy():
    formats = [get_format(n) for n in EIGHT_BIT_NAMES]
    pairs = {(a.name, b.name): same_grid_up_to_scale(a, b) for a in formats for b in formats if a != b}
    assert {k: v for k, v in pairs.items() if v is not None} == {("E0M7", "E1M6"): 4.0, ("E1M6", "E0M7"): 0.25}


def test_names_are_case_insensitive_and_overrides_apply():
    assert get_format("e5m2") is FORMATS["E5M2"]
    assert get_format("BF16") is FORMATS["bf16"]
    fmt = get_format("E3M4:special=finite")
    assert (fmt.special, fmt.max_value) == ("finite", 31.0)
    assert get_format("e4m3:bias=8").max_value == 224.0
    assert get_format("E4M3:bias=7") is not None and get_format("E4M3:bias=7").name == "E4M3"


@pytest.mark.parametrize("spec,fragment", [
    ("E9M9", "'E9M9'"), ("", "known"), ("E4M3:bias=x", "bias='x'"), ("E4M3:special=odd", "special='odd'"),
    ("E4M3:colour=red", "'colour'"), ("E4M3:bias", "key=value"), ("bf16:bias=3", "bf16"),
    ("E0M7:special=ieee", "exponent"), ("E4M3:bias=-200", "float32"),
])
def test_bad_specs_raise_a_clear_value_error(spec, fragment):
    with pytest.raises(ValueError) as error:
        get_format(spec)
    assert fragment in str(error.value)
    if "unknown format" in str(error.value) or fragment == "known":
        assert "E5M2" in str(error.value)  # lists the known names
