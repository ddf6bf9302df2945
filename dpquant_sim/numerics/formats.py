"""Typed number formats: OCP fp8/fp6/fp4, symmetric ints, bf16/fp16 and radix-2 log4 / luq_log4 (LUQ).

Every format is a frozen dataclass with its derived constants (bias, max, smallest normal and subnormal) so
that callers never recompute them. The quantizer (``quantize.py``) reads only ``ebits``, ``mbits``, ``bias``,
the overflow rules and the bit pattern of ``max``; the table below is also in docs/formats.md.

=========  =====  =====  ====  ==========  ===========  ==============  ===========================
name       ebits  mbits  bias  max         min normal   min subnormal   inf / NaN
=========  =====  =====  ====  ==========  ===========  ==============  ===========================
fp8_e4m3   4      3      7     448         2^-6         2^-9            no inf; NaN = S.1111.111
fp8_e5m2   5      2      15    57344       2^-14        2^-16           IEEE: inf and NaNs
fp6_e2m3   2      3      1     7.5         1            0.125           none (always saturates)
fp6_e3m2   3      2      3     28          0.25         0.0625          none (always saturates)
fp4_e2m1   2      1      1     6           1            0.5             none (always saturates)
bf16       8      7      127   3.3895e38   2^-126       2^-133          IEEE
fp16       5      10     15    65504       2^-14        2^-24           IEEE
log4       3      0      3     16          0.25         (none)          none; values +-2^e, e in -2..4, and 0
luq_log4   3      0      3     16          0.125        (none)          none; values +-2^e, e in -3..4, and 0
int8       -      -      -     127         1            1               none; symmetric [-127, 127]
int4       -      -      -     7           1            1               none; symmetric [-7, 7]
=========  =====  =====  ====  ==========  ===========  ==============  ===========================

>>> get_format("fp8_e4m3").max
448.0
>>> get_format("fp4_e2m1").values()[:8].tolist()
[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Literal, Union

import torch

from dpquant_sim.errors import ConfigError

NanRule = Literal["ieee", "all_ones", "none"]


def _f32_bits(v: float) -> int:
    """Bit pattern of ``v`` rounded to float32 (as a non-negative int)."""
    return struct.unpack("<I", struct.pack("<f", v))[0]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with 1 sign bit, ``ebits`` exponent bits and ``mbits`` mantissa bits.

    Attributes:
        name: registry name, e.g. ``"fp8_e4m3"``.
        ebits, mbits: exponent and explicit mantissa widths (bits).
        bias: exponent bias; a normal value is (-1)^s * 2^(E - bias) * 1.m, a subnormal (E = 0) is
            (-1)^s * 2^(1 - bias) * 0.m.
        has_inf: the top exponent encodes +-inf (IEEE-like: fp8_e5m2, fp16, bf16).
        nan: "ieee" (top exponent with nonzero mantissa), "all_ones" (only S.1..1.1..1, OCP e4m3fn) or
            "none" (fp6, fp4, log4: every code is finite).
        saturate_only: overflow always clamps to +-max (fp6/fp4/log4 have no inf or NaN to overflow to).
        has_subnormals: False only for the radix-2 formats log4 and luq_log4 (mbits=0: no subnormals).
        zero_code: True (every format but luq_log4): E = 0 encodes zero (or the subnormals). False
            (luq_log4): every exponent code E = 0 .. 2^ebits - 1 is the power 2^(E - bias), and 0 is one more
            value outside the 2^bits codes (as LUQ counts its radix-2 FP4: 8 powers of two plus the zero that
            stochastic underflow produces; 17 values per sign pair, one more than 4 bits encode).
        max: largest finite value. min_normal: 2^(1 - bias) (2^-bias without a zero code). min_subnormal:
            2^(1 - bias - mbits) (for log4 and luq_log4, which have no subnormals, equal to min_normal).
        emin, emax: exponents of the smallest normal and of ``max`` (unbiased).

    Example:
        >>> f = get_format("fp8_e5m2"); (f.bias, f.max, f.min_subnormal)
        (15, 57344.0, 1.52587890625e-05)
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    has_inf: bool
    nan: NanRule
    saturate_only: bool
    has_subnormals: bool = True
    zero_code: bool = True
    max: float = field(init=False)
    min_normal: float = field(init=False)
    min_subnormal: float = field(init=False)
    emin: int = field(init=False)
    emax: int = field(init=False)

    def __post_init__(self) -> None:
        top = (1 << self.ebits) - 1  # largest biased exponent field
        if self.has_inf:  # IEEE: top exponent reserved for inf/NaN
            e_max_field, m_max = top - 1, (1 << self.mbits) - 1
        elif self.nan == "all_ones":  # e4m3fn: top exponent usable except mantissa all ones (NaN)
            e_max_field, m_max = top, (1 << self.mbits) - 2
        else:  # every code finite
            e_max_field, m_max = top, (1 << self.mbits) - 1
        emax = e_max_field - self.bias
        emin = 1 - self.bias if self.zero_code else -self.bias
        mx = math.ldexp(1.0 + m_max / (1 << self.mbits), emax) if self.mbits else math.ldexp(1.0, emax)
        object.__setattr__(self, "emax", emax)
        object.__setattr__(self, "emin", emin)
        object.__setattr__(self, "max", float(mx))
        object.__setattr__(self, "min_normal", math.ldexp(1.0, emin))
        sub = math.ldexp(1.0, emin - self.mbits) if self.has_subnormals else math.ldexp(1.0, emin)
        object.__setattr__(self, "min_subnormal", sub)

    @property
    def bits(self) -> int:
        """Storage width in bits (sign + exponent + mantissa)."""
        return 1 + self.ebits + self.mbits

    @property
    def is_int(self) -> bool:
        return False

    @property
    def max_bits(self) -> int:
        """float32 bit pattern of ``max`` (the quantizer clamps on it)."""
        return _f32_bits(self.max)

    def values(self) -> torch.Tensor:
        """All finite non-negative representable values, ascending (float32; exact)."""
        vals = {0.0}
        for e_field in range(1 << self.ebits):
            for m in range(1 << self.mbits):
                if e_field == 0 and self.zero_code:
                    if not self.has_subnormals:
                        continue
                    v = math.ldexp(m / (1 << self.mbits), self.emin)
                else:
                    v = math.ldexp(1.0 + m / (1 << self.mbits), e_field - self.bias)
                if v <= self.max:
                    vals.add(v)
        return torch.tensor(sorted(vals), dtype=torch.float32)


@dataclass(frozen=True)
class IntFormat:
    """A symmetric signed integer format: values are the integers in [-qmax, qmax], qmax = 2^(bits-1) - 1.

    ``quantize`` takes values already on the integer grid (the caller's scale maps amax to qmax) and rounds
    half to even, clamping to [-qmax, qmax] (always saturates; -128 for int8 is never produced).

    Example:
        >>> get_format("int4").max
        7.0
    """

    name: str
    nbits: int
    max: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max", float((1 << (self.nbits - 1)) - 1))

    has_inf = False
    nan = "none"
    saturate_only = True
    min_normal = 1.0
    min_subnormal = 1.0

    @property
    def bits(self) -> int:
        return self.nbits

    @property
    def is_int(self) -> bool:
        return True

    # The quantizer treats an int format as a float format whose subnormal range is the integer grid:
    # mbits = nbits - 2 ... we need 2^mbits > qmax, so mbits = nbits - 1 and emin = mbits (quantum 2^0 = 1).
    @property
    def mbits(self) -> int:
        return self.nbits - 1

    @property
    def emin(self) -> int:
        return self.nbits - 1

    @property
    def max_bits(self) -> int:
        return _f32_bits(self.max)

    def values(self) -> torch.Tensor:
        """All non-negative representable values, ascending (float32)."""
        return torch.arange(0, int(self.max) + 1, dtype=torch.float32)


Format = Union[FloatFormat, IntFormat]

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        FloatFormat("fp8_e4m3", 4, 3, 7, has_inf=False, nan="all_ones", saturate_only=False),
        FloatFormat("fp8_e5m2", 5, 2, 15, has_inf=True, nan="ieee", saturate_only=False),
        FloatFormat("fp6_e2m3", 2, 3, 1, has_inf=False, nan="none", saturate_only=True),
        FloatFormat("fp6_e3m2", 3, 2, 3, has_inf=False, nan="none", saturate_only=True),
        FloatFormat("fp4_e2m1", 2, 1, 1, has_inf=False, nan="none", saturate_only=True),
        FloatFormat("bf16", 8, 7, 127, has_inf=True, nan="ieee", saturate_only=False),
        FloatFormat("fp16", 5, 10, 15, has_inf=True, nan="ieee", saturate_only=False),
        # LUQ radix-2 logarithmic 4-bit (1 sign + 3 exponent bits, no mantissa): E=0 is zero, E=1..7 are
        # 2^(E-3) = 0.25 .. 16. With mbits=0 the quantizer's subnormal path is exactly LUQ's stochastic
        # underflow (|x| < 0.25 -> 0 or 0.25, unbiased) and its normal path the unbiased rounding between
        # neighbouring powers of two. Scaling maps a tensor's amax to 16; the underflow threshold is amax/64.
        FloatFormat("log4", 3, 0, 3, has_inf=False, nan="none", saturate_only=True, has_subnormals=False),
        # LUQ's own radix-2 grid (Chmiel et al., ICLR 2023, and its reference code): underflow threshold
        # alpha = amax / 2^(2^3 - 1) = amax / 2^7 and the 8 powers alpha * 2^j, j = 0..7 (2^-3 .. 2^4 once
        # amax maps to 16), plus 0 from stochastic underflow. The same kernel paths as log4 with emin = -3:
        # |x| < 0.125 -> 0 or 0.125 (unbiased), above it unbiased rounding between neighbouring powers of two.
        FloatFormat("luq_log4", 3, 0, 3, has_inf=False, nan="none", saturate_only=True, has_subnormals=False,
                    zero_code=False),
        IntFormat("int8", 8),
        IntFormat("int4", 4),
    )
}


def get_format(name_or_fmt: "str | Format") -> Format:
    """Look up a format by name (or pass a format object through).

    Raises:
        ConfigError (a ValueError): unknown name; the message lists the allowed names.

    >>> get_format("fp8_e4m3").bias
    7
    """
    if isinstance(name_or_fmt, (FloatFormat, IntFormat)):
        return name_or_fmt
    try:
        return FORMATS[name_or_fmt]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ConfigError("fmt", name_or_fmt, tuple(FORMATS)) from None
