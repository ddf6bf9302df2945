"""quantize() against ml_dtypes and torch's native float8 casts, bit for bit, on dense float32 sweeps.

Oracle conventions (checked in test_oracle_overflow_conventions):
* ml_dtypes casts are IEEE-like: e5m2/fp16/bf16 overflow -> +-inf, e4m3fn overflow -> NaN, fp6/fp4 saturate;
  ml_dtypes maps NaN to -0/+0 for fp6/fp4 (no NaN code) where we keep NaN, so NaN inputs are excluded there.
* torch's native float8 casts: float8_e4m3fn saturates (overflow and +-inf -> +-448),
  float8_e5m2 is IEEE (-> +-inf).
"""

import importlib
import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.numerics import get_format, quantize

from oracle import ORACLE
NO_NAN = {"fp6_e2m3", "fp6_e3m2", "fp4_e2m1"}


def decode_all(name):
    nbits = get_format(name).bits
    codes = np.arange(1 << nbits, dtype=np.uint16 if nbits > 8 else np.uint8)
    return codes.view(ORACLE[name]).astype(np.float32)


def sweep(name):
    """Every representable value, every midpoint (tie) between neighbours, +-1 and +-2 float32 ulps around both,
    the overflow region, float32 subnormals, -0, +-inf and NaN; both signs."""
    v = decode_all(name)
    pos = np.unique(v[np.isfinite(v) & (v >= 0)]).astype(np.float64)
    mx = pos[-1]
    step = pos[-1] - pos[-2]
    # neighbours above max: the "virtual" next values, to probe rounding into overflow
    virt = mx + step * np.arange(1, 5)
    grid = np.concatenate([pos, virt, [2 * mx, 4 * mx]])
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32 for every format here
    with np.errstate(over="ignore"):  # bf16: 2*max and beyond are inf in float32
        pts = np.concatenate([grid, mids]).astype(np.float32)
    near = [pts]
    for k in (1, 2):
        up, dn = pts.copy(), pts.copy()
        for _ in range(k):
            up = np.nextafter(up, np.float32(np.inf))
            dn = np.nextafter(dn, np.float32(0))
        near += [up, dn]
    special = np.array(
        [0.0, np.inf, np.nan, 1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 3.4028235e38, 1e30, 1e-30],
        dtype=np.float32,
    )
    f32sub = (np.random.default_rng(1).integers(1, 1 << 23, 2000, dtype=np.uint32)).view(np.float32)
    x = np.concatenate(near + [special, f32sub])
    return np.concatenate([x, -x])


def random_bits(n=400_000, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    x = b.view(np.float32)
    # plus random patterns concentrated on the exponents that matter for small formats (2^-30 .. 2^30)
    e = rng.integers(127 - 30, 127 + 30, n, dtype=np.uint32)
    m = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    s = rng.integers(0, 2, n, dtype=np.uint32) << np.uint32(31)
    return np.concatenate([x, (s | (e << np.uint32(23)) | m).view(np.float32)])


def same_bits(got, ref, x):
    """Bitwise equality, NaN == NaN (any payload). Returns the offending inputs for the message."""
    ok = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    return x[~ok], got[~ok], ref[~ok]


def ml_cast(x, name):
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ORACLE[name]).astype(np.float32)


@pytest.mark.parametrize("name", list(ORACLE))
@pytest.mark.parametrize("source", ["sweep", "random"])
def test_matches_ml_dtypes_ieee(name, source):
    x = sweep(name) if source == "sweep" else random_bits()
    if name in NO_NAN:
        x = x[~np.isnan(x)]
    got = quantize(torch.from_numpy(x), name, overflow="ieee").numpy()
    bad = same_bits(got, ml_cast(x, name), x)
    assert bad[0].size == 0, f"{name}: x={bad[0][:8]} got={bad[1][:8]} ml_dtypes={bad[2][:8]}"


@pytest.mark.parametrize("name", list(ORACLE))
def test_saturate_is_ml_dtypes_clamped(name):
    """overflow='saturate': ml_dtypes' result with every overflow (inf, or NaN from a non-NaN input) -> +-max."""
    x = sweep(name)
    if name in NO_NAN:
        x = x[~np.isnan(x)]
    ref = ml_cast(x, name)
    mx = np.float32(get_format(name).max)
    ovf = (np.isinf(ref) | np.isnan(ref)) & ~np.isnan(x)
    ref = np.where(ovf, np.copysign(mx, x), ref).astype(np.float32)
    got = quantize(torch.from_numpy(x), name, overflow="saturate").numpy()
    bad = same_bits(got, ref, x)
    assert bad[0].size == 0, f"{name}: x={bad[0][:8]} got={bad[1][:8]} ref={bad[2][:8]}"


