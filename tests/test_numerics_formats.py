"""Format table and every code of every fp8/fp6/fp4 format, against ml_dtypes (independent oracle)."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.numerics import FORMATS, FloatFormat, IntFormat, get_format, quantize

from oracle import ORACLE, SMALL


def all_codes(name: str) -> np.ndarray:
    """float32 value of every bit pattern of a format, decoded by ml_dtypes (sub-byte types use the low bits)."""
    t = ORACLE[name]
    nbits = get_format(name).bits
    codes = np.arange(1 << nbits, dtype=np.uint16 if nbits > 8 else np.uint8)
    return codes.view(t).astype(np.float32)


@pytest.mark.parametrize("name", list(ORACLE))
def test_table_matches_ml_dtypes_finfo(name):
    f = get_format(name)
    fi = ml_dtypes.finfo(ORACLE[name])
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.ebits + f.mbits + 1 == fi.bits
    assert f.mbits == fi.nmant


def test_table_literal_values():
    # numbers written out from the OCP 8-bit / MX specs (not derived from the code)
    rows = {
        "fp8_e4m3": (7, 448.0, 2**-6, 2**-9),
        "fp8_e5m2": (15, 57344.0, 2**-14, 2**-16),
        "fp6_e2m3": (1, 7.5, 1.0, 0.125),
        "fp6_e3m2": (3, 28.0, 0.25, 0.0625),
        "fp4_e2m1": (1, 6.0, 1.0, 0.5),
        "bf16": (127, 3.3895313892515355e38, 2**-126, 2**-133),
        "fp16": (15, 65504.0, 2**-14, 2**-24),
    }
    for name, (bias, mx, mn, ms) in rows.items():
        f = get_format(name)
        assert (f.bias, f.max, f.min_normal, f.min_subnormal) == (bias, mx, mn, ms), name
    assert get_format("fp8_e4m3").nan == "all_ones" and not get_format("fp8_e4m3").has_inf
    assert get_format("fp8_e5m2").has_inf
    for name in ("fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "log4", "int8", "int4"):
        assert get_format(name).saturate_only, name
    assert get_format("fp4_e2m1").values().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", SMALL + ["bf16", "fp16"])
def test_values_are_ml_dtypes_finite_nonnegative_codes(name):
    v = all_codes(name)
    expect = np.unique(v[np.isfinite(v) & (v >= 0)])
    assert np.array_equal(get_format(name).values().numpy(), expect)


@pytest.mark.parametrize("name", SMALL + ["bf16", "fp16"])
@pytest.mark.parametrize("overflow", ["ieee", "saturate"])
def test_every_code_round_trips(name, overflow):
    v = all_codes(name)
    fin = np.isfinite(v)
    y = quantize(torch.from_numpy(v), name, overflow=overflow).numpy()
    assert np.array_equal(y[fin].view(np.uint32), v[fin].view(np.uint32))  # bit-exact, -0 included
    assert np.isnan(y[np.isnan(v)]).all()
    f = get_format(name)
    inf = np.isinf(v)
    if overflow == "ieee":
        assert np.array_equal(y[inf], v[inf])
    else:
        assert np.array_equal(y[inf], np.sign(v[inf]) * f.max)


def test_log4_values_and_int_grids():
    f = get_format("log4")
    assert f.values().tolist() == [0.0] + [2.0**e for e in range(-2, 5)]
    assert (f.max, f.min_normal, f.bits) == (16.0, 0.25, 4)
    assert get_format("int8").values().tolist() == list(range(128))
    assert get_format("int4").max == 7.0 and get_format("int8").max == 127.0
    assert isinstance(get_format("int4"), IntFormat) and isinstance(get_format("fp16"), FloatFormat)


def test_registry_and_errors():
    assert set(FORMATS) >= {"fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8", "int4",
                            "bf16", "fp16", "log4"}
    f = get_format("fp8_e4m3")
    assert get_format(f) is f
    with pytest.raises(ConfigError) as e:
        get_format("fp7")
    msg = str(e.value)
    assert "fmt" in msg and "'fp7'" in msg and "fp8_e4m3" in msg and "int4" in msg
    with pytest.raises(ValueError):
        get_format(None)
    with pytest.raises(AttributeError):  # frozen
        f.bias = 3  # type: ignore[misc]


def test_min_subnormal_formula():
    for f in FORMATS.values():
        if isinstance(f, FloatFormat) and f.has_subnormals:
            assert f.min_subnormal == math.ldexp(1.0, 1 - f.bias - f.mbits)
