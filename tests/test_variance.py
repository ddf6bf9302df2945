"""Analytic quantization-error variance vs closed forms and a Monte Carlo estimate with the real quantizer."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from dpquant_sim.analysis import variance as V
from dpquant_sim.errors import ConfigError


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_uniform_grid_closed_forms(scale):
    # x uniform over whole cells of a uniform grid with step `scale`: stochastic rounding has
    # E[(x-lo)(hi-x)] = step^2/6 and round-to-nearest has step^2/12 (both classic closed forms).
    d = V.uniform(-100 * scale, 100 * scale)
    sr = V.error_variance(d, "int8", rounding="stochastic", scale=scale)
    rn = V.error_variance(d, "int8", rounding="nearest", scale=scale)
    assert sr.mse == pytest.approx(scale**2 / 6, rel=1e-9)
    assert rn.mse == pytest.approx(scale**2 / 12, rel=1e-9)
    assert sr.mean_error == pytest.approx(0.0, abs=1e-12)
    assert sr.saturation_prob == 0.0


def test_saturation_tail_closed_form():
    # Uniform on [127, 137] (all above int8's max 127): err = x - 127, E[err^2] = 10^2/3.
    r = V.error_variance(V.uniform(127.0, 137.0), "int8", rounding="nearest")
    assert r.mse == pytest.approx(100 / 3, rel=1e-6)
    assert r.saturation_prob == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "fp8_e4m3", "fp8_e5m2", "int8", "int4"])
def test_grid_matches_project_formats(fmt):
    from dpquant_sim.numerics.formats import get_format
    from dpquant_sim.numerics.quantize import quantize

    grid = V.representable_values(fmt)
    # Every grid value is a fixed point of the real quantizer and the max matches the format's max.
    q = quantize(torch.tensor(grid, dtype=torch.float32), fmt).double().numpy()
    np.testing.assert_array_equal(q, grid)
    assert grid[-1] == pytest.approx(float(get_format(fmt).max))


def _mc(x: torch.Tensor, fmt: str, scaling: str, rounding: str, g: torch.Generator) -> float:
    from dpquant_sim.numerics.scaling import quantize_scaled

    q = quantize_scaled(x, fmt, scaling, rounding=rounding, generator=g)
    return ((q.double() - x.double()) ** 2).mean().item()


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_fixed_scale_matches_monte_carlo(fmt, rounding, dist):
    g = torch.Generator().manual_seed(1)
    sigma = {"fp4_e2m1": 1.5, "fp8_e4m3": 40.0, "int8": 30.0}[fmt]
    n = 400_000
    if dist == "gaussian":
        x = torch.randn(n, generator=g, dtype=torch.float64) * sigma
        d = V.gaussian(sigma)
    else:
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        x = -sigma * torch.sign(u) * torch.log1p(-2 * u.abs())
        d = V.laplace(sigma)
    x = x.float()
    analytic = V.error_variance(d, fmt, rounding=rounding).mse
    mc = _mc(x, fmt, "none", rounding, g)
    assert analytic == pytest.approx(mc, rel=0.03)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaling", ["sample", "mx"])
def test_amax_scaling_matches_monte_carlo(fmt, rounding, scaling):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8000, 32, generator=g)
    rule = "amax" if scaling == "sample" else "mx"
    analytic = V.amax_scaled_error(V.gaussian(1.0), fmt, 32, rounding=rounding, scale_rule=rule, k=64).mse
    mc = _mc(x, fmt, scaling, rounding, g)
    assert analytic == pytest.approx(mc, rel=0.04)


def test_stochastic_is_worse_than_nearest_and_unbiased():
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        rn = V.amax_scaled_error(V.gaussian(1.0), fmt, 64, rounding="nearest")
        sr = V.amax_scaled_error(V.gaussian(1.0), fmt, 64, rounding="stochastic")
        assert sr.mse > rn.mse
        assert abs(sr.mean_error) < 1e-9


def test_heavier_tails_and_larger_groups_raise_relative_error():
    g = V.amax_scaled_error(V.gaussian(1.0), "fp4_e2m1", 256).relative_mse
    lap = V.amax_scaled_error(V.laplace(1.0), "fp4_e2m1", 256).relative_mse
    g16 = V.amax_scaled_error(V.gaussian(1.0), "fp4_e2m1", 16).relative_mse
    assert lap > g > g16


def test_bad_inputs():
    with pytest.raises(ConfigError, match="format"):
        V.representable_values("fp3")
    with pytest.raises(ConfigError, match="rounding"):
        V.error_variance(V.gaussian(), "fp4_e2m1", rounding="up")
    with pytest.raises(ConfigError, match="n="):
        V.amax_quantiles(V.gaussian(), 0)


def test_quantization_drop_pairs_by_seed():
    rows = []
    for seed, (base, q) in enumerate([(0.9, 0.8), (0.8, 0.75)]):
        for kind, acc, rec in (("fp32", base, "none"), ("static-all", q, "fp4")):
            for epoch in (0, 1):
                rows.append(
                    {"point_id": f"{kind}{seed}", "schedule_kind": kind, "seed": seed, "epoch": epoch,
                     "test_acc": acc if epoch == 1 else 0.1, "dataset": "d", "model": "m",
                     "noise_multiplier": 1.0, "recipe": rec}
                )
    out = V.quantization_drop(pd.DataFrame(rows))
    assert len(out) == 1
    assert out["drop_mean"].iloc[0] == pytest.approx((0.1 + 0.05) / 2)
    assert out["drop_std"].iloc[0] == pytest.approx(np.std([0.1, 0.05], ddof=1))