@pytest.mark.parametrize("source", ["sweep", "random"])
def test_matches_torch_native_float8(source):
    for name, tdt, overflow in [("fp8_e4m3", torch.float8_e4m3fn, "saturate"), ("fp8_e5m2", torch.float8_e5m2, "ieee")]:
        x = sweep(name) if source == "sweep" else random_bits(seed=3)
        xt = torch.from_numpy(x)
        ref = xt.to(tdt).to(torch.float32).numpy()
        got = quantize(xt, name, overflow=overflow).numpy()
        bad = same_bits(got, ref, x)
        assert bad[0].size == 0, f"{name}: x={bad[0][:8]} got={bad[1][:8]} torch={bad[2][:8]}"


def test_oracle_overflow_conventions():
    """The conventions the tests above rely on (if an oracle changes, this says so first)."""
    big = np.array([1e6, np.inf, 465.0, 464.0], dtype=np.float32)
    assert np.isnan(ml_cast(big, "fp8_e4m3")[:3]).all() and ml_cast(big, "fp8_e4m3")[3] == 448
    assert np.isinf(ml_cast(big[:2], "fp8_e5m2")).all()
    assert (ml_cast(big, "fp4_e2m1") == 6).all()
    t = torch.from_numpy(big)
    assert (t.to(torch.float8_e4m3fn).float() == 448).all()
    assert torch.isinf(t[:2].to(torch.float8_e5m2).float()).all()


def test_hand_picked_values():
    q = lambda v, f, **k: quantize(torch.tensor(v, dtype=torch.float32), f, **k).tolist()  # noqa: E731
    assert q([1.25, 1.75, 2.5, 5.0, 7.0, -0.25, -0.26], "fp4_e2m1") == [1.0, 2.0, 2.0, 4.0, 6.0, -0.0, -0.5]
    assert q([464.0, 465.0, -1e9], "fp8_e4m3") == [448.0, 448.0, -448.0]
    assert q([2.0**-10, 3 * 2.0**-11], "fp8_e4m3") == [0.0, 2.0**-9]  # tie to even 0, then above half
    assert q([61439.0, 61440.0], "fp8_e5m2", overflow="ieee") == [57344.0, float("inf")]
    neg0 = quantize(torch.tensor([-0.0, -1e-30]), "fp8_e4m3")
    assert torch.equal(neg0.view(torch.int32), torch.tensor([-0.0, -0.0]).view(torch.int32))


def test_int_formats_against_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-300, 300, 100_000), np.arange(-140, 140, 0.5), [126.5, 127.49, 127.5, 1e9, -np.inf, np.inf],
    ]).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    for name, qmax in [("int8", 127), ("int4", 7)]:
        ref = np.clip(np.round(x), -qmax, qmax).astype(np.float32)  # np.round: half to even
        ref = np.where(ref == 0, np.copysign(np.float32(0), x), ref)
        got = quantize(torch.from_numpy(x), name).numpy()
        bad = same_bits(got, ref, x)
        assert bad[0].size == 0, f"{name}: x={bad[0][:8]} got={bad[1][:8]} ref={bad[2][:8]}"
        assert np.isnan(quantize(torch.tensor([np.nan]), name).numpy()).all()


def test_log4_nearest():
    x = torch.tensor([0.0, 0.1, 0.13, 0.3, 0.37, 0.375, 0.38, 5.0, 6.0, 7.0, 100.0, -3.0])
    # -3 is a tie between 2 (exponent code 4, even) and 4 (code 5): -2; ties between 2^e and 2^(e+1) (at 1.5 * 2^e) go to the even exponent code; 0.125 = half of 0.25 -> 0
    assert quantize(x, "log4").tolist() == [0.0, 0.0, 0.25, 0.25, 0.25, 0.5, 0.5, 4.0, 8.0, 8.0, 16.0, -2.0]


