"""LUQ recipes (``luq_fp4``, ``luq_fp4_batch``) against independent numpy references.

References are written here from the definitions (docs/formats.md "LUQ-FP4"), never by calling the code
under test: LUQ's radix-2 gradient grid (underflow threshold alpha = amax / 2^7, levels alpha * 2^j, j = 0..7,
plus 0; unbiased stochastic underflow and rounding between neighbouring powers of two) and SAWB's INT4
forward quantizer (c = 12.1 sqrt(E[x^2]) - 12.2 E|x|; signed -7..7 or unsigned 0..15 per group).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError, DPSafetyError
from dpquant_sim.nn.config import RECIPES, get_recipe, luq_recipe
from dpquant_sim.numerics import get_format, quantize, quantize_scaled
from dpquant_sim.numerics.scaling import sawb_clip
from dpquant_sim.numerics.spec import QuantSpec

LUQ = RECIPES["luq_fp4"]
GRAD = LUQ.grad
ACT = LUQ.activation


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- independent references (numpy)


def luq_neighbours(v: float, amax: float, levels: int = 8) -> tuple[float, float]:
    """The two grid values LUQ rounds |v| between: (lo, hi) with lo <= |v| <= hi; alpha = amax / 2^(levels-1).

    Below alpha: (0, alpha) (stochastic underflow). Between alpha * 2^j and alpha * 2^(j+1): those two. A value
    on the grid: (v, v)."""
    alpha = amax / 2.0 ** (levels - 1)
    a = abs(v)
    if a < alpha:
        return 0.0, alpha
    j = math.floor(math.log2(a / alpha))
    lo = alpha * 2.0**j
    return (lo, lo) if lo == a else (lo, min(2 * lo, amax))


def luq_up_probability(v: float, amax: float, levels: int = 8) -> float:
    """P(|q(v)| = hi): (|v| - lo) / (hi - lo); for 2^e <= x < 2^(e+1) that is (x - 2^e) / 2^e."""
    lo, hi = luq_neighbours(v, amax, levels)
    return 0.0 if hi == lo else (abs(v) - lo) / (hi - lo)


def sawb_reference(x: np.ndarray) -> np.ndarray:
    """SAWB INT4 of one group (float32 in and out): c from float64 moments; unsigned 0..15 if x >= 0, else
    signed -7..7; round half to even; c <= 0 falls back to amax."""
    xd = x.astype(np.float64)
    c = np.float32(12.1 * math.sqrt(np.mean(xd * xd)) - 12.2 * np.mean(np.abs(xd)))
    if not c > 0:
        c = np.float32(np.abs(x).max())
    if c == 0:  # an all-zero group stays as it is
        return x.astype(np.float32)
    top = np.float32(15.0 if x.min() >= 0 else 7.0)
    s = np.float32(top / c)
    return (np.rint(np.clip(x.astype(np.float32) * s, -top, top)) / s).astype(np.float32)


# ---------------------------------------------------------------- gradient format: value grid


def test_luq_log4_format_constants():
    f = get_format("luq_log4")
    assert (f.max, f.min_normal, f.bits) == (16.0, 0.125, 4)
    assert f.values().tolist() == [0.0] + [2.0**e for e in range(-3, 5)]
    assert get_format("log4").values().tolist() == [0.0] + [2.0**e for e in range(-2, 5)]


@pytest.mark.parametrize("fmt,levels", [("luq_log4", 8), ("log4", 7)])
def test_gradient_values_are_zero_or_amax_times_powers_of_two(fmt, levels):
    """Every output is 0 or +-amax_i * 2^-k, k = 0..levels-1, with amax_i the example's own amax."""
    g = gen(1)
    x = torch.randn(6, 3, 50, generator=g) * torch.logspace(-6, 3, 6).reshape(-1, 1, 1)
    x = x * torch.exp(2 * torch.randn(x.shape, generator=g))  # values spread over many binades
    spec = replace(GRAD, format=fmt)
    y = spec.apply(x, gen(2)).numpy().astype(np.float64)
    amax = np.abs(x.numpy()).reshape(6, -1).max(axis=1).astype(np.float64).reshape(-1, 1, 1)
    nz = y != 0
    k = -np.log2(np.abs(y[nz]) / np.broadcast_to(amax, y.shape)[nz])
    assert np.all(np.abs(k - np.rint(k)) < 1e-6), "a value off the radix-2 grid"
    assert set(np.rint(k).astype(int).tolist()) == set(range(levels))  # every level used, none beyond
    assert np.all(np.sign(y[nz]) == np.sign(x.numpy()[nz]))
    assert nz.sum() < y.size  # stochastic underflow produced zeros


