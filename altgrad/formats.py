"""Floating-point format specifications: every 8-bit split E0M7 … E7M0, plus fp32/bf16/fp16 baselines.

A format is sign + E exponent bits + M mantissa bits with an exponent bias and a policy for the
all-ones exponent (``special``):

* ``"ieee"``   the top exponent is reserved: mantissa 0 is ±inf, any other mantissa is NaN;
* ``"fn"``     no inf; only the all-ones exponent+mantissa code is NaN (OCP E4M3FN);
* ``"finite"`` every code is a finite number.

Exponent field 0 holds the subnormals ``m * 2**(1 - bias - M)``; field e > 0 holds the normals
``(2**M + m) * 2**(e - bias - M)``. E0M7 has no exponent field, so all of its codes are "subnormal";
its default bias of 1 makes its magnitudes ``m / 2**7``. Negative zero exists in every format
(code 0x80); ``grid()`` and ``num_finite`` count one zero.

Properties are derived from the code layout alone; the tests check them against ml_dtypes and torch.
Only ``torch_dtype`` and the tensors (``code_values``, ``grid``) need torch, and they import it when
asked: the driver of a sweep on a cluster reads formats by name and imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPECIALS = ("ieee", "fn", "finite")


@dataclass(frozen=True)
class FPFormat:
    """One floating-point format. Build it with :func:`get_format`, not directly."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    special: str

    # ---- code layout --------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def is_native(self) -> bool:
        """fp32/bf16/fp16: quantized by torch's own casts, not by the 8-bit simulator."""
        return self.name in _NATIVE_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype | None:
        if not self.is_native:
            return None
        import torch

        return getattr(torch, _NATIVE_DTYPES[self.name])

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (also the scale of the subnormals)."""
        return 1 - self.bias

    def _magnitude_value(self, code: int) -> float:
        """Value of a sign-less code, ignoring the special-value policy."""
        field, man = code >> self.man_bits, code & ((1 << self.man_bits) - 1)
        if field == 0:
            return math.ldexp(man, self.emin - self.man_bits)
        return math.ldexp((1 << self.man_bits) + man, field - self.bias - self.man_bits)

    @property
    def _top_field(self) -> int:
        return (1 << self.exp_bits) - 1

    @property
    def _num_finite_magnitudes(self) -> int:
        """Sign-less codes that are finite numbers (they are the lowest ones in every policy)."""
        if self.special == "ieee":
            return self._top_field << self.man_bits
        if self.special == "fn":
            return (1 << (self.exp_bits + self.man_bits)) - 1
        return 1 << (self.exp_bits + self.man_bits)

    # ---- public properties ---------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special != "finite"

    @property
    def max_value(self) -> float:
        return self._magnitude_value(self._num_finite_magnitudes - 1)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value; equals ``min_normal`` when there are no subnormals (M = 0)."""
        return self._magnitude_value(1)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value; NaN when the format has no normals (E0M7, or E1 with ieee)."""
        first_normal = 1 << self.man_bits
        if self.exp_bits == 0 or first_normal >= self._num_finite_magnitudes:
            return math.nan
        return self._magnitude_value(first_normal)

    @property
    def num_finite(self) -> int:
        """Distinct finite values, counting ±0 once."""
        return 2 * self._num_finite_magnitudes - 1

    @property
    def binades(self) -> float:
        """log2(max / min_subnormal): the dynamic range in octaves."""
        return math.log2(self.max_value / self.min_subnormal)

    @cached_property
    def code_values(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2**bits - 1 (inf and NaN included); 8/16-bit formats only."""
        if self.bits > 16:
            raise ValueError(f"{self.name}: {self.bits}-bit codes are too many to enumerate")
        n_mag = 1 << (self.exp_bits + self.man_bits)
        mags = [self._magnitude_value(c) for c in range(self._num_finite_magnitudes)]
        if self.special == "ieee":
            mags += [math.inf] + [math.nan] * ((1 << self.man_bits) - 1)
        elif self.special == "fn":
            mags += [math.nan]
        assert len(mags) == n_mag
        import torch

        values = torch.tensor(mags, dtype=torch.float64)
        return torch.cat([values, -values]).float()

    def grid(self) -> torch.Tensor:
        """Every distinct finite value, ascending, as float32 (one zero)."""
        import torch

        values = self.code_values
        return torch.unique(values[torch.isfinite(values)])  # sorted; -0.0 == 0.0, so one zero stays

    def describe(self) -> str:
        return f"{self.name} (E{self.exp_bits}M{self.man_bits}, bias {self.bias}, {self.special})"

    def __str__(self) -> str:
        return self.name


_NATIVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # names in torch

_NATIVE = {
    "fp32": FPFormat("fp32", 8, 23, 127, "ieee"),
    "bf16": FPFormat("bf16", 8, 7, 127, "ieee"),
    "fp16": FPFormat("fp16", 5, 10, 15, "ieee"),
}


def _default_8bit(exp_bits: int) -> FPFormat:
    man_bits = 7 - exp_bits
    name = f"E{exp_bits}M{man_bits}"
    if name == "E5M2":
        return FPFormat(name, 5, 2, 15, "ieee")
    if name == "E4M3":
        return FPFormat(name, 4, 3, 7, "fn")
    if name == "E3M4":
        return FPFormat(name, 3, 4, 3, "ieee")
    bias = 1 if exp_bits == 0 else 2 ** (exp_bits - 1) - 1
    return FPFormat(name, exp_bits, man_bits, bias, "finite")


EIGHT_BIT_NAMES = tuple(f"E{e}M{7 - e}" for e in range(8))
FORMATS: dict[str, FPFormat] = {**_NATIVE, **{f.name: f for f in map(_default_8bit, range(8))}}
NAMES = tuple(FORMATS)


def _known() -> str:
    return ", ".join(NAMES)


def _parse_override(spec: str, item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    key, raw = key.strip().lower(), raw.strip()
    if not sep or not raw:
        raise ValueError(f"format spec {spec!r}: override {item!r} is not key=value (keys: bias, special)")
    if key == "bias":
        try:
            return key, int(raw)
        except ValueError:
            raise ValueError(f"format spec {spec!r}: bias={raw!r} is not an integer") from None
    if key == "special":
        if raw.lower() not in SPECIALS:
            raise ValueError(f"format spec {spec!r}: special={raw!r} is not one of {', '.join(SPECIALS)}")
        return key, raw.lower()
    raise ValueError(f"format spec {spec!r}: unknown override {key!r} (keys: bias, special)")


def _check_fits_float32(spec: str, fmt: FPFormat) -> None:
    """The simulator computes in float32 with power-of-two ulps, so the grid must lie inside float32's
    normal range (every built-in format does; only an extreme bias override can leave it)."""
    lowest_ulp = fmt.emin - fmt.man_bits
    top_binade = (1 << fmt.exp_bits) - 1 - fmt.bias + 1
    if lowest_ulp < -126 or top_binade - fmt.man_bits > 126 or top_binade > 127:
        raise ValueError(f"format spec {spec!r}: bias={fmt.bias} puts {fmt.name}'s range outside float32's")


def get_format(spec: str | FPFormat) -> FPFormat:
    """Look up a format by name (case-insensitive) with optional ``:key=value`` overrides.

    >>> get_format("E3M4:special=finite").max_value
    31.0
    """
    if isinstance(spec, FPFormat):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"format spec {spec!r} is not a format name (known: {_known()})")
    name, *overrides = spec.strip().split(":")
    canonical = name.strip().lower() if name.strip().lower() in _NATIVE else name.strip().upper()
    if canonical not in FORMATS:
        raise ValueError(f"unknown format {name.strip()!r} in spec {spec!r} (known: {_known()})")
    fmt = FORMATS[canonical]
    if not overrides:
        return fmt
    if fmt.is_native:
        raise ValueError(f"format spec {spec!r}: {canonical} is a native torch dtype and takes no overrides")
    changes = dict(_parse_override(spec, item) for item in overrides)
    if changes.get("special") == "ieee" and fmt.exp_bits == 0:
        raise ValueError(f"format spec {spec!r}: special=ieee needs exponent bits, {canonical} has none")
    suffix = "".join(f":{k}={v}" for k, v in sorted(changes.items()) if getattr(fmt, k) != v)
    fmt = replace(fmt, name=canonical + suffix, **changes)
    _check_fits_float32(spec, fmt)
    return fmt


def same_grid_up_to_scale(a: FPFormat, b: FPFormat) -> float | None:
    """The factor s with grid(b) == s * grid(a), or None. Under per-tensor scaling such formats are
    the same experiment (E1M6 is E0M7 times 4)."""
    ga, gb = a.grid().double(), b.grid().double()
    if ga.numel() != gb.numel():
        return None
    factor = b.max_value / a.max_value
    return factor if bool((ga * factor == gb).all()) else None