def test_log4_nearest_against_brute_force():
    """Independent reference: nearest of the 15 log4 values by distance; ties to the even exponent code."""
    grid = np.array([0.0] + [2.0**e for e in range(-2, 5)])  # index == exponent code E
    rng = np.random.default_rng(2)
    a = np.concatenate([np.exp(rng.uniform(-6, 4, 50_000)), (grid[:-1] + grid[1:]) / 2, grid, [17.0, 1e6]])
    x = np.concatenate([a, -a]).astype(np.float32)
    d = np.abs(np.abs(x)[:, None].astype(np.float64) - grid[None, :])
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    idx = np.where(cand.sum(1) > 1, np.argmax(cand & (np.arange(8) % 2 == 0), axis=1), np.argmax(cand, axis=1))
    ref = np.copysign(grid[idx], x).astype(np.float32)
    got = quantize(torch.from_numpy(x), "log4").numpy()
    bad = same_bits(got, ref, x)
    assert bad[0].size == 0, f"x={bad[0][:8]} got={bad[1][:8]} ref={bad[2][:8]}"


def test_non_float32_inputs_and_shapes():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = quantize(x, "fp8_e4m3")
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, quantize(x.float(), "fp8_e4m3"))
    xt = torch.randn(6, 7).t()  # non-contiguous
    assert torch.equal(quantize(xt, "fp6_e2m3"), quantize(xt.contiguous(), "fp6_e2m3"))
    assert quantize(torch.empty(0, 3), "fp4_e2m1").shape == (0, 3)
    assert quantize(torch.tensor(1.3), "fp4_e2m1").item() == 1.5


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(fmt="fp9"), "fmt", "fp8_e4m3"),
        (dict(rounding="up"), "rounding", "stochastic"),
        (dict(overflow="wrap"), "overflow", "saturate"),
        (dict(backend="cuda"), "backend", "compiled"),
        (dict(rounding="stochastic"), "generator", "torch.Generator"),
    ],
)
def test_errors_name_argument_value_and_allowed(kwargs, field, allowed):
    kw = dict(fmt="fp8_e4m3")
    kw.update(kwargs)
    fmt = kw.pop("fmt")
    with pytest.raises(ValueError) as e:
        quantize(torch.ones(3), fmt, **kw)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and field in msg and allowed in msg
    bad = list(kwargs.values())[0]
    assert repr(bad) in msg or field == "generator"


def test_non_float_tensor_error():
    for bad in (torch.ones(3, dtype=torch.int32), torch.ones(2, dtype=torch.bool)):
        with pytest.raises(ValueError) as e:
            quantize(bad, "fp8_e4m3")
        assert "x" in str(e.value) and str(bad.dtype) in str(e.value) and "floating" in str(e.value)
    with pytest.raises(ValueError, match="Tensor"):
        quantize([1.0, 2.0], "fp8_e4m3")  # type: ignore[arg-type]


# ---------------------------------------------------------------- stochastic rounding


def neighbours(x: np.ndarray, name: str):
    """(lo, hi): the representable values bracketing |x| (from ml_dtypes' value set), with x's sign."""
    v = decode_all(name)
    grid = np.unique(np.abs(v[np.isfinite(v)])).astype(np.float64)
    a = np.abs(x).astype(np.float64)
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 1)
    lo = grid[i]
    hi = grid[np.minimum(i + 1, len(grid) - 1)]
    hi = np.where(a >= grid[-1], grid[-1], hi)  # above max: saturate
    lo = np.where(a >= grid[-1], grid[-1], lo)
    return np.copysign(lo, x), np.copysign(hi, x)


@pytest.mark.parametrize("name", list(ORACLE))
def test_stochastic_is_one_of_two_neighbours(name):
    x = sweep(name)
    x = x[np.isfinite(x)]
    g = torch.Generator().manual_seed(0)
    y = quantize(torch.from_numpy(x), name, rounding="stochastic", generator=g).numpy().astype(np.float64)
    lo, hi = neighbours(x, name)
    ok = (y == lo) | (y == hi)
    assert ok.all(), f"x={x[~ok][:5]} y={y[~ok][:5]} lo={lo[~ok][:5]} hi={hi[~ok][:5]}"
    # exact values never move
    exact = lo == x
    assert (y[exact] == x[exact]).all()