# ---------------------------------------------------------------- unbiasedness and the underflow threshold

AMAX = 3.0
ALPHA = AMAX / 2**7
# below the threshold (several depths), at it, between powers, near the top
VALUES = [ALPHA * 0.01, ALPHA * 0.3, -ALPHA * 0.77, ALPHA, ALPHA * 1.5, -ALPHA * 5.3, AMAX * 0.26, AMAX * 0.51,
          -AMAX * 0.74, AMAX * 0.999]


@pytest.mark.parametrize("v", VALUES)
def test_gradient_rounding_is_unbiased_and_has_the_reference_distribution(v):
    n = 200_000
    x = torch.full((1, n + 1), v, dtype=torch.float32)
    x[0, 0] = AMAX  # fixes the example's scale
    y = GRAD.apply(x, gen(7))[0, 1:].double().numpy()
    v32 = float(np.float32(v))
    lo, hi = luq_neighbours(v32, AMAX)
    mags = np.unique(np.abs(y))
    np.testing.assert_allclose(mags, sorted({lo, hi}) if hi > lo else [lo], rtol=1e-6)
    assert np.all((y == 0) | (np.sign(y) == np.sign(v)))
    # P(up) matches the reference within 4 standard errors
    p = luq_up_probability(v32, AMAX)
    if hi > lo:
        up = np.mean(np.isclose(np.abs(y), hi, rtol=1e-6))
        assert abs(up - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (up, p)
    # unbiased: the mean is v within 4 standard errors (plus the float32 rounding of the scale)
    se = y.std() / math.sqrt(n)
    assert abs(y.mean() - v32) <= 4 * se + 1e-6 * abs(v32), (y.mean(), v32, se)


def test_underflow_threshold_is_amax_over_2_to_the_7():
    n = 20_000
    below, at = np.float32(ALPHA * 0.99), np.float32(ALPHA)
    x = torch.tensor([[AMAX] + [float(below)] * n + [float(at)] * n + [float(at) * 1.001] * n])
    y = GRAD.apply(x, gen(3))[0].double().numpy()
    yb, ya, yc = y[1:n + 1], y[n + 1:2 * n + 1], y[2 * n + 1:]
    np.testing.assert_allclose(np.unique(yb), [0.0, ALPHA], rtol=1e-6)  # below: 0 or alpha
    assert abs(np.mean(yb > 0) - 0.99) < 4 * math.sqrt(0.99 * 0.01 / n)  # p = |x| / alpha
    np.testing.assert_allclose(np.unique(ya), [ALPHA], rtol=1e-6)  # at: exactly alpha, never 0
    assert np.all(yc >= ALPHA * (1 - 1e-6))  # above: never underflows
    # the 4-bit-encodable option (log4): threshold amax / 2^6
    y6 = replace(GRAD, format="log4").apply(x, gen(3))[0].double().numpy()[1:n + 1]
    np.testing.assert_allclose(np.unique(y6), [0.0, 2 * ALPHA], rtol=1e-6)
    assert abs(np.mean(y6 > 0) - 0.5) < 4 * 0.5 / math.sqrt(n)


# ---------------------------------------------------------------- SAWB forward quantizer


def test_sawb_clip_matches_closed_form_gaussian_and_laplace():
    g = np.random.default_rng(0)
    n = 1_000_000
    gauss = g.standard_normal(n).astype(np.float32) * 2.0
    lap = g.laplace(0.0, 0.5, n).astype(np.float32)
    c_gauss = 2.0 * (12.1 - 12.2 * math.sqrt(2 / math.pi))  # E|x| = s sqrt(2/pi), E[x^2] = s^2
    c_lap = 0.5 * (12.1 * math.sqrt(2) - 12.2)  # E|x| = b, E[x^2] = 2 b^2
    assert c_gauss / 2 == pytest.approx(2.366, abs=1e-3)
    got_g = sawb_clip(torch.from_numpy(gauss).reshape(1, -1), 0).item()
    got_l = sawb_clip(torch.from_numpy(lap).reshape(1, -1), 0).item()
    assert got_g == pytest.approx(c_gauss, rel=5e-3)
    assert got_l == pytest.approx(c_lap, rel=1e-2)
    # and the quantizer's top level is the clip: the largest |output| is c (signed grid: 7 * c / 7)
    y = ACT.apply(torch.from_numpy(gauss).reshape(1, -1))
    assert y.abs().max().item() == pytest.approx(got_g, rel=1e-6)


@pytest.mark.parametrize("kind", ["gauss", "relu", "laplace", "constant", "one", "zeros"])
def test_sawb_quantizer_equals_reference_per_sample(kind):
    g = np.random.default_rng(1)
    x = g.standard_normal((5, 4, 9)).astype(np.float32) * np.logspace(-3, 3, 5, dtype=np.float32)[:, None, None]
    if kind == "relu":
        x = np.maximum(x, 0)
    elif kind == "laplace":
        x = g.laplace(0, 1, x.shape).astype(np.float32)
    elif kind == "constant":  # sqrt(E[x^2]) = E|x|: c < 0 -> amax fallback
        x = np.sign(x) * np.float32(0.3)
    elif kind == "one":
        x = x[:, :1, :1]
    elif kind == "zeros":
        x = np.zeros_like(x)
    got = ACT.apply(torch.from_numpy(x)).numpy()
    want = np.stack([sawb_reference(r) for r in x])
    np.testing.assert_array_equal(got, want)
    for row, r in zip(got, x):  # the grid: integers in -7..7 (signed) or 0..15 (unsigned) times c / top
        rd = r.astype(np.float64)
        c = 12.1 * math.sqrt(np.mean(rd * rd)) - 12.2 * np.mean(np.abs(rd))
        c = c if c > 0 else np.abs(rd).max()
        if c == 0:
            assert not row.any()
            continue
        top = 15 if r.min() >= 0 else 7
        k = row.astype(np.float64) * top / c
        assert np.all(np.abs(k - np.rint(k)) < 1e-4) and k.min() >= (0 if top == 15 else -7) - 1e-4
        assert k.max() <= top + 1e-4


def test_sawb_weights_per_channel_default_and_per_tensor_reachable():
    g = np.random.default_rng(2)
    w = (g.standard_normal((4, 3, 3, 3)) * np.array([1e-3, 1e-1, 1.0, 10.0]).reshape(-1, 1, 1, 1)).astype(np.float32)
    assert LUQ.weight.scaling == "channel" and LUQ.weight.clip == "sawb"
    got = LUQ.weight.apply(torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(got, np.stack([sawb_reference(c) for c in w]))
    per_tensor = RECIPES["luq_fp4_wtensor"].weight
    assert per_tensor.scaling == "tensor"
    assert luq_recipe("luq_fp4_wtensor", weight_scaling="tensor") == RECIPES["luq_fp4_wtensor"]
    got_t = per_tensor.apply(torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(got_t, sawb_reference(w))
    assert (got_t[0] == 0).all() and not (got[0] == 0).all()  # the small channel vanishes per tensor


def test_sawb_only_for_int4_and_tensor_channel_sample():
    with pytest.raises(ConfigError, match="format"):
        QuantSpec("int8", scaling="sample", clip="sawb")
    with pytest.raises(ConfigError, match="scaling"):
        QuantSpec("int4", scaling="mx", clip="sawb")
    with pytest.raises(ConfigError, match="clip"):
        QuantSpec("int4", clip="mse")


# ---------------------------------------------------------------- per-sample independence (the DP rule)


def _batch():
    g = gen(11)
    x = torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1e-4, 1.0, 1e3, 7.0]).reshape(-1, 1, 1, 1)
    x[3] = x[3].relu()  # one unsigned example among signed ones
    return x


def test_forward_example_alone_equals_its_row_in_the_batch():
    x = _batch()
    y = ACT.apply(x)
    for i in range(x.shape[0]):
        assert torch.equal(ACT.apply(x[i:i + 1])[0], y[i])


def test_gradient_row_does_not_depend_on_other_examples():
    """Same generator seed: example 2's quantized gradient is the same whatever the other examples are
    (scale per sample, random bits by position); under luq_fp4_batch it is not (teeth)."""
    x = _batch()
    x2 = x.clone()
    x2[[0, 1, 3]] = torch.randn(3, 3, 5, 5, generator=gen(12)) * 1e4
    for spec, same in ((GRAD, True), (RECIPES["luq_fp4_batch"].grad, False),
                       (ACT, True), (RECIPES["luq_fp4_batch"].activation, False)):
        a, b = spec.apply(x, gen(5))[2], spec.apply(x2, gen(5))[2]
        assert torch.equal(a, b) == same, spec


# ---------------------------------------------------------------- eager vs compiled: bit for bit


def test_eager_equals_integer_kernel_luq_log4():
    """The eager path (blocked integer kernel, in-place RNG) equals the kernel the compiled backend runs."""
    from dpquant_sim.numerics.quantize import _eager, _kernel, _overflow_code, _params

    x = torch.randn(70_000, generator=gen(4)) * torch.exp(3 * torch.randn(70_000, generator=gen(5)))
    f = get_format("luq_log4")
    args = (*_params(f), _overflow_code(f, "saturate"))
    for seed in (None, torch.tensor([7, 8]), torch.tensor([(1 << 32) - 50_000, 9])):
        assert torch.equal(_kernel(x, seed, *args).view(torch.int32), _eager(x, seed, *args).view(torch.int32))


@pytest.mark.slow  # a cold torch.compile of each variant takes seconds
@pytest.mark.parametrize("role", ["grad", "activation", "weight"])
def test_compiled_backend_is_bit_identical(role):
    spec = getattr(LUQ, role)
    x = _batch() * torch.exp(2 * torch.randn(4, 3, 5, 5, generator=gen(6)))
    x = torch.cat([x] * 900)  # > 64k elements
    kw = dict(rounding=spec.rounding, overflow=spec.overflow, clip=spec.clip)
    a = quantize_scaled(x, spec.format, spec.scaling, backend="torch", generator=gen(3), **kw)
    b = quantize_scaled(x, spec.format, spec.scaling, backend="compiled", generator=gen(3), **kw)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    raw = quantize(x.reshape(-1) * 1e-3, "luq_log4", rounding="stochastic", generator=gen(9), backend="compiled")
    assert torch.equal(raw, quantize(x.reshape(-1) * 1e-3, "luq_log4", rounding="stochastic", generator=gen(9),
                                     backend="torch"))


# ---------------------------------------------------------------- recipes: hardware classes, DP refusal


def test_gemm_hardware_classes_and_cost_model():
    from torch import nn

    from dpquant_sim.cost.flops import gemm_layer_ops
    from dpquant_sim.nn.shapes import trace_layers

    assert LUQ.gemm_precisions() == ("int4", "fp4", "fp4")  # SAWB INT4 forward; FP4 (radix-2) backward
    assert RECIPES["luq_fp4_batch"].gemm_precisions() == ("int4", "fp4", "fp4")
    (s,) = trace_layers(nn.Sequential(nn.Linear(64, 32, bias=False)), (64,))
    prec = {o.op: o.precision for o in gemm_layer_ops(s, 8, "luq_fp4") if o.kind == "gemm"}
    assert prec["fwd"] == "int4" and prec["wgrad"] == "fp4"


def test_luq_fp4_batch_is_refused_under_dp_with_the_reason(tmp_path):
    from dpquant_sim.training import TrainConfig
    from dpquant_sim.training.engine import train

    base = dict(dataset="digits", model="mlp", epochs=1, recipe="luq_fp4_batch", schedule={"kind": "static-all"})
    with pytest.raises(DPSafetyError) as e:
        TrainConfig.parse({**base, "epsilon": 8.0})
    msg = str(e.value)
    assert "luq_fp4_batch" in msg and "whole batch" in msg and "'luq_fp4'" in msg and "\n" not in msg
    assert "sensitivity" in msg
    # a config built without parse is refused at train() start, before anything is written
    cfg = TrainConfig.model_validate({**base, "epsilon": 8.0})
    with pytest.raises(DPSafetyError):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert TrainConfig.parse({**base, "private": False}).recipe == "luq_fp4_batch"
    assert TrainConfig.parse({**base, "recipe": "luq_fp4", "epsilon": 8.0}).recipe == "luq_fp4"
    get_recipe("luq_fp4").check_dp_safe()  # no error


def test_luq_fp4_batch_trains_non_private(tmp_path):
    from dpquant_sim.training.engine import train

    res = train(dict(dataset="digits", model="mlp", epochs=1, private=False, recipe="luq_fp4_batch", lr=0.1,
                     batch_size=64, n_train=256, n_test=64, schedule={"kind": "static-all"}),
                tmp_path / "run", progress=False)
    assert math.isfinite(res.summary["test_acc"]) and res.summary["mean_quantized_flop_share"] == 1.0


def test_cli_refuses_luq_fp4_batch_under_dp_in_one_line(capsys, tmp_path):
    from dpquant_sim.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--epsilon", "8",
              "--recipe", "luq_fp4_batch", "--schedule", "static-all", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "luq_fp4_batch" in err and "'luq_fp4'" in err and "--non-private" in err
    assert not out.exists()
