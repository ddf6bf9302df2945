"""Proposition 1 per recipe: exact quantization error against closed forms and the engine's quantizer (Monte
Carlo with a stated tolerance), and the fitted law against the closed form for stochastic rounding on a
uniform grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpquant_sim.analysis import variance_law as L
from dpquant_sim.errors import ConfigError
from dpquant_sim.nn.config import RECIPES, get_recipe
from dpquant_sim.numerics.spec import QuantSpec


def _uniform_grid_row(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A row whose amax is exactly 127 (so int8 per-sample scaling has step 1) and whose other elements are
    k + u with k integer, u in (0, 1): stochastic rounding has E[(q - x)^2] = u (1 - u) (closed form)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(-126, 126, n)
    u = rng.uniform(0.01, 0.99, n)
    x = (k + u).astype(np.float32)
    u = x.astype(np.float64) - np.floor(x.astype(np.float64))  # the float32 value's own fractional part
    x[0], u[0] = 127.0, 0.0
    return torch.from_numpy(x), u


@pytest.mark.parametrize("scaling", ["sample", "tensor", "mx"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_exact_error_closed_form_uniform_grid(scaling, rounding):
    x, u = _uniform_grid_row(500, 1)
    spec = QuantSpec("int8", scaling=scaling, rounding=rounding)
    got = L.expected_sq_error(x[None, :], spec)[0]
    want = u * (1 - u) if rounding == "stochastic" else np.minimum(u, 1 - u) ** 2
    if scaling == "mx":  # blocks of 32 with E8M0 scale 2^(floor(log2 amax) - 6): step 1 only in block 0
        got, want = got[:32], want[:32]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_exact_error_scales_with_the_step():
    # Scaling x by 2^k scales the error by 4^k (sample scale rule is homogeneous); a zero row has no error.
    x, _ = _uniform_grid_row(300, 2)
    spec = get_recipe("int8").grad
    e1 = L.expected_sq_error(x[None, :], spec)
    e2 = L.expected_sq_error(8 * x[None, :], spec)
    np.testing.assert_allclose(e2, 64 * e1, rtol=1e-9)
    assert L.expected_sq_error(torch.zeros(2, 5), spec).sum() == 0.0


def _mc_check(x: torch.Tensor, spec: QuantSpec, *, conv: bool, weight: bool) -> None:
    exact = L.expected_sq_error(x, spec, conv=conv, weight=weight)
    draws = 8
    g = torch.Generator().manual_seed(3)
    from dpquant_sim.nn.layers import quantize_data, quantize_weight

    fn = quantize_weight if weight else quantize_data
    samples = torch.stack([(fn(x, spec, g, conv=conv).double() - x.double()) ** 2 for _ in range(draws)])
    mc = samples.mean().item()
    if spec.rounding == "nearest":  # deterministic: exact agreement up to the float32 rounding of the scale
        assert mc == pytest.approx(exact.mean(), rel=2e-3, abs=1e-12)
        return
    # Monte Carlo tolerance: 5 standard errors of the mean over elements x draws (plus 0.5% for the scale's
    # float32 rounding, which moves grid points by up to 1 ulp).
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(mc - exact.mean()) <= 5 * se + 5e-3 * exact.mean()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("role", ["grad", "activation", "weight"])
def test_exact_error_matches_engine_quantizer_linear(recipe, role):
    spec = getattr(get_recipe(recipe), role)
    try:
        L.expected_sq_error(torch.zeros(1, 4), spec)
    except ConfigError:
        pytest.skip(f"{recipe} {role}: scale rule {spec.scaling!r} has no exact reference")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 96, generator=g) * torch.logspace(-2, 1, 16)[:, None]
    x[:, 5] *= 30  # an outlier per row
    _mc_check(x, spec, conv=False, weight=role == "weight")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("role", ["grad", "weight"])
def test_exact_error_matches_engine_quantizer_conv_layout(recipe, role):
    # Conv operands: block scalings run along channels (NHWC), which the reference re-derives on its own.
    spec = getattr(get_recipe(recipe), role)
    try:
        L.expected_sq_error(torch.zeros(1, 4), spec)
    except ConfigError:
        pytest.skip(f"{recipe} {role}: no exact reference")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 48, 3, 3, generator=g) * torch.rand(6, 48, 1, 1, generator=g) * 4
    _mc_check(x, spec, conv=True, weight=role == "weight")


def test_fit_power_law_recovers_exponent_and_constant():
    s = np.logspace(0, 3, 20)
    b, se, c = L.fit_power_law(s, 0.37 * s**0.6)
    assert b == pytest.approx(0.6, abs=1e-9) and c == pytest.approx(0.37, rel=1e-9) and se < 1e-9
    assert math.isnan(L.fit_power_law([1.0, 2.0], [1.0, 2.0])[0])  # too few points


def test_int8_follows_proposition_1_with_the_closed_form_constant():
    # Stochastic rounding on a uniform grid of step D = ||x||_inf / 127, elements spread over many steps:
    # E[err^2] = D^2 / 6 per element, so v = spread / (6 127^2): exponent 1, constant 1 / (6 127^2).
    pts = L.law_points(["int8"], families=("outlier", "contaminated"), points=8, draws=4)
    fit = L.fit_law(pts).iloc[0]
    assert fit["exponent"] == pytest.approx(1.0, abs=0.02)
    assert fit["constant"] == pytest.approx(1 / (6 * 127**2), rel=0.05)
    assert bool(fit["follows"])


def test_law_names_the_violators():
    # fp8 (e5m2 gradients) has relative, not max-scaled, error in its normal range and MX scales per block:
    # neither grows with the sample's inf-norm; int4 does (uniform grid).
    pts = L.law_points(["fp8", "mxfp4", "int4"], points=8, draws=2)
    fits = L.fit_law(pts).set_index("recipe")
    assert not fits.loc["fp8", "follows"] and abs(fits.loc["fp8", "exponent"]) < 0.3
    assert not fits.loc["mxfp4", "follows"] and fits.loc["mxfp4", "exponent"] < 0.4
    assert fits.loc["int4", "follows"]
    # the realized (engine) and exact errors agree point by point within Monte Carlo noise
    ok = pts["v_exact"].notna()
    ratio = (pts.loc[ok, "v"] / pts.loc[ok, "v_exact"]).to_numpy()
    assert np.median(np.abs(ratio - 1)) < 0.05


def test_spread_inputs_cover_a_range_of_spreads():
    for fam in L.FAMILIES:
        x = L.spread_inputs(fam, n=512, points=6, reps=3, seed=0).double()
        assert x.shape == (18, 512)
        spread = (x.abs().amax(1) ** 2 / x.pow(2).mean(1)).reshape(6, 3).mean(1)
        assert spread[-1] > 4 * spread[0]
    torch.testing.assert_close(L.spread_inputs("outlier", seed=4), L.spread_inputs("outlier", seed=4))


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="family"):
        L.spread_inputs("cauchy")
    with pytest.raises(ConfigError, match="role"):
        L.law_points(["fp8"], roles=("bias",))
    with pytest.raises(ConfigError, match="draws"):
        L.realized_sq_error(torch.ones(2, 2), get_recipe("fp8").grad, draws=0)
    with pytest.raises(ConfigError, match="recipe"):
        L.law_points(["fp3"])