@pytest.mark.parametrize(
    "name, x",
    [
        ("fp8_e4m3", 1.0 + 1 / 32),    # normal range, 1/4 of the way from 1 to 1.125
        ("fp8_e4m3", -3 * 2.0**-12),   # subnormal range: 0.375 of the way from 0 to 2^-9
        ("fp4_e2m1", 5.3),             # between 4 and 6
        ("fp6_e3m2", 0.1),             # subnormal: between 0.0625 and 0.125
        ("bf16", 1.0 + 2.0**-10),      # 1/8 of a bf16 ulp
        ("fp16", 3e-7),                # fp16 subnormal range
        ("int8", 2.3),
        ("log4", 0.05),                # stochastic underflow: 0 or 0.25
        ("log4", 3.0),                 # between 2 and 4 (unbiased, not log-space)
        ("luq_log4", 0.05),            # stochastic underflow: 0 or 0.125
        ("luq_log4", 0.2),             # between 0.125 and 0.25
    ],
)
def test_stochastic_unbiased(name, x):
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    y = quantize(torch.full((n,), x), name, rounding="stochastic", generator=g).double()
    vals = torch.unique(y)
    assert len(vals) == 2, vals
    se = y.std().item() / n**0.5
    assert abs(y.mean().item() - np.float32(x)) < 5 * se, (y.mean().item(), x, se)


def test_stochastic_deterministic_per_seed():
    x = torch.randn(10_000)
    q = lambda s: quantize(x, "fp4_e2m1", rounding="stochastic", generator=torch.Generator().manual_seed(s))  # noqa
    assert torch.equal(q(7), q(7))
    assert not torch.equal(q(7), q(8))
    g = torch.Generator().manual_seed(7)
    a = quantize(x, "fp4_e2m1", rounding="stochastic", generator=g)
    b = quantize(x, "fp4_e2m1", rounding="stochastic", generator=g)  # generator advanced: new draw
    assert not torch.equal(a, b) and torch.equal(a, q(7))


def test_stochastic_neighbours_independent_across_elements():
    """Adjacent elements' rounding decisions are uncorrelated (the RNG is a per-element hash)."""
    n = 200_000
    y = quantize(torch.full((n,), 1.5 + 0.25), "fp4_e2m1", rounding="stochastic",
                 generator=torch.Generator().manual_seed(5))  # between 1.5 and 2: p = 0.5
    b = (y == 2.0).double()
    assert abs(b.mean().item() - 0.5) < 5 * 0.5 / n**0.5
    corr = torch.corrcoef(torch.stack([b[:-1], b[1:]]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5


# ---------------------------------------------------------------- torch.compile fast path


@pytest.mark.slow  # a cold torch.compile takes 5-17 s per variant on 2 cores
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_compiled_backend_is_bit_identical(rounding):
    x = torch.from_numpy(np.concatenate([sweep("fp8_e4m3"), random_bits(50_000)]))
    kw = dict(overflow="ieee", rounding=rounding)
    a = quantize(x, "fp8_e4m3", backend="torch", generator=torch.Generator().manual_seed(3), **kw)
    b = quantize(x, "fp8_e4m3", backend="compiled", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ORACLE) + ["int8", "log4", "luq_log4"])
def test_compiled_backend_all_formats(name):
    x = torch.from_numpy(np.concatenate([sweep("fp8_e4m3"), random_bits(50_000)]))
    for rounding in ("nearest", "stochastic"):
        for overflow in ("saturate", "ieee"):
            kw = dict(overflow=overflow, rounding=rounding)
            a = quantize(x, name, backend="torch", generator=torch.Generator().manual_seed(3), **kw)
            b = quantize(x, name, backend="compiled", generator=torch.Generator().manual_seed(3), **kw)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, kw)


# ---------------------------------------------------------------- eager backend (blocked, magic-number nearest)


def _isolated_specials(n=70_000):
    """randn with lone NaNs of every kind (quiet, signalling, both signs, odd payloads), +-inf and -0 at spread
    positions, so that some eager blocks hold a single special value among finite ones."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(4)) * 3
    pats = [0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FBFFFFF, -1, -0x7FFFFF, -0x400000, 0x7F800000, -0x800000, -(1 << 31)]
    pos = torch.arange(len(pats)) * 7001 + 13
    x.view(torch.int32)[pos] = torch.tensor(pats, dtype=torch.int32)
    return x, pos


@pytest.mark.parametrize("name", list(ORACLE) + ["int8", "int4", "log4", "luq_log4"])
def test_eager_keeps_nan_bits_and_signed_zero(name):
    """NaN input comes back bit for bit (payload and sign, signalling ones too), -0 stays -0, in every path."""
    x, pos = _isolated_specials()
    nan = torch.isnan(x)
    for rounding in ("nearest", "stochastic"):
        for overflow in ("saturate", "ieee"):
            y = quantize(x, name, rounding=rounding, overflow=overflow, generator=torch.Generator().manual_seed(0))
            assert torch.equal(y.view(torch.int32)[nan], x.view(torch.int32)[nan]), (name, rounding, overflow)
            assert y.view(torch.int32)[pos[-1]].item() == -(1 << 31)  # -0.0


def test_eager_returns_row_major_strides_like_the_kernel():
    """A 1-channel NCHW batch can be contiguous with channels-last strides (64, 1, 8, 1); the result must have
    the default strides (64, 64, 8, 1), as the integer kernel's elementwise ops return: a convolution fed the
    other layout takes its channels-last path, whose float rounding differs, so training results would depend
    on the backend."""
    from dpquant_sim.numerics.quantize import _eager, _kernel, _overflow_code, _params

    x = torch.randn(4, 8, 8, 1, generator=torch.Generator().manual_seed(0)).permute(0, 3, 1, 2)
    assert x.is_contiguous() and x.stride() == (64, 1, 8, 1)
    f = get_format("fp4_e2m1")
    args = (*_params(f), _overflow_code(f, "saturate"))
    for seed in (None, torch.tensor([7, 8])):
        assert _eager(x, seed, *args).stride() == _kernel(x, seed, *args).stride() == (64, 64, 8, 1)
    assert quantize(x, "fp4_e2m1").stride() == (64, 64, 8, 1)


@pytest.mark.parametrize("name", list(ORACLE) + ["int8", "int4", "log4", "luq_log4"])
def test_eager_equals_integer_kernel(name):
    """The eager paths (float magic number, bf16 pattern rounding, blocked integer kernel with in-place RNG)
    equal the reference integer kernel that the compiled backend runs, across block boundaries and for a
    random-index counter that wraps past 2^32 inside a block."""
    from dpquant_sim.numerics.quantize import _eager, _kernel, _overflow_code, _params

    x, _ = _isolated_specials()
    x = torch.cat([x, torch.from_numpy(random_bits(40_000, seed=5)), torch.from_numpy(sweep(name if name in ORACLE else "fp8_e4m3"))])
    f = get_format(name)
    for overflow in ("saturate", "ieee"):
        for seed in (None, torch.tensor([7, 8]), torch.tensor([(1 << 32) - 50_000, 9])):
            args = (*_params(f), _overflow_code(f, overflow))
            a, b = _kernel(x, seed, *args), _eager(x, seed, *args)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, overflow, seed)


# ---------------------------------------------------------------- the "auto" default backend


def test_auto_backend_compiles_only_large_tensors(monkeypatch):
    qm = importlib.import_module("dpquant_sim.numerics.quantize")  # the package re-exports the function

    assert qm.BACKENDS[0] == "auto"
    small = torch.zeros(qm.AUTO_COMPILE_MIN_NUMEL - 1)
    large = torch.zeros(qm.AUTO_COMPILE_MIN_NUMEL)
    assert qm.auto_backend(small) == "torch" and qm.auto_backend(large) == "compiled"
    monkeypatch.setattr(qm, "_compile_failed", True)  # no compiler: auto stays correct, eager
    assert qm.auto_backend(large) == "torch"


def test_auto_backend_routes_and_gives_the_same_bits(monkeypatch):
    """auto == eager bit for bit on both sides of the threshold; the large tensor goes through the compiled
    path (stubbed here with the reference integer kernel it compiles, so no test pays a cold compile)."""
    qm = importlib.import_module("dpquant_sim.numerics.quantize")  # the package re-exports the function

    calls = []

    def fake_compiled(key):
        mbits, emin_f, max_bits, qsub_exp, ovf, _ = key
        calls.append(key)
        return lambda x, seed: qm._kernel(x, seed, mbits, emin_f, max_bits, qsub_exp, ovf)

    monkeypatch.setattr(qm, "_get_compiled", fake_compiled)
    monkeypatch.setattr(qm, "AUTO_COMPILE_MIN_NUMEL", 4096)
    for n in (100, 5000):
        x = torch.randn(n) * 30
        for rounding in ("nearest", "stochastic"):
            a = quantize(x, "fp8_e5m2", rounding=rounding, backend="auto", generator=torch.Generator().manual_seed(2))
            b = quantize(x, "fp8_e5m2", rounding=rounding, backend="torch", generator=torch.Generator().manual_seed(2))
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert len(calls) == 2  # only the 5000-element tensor, once per rounding
