"""PrivacyLedger and noise calibration against closed forms and independent accountants.

References:
* RDP of the (un-subsampled) Gaussian mechanism: order a -> a / (2 sigma^2) per use (Mironov 2017), converted
  to (eps, delta) with the conversion Opacus uses (Balle et al. 2020, Prop. 12), written out here by hand.
* The exact (eps, delta) curve of T compositions of the Gaussian mechanism = one Gaussian with
  mu = sqrt(T) / sigma (Balle & Wang 2018): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu).
* Google's dp_accounting RDP accountant and Microsoft's prv_accountant package for subsampled mechanisms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from dpquant_sim.errors import ConfigError, PrivacyBudgetExceeded
from dpquant_sim.training.accounting import Mechanism, PrivacyLedger, compose_epsilon, noise_for_target

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # the orders Opacus searches


def rdp_closed_form_eps(sigma_steps: list[tuple[float, int]], delta: float) -> float:
    """min over orders of the Balle et al. conversion of sum_t a / (2 sigma_t^2)."""
    best = math.inf
    for a in ORDERS:
        rdp = sum(t * a / (2 * s * s) for s, t in sigma_steps)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def gaussian_exact_eps(mu: float, delta: float) -> float:
    f = lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta  # noqa: E731
    return brentq(f, 0.0, 100.0)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_rdp_full_batch_matches_closed_form(sigma, steps):
    led = PrivacyLedger("rdp", delta=1e-5)
    led.step(sigma, 1.0, steps)
    assert led.epsilon() == pytest.approx(rdp_closed_form_eps([(sigma, steps)], 1e-5), rel=1e-9)


def test_rdp_composition_with_extra_mechanism_matches_closed_form():
    led = PrivacyLedger("rdp", delta=1e-6)
    led.step(2.0, 1.0, 20)
    led.add_mechanism("estimator", 8.0, 1.0, steps=3)
    led.step(2.0, 1.0, 5)
    want = rdp_closed_form_eps([(2.0, 25), (8.0, 3)], 1e-6)
    assert led.epsilon() == pytest.approx(want, rel=1e-9)
    bd = led.breakdown()
    assert set(bd) == {"dpsgd", "estimator"}
    assert bd["dpsgd"] == pytest.approx(rdp_closed_form_eps([(2.0, 25)], 1e-6), rel=1e-9)
    assert bd["estimator"] == pytest.approx(rdp_closed_form_eps([(8.0, 3)], 1e-6), rel=1e-9)
    assert led.steps_of("dpsgd") == 25 and led.steps_of("estimator") == 3


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (3.0, 50)])
def test_prv_full_batch_matches_exact_gaussian(sigma, steps):
    led = PrivacyLedger("prv", delta=1e-5)
    led.step(sigma, 1.0, steps)
    lo, est, hi = led.epsilon_bounds()
    exact = gaussian_exact_eps(math.sqrt(steps) / sigma, 1e-5)
    assert lo - 1e-9 <= exact <= hi + 1e-9
    assert led.epsilon() == pytest.approx(hi)
    assert hi - lo <= 0.05


def test_rdp_subsampled_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import RdpAccountant

    q, sigma, steps, delta = 0.01, 1.1, 3000, 1e-5
    ref = RdpAccountant(orders=ORDERS)
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ref.compose(ev)
    led = PrivacyLedger("rdp", delta=delta)
    led.step(sigma, q, steps)
    # same orders, different code for the subsampled RDP bound and the conversion: agree to 1%
    assert led.epsilon() == pytest.approx(ref.get_epsilon(delta), rel=0.01)


def test_prv_subsampled_heterogeneous_matches_prv_accountant_package():
    prv = pytest.importorskip("prv_accountant")
    delta = 1e-5
    mechs = [(0.9, 0.05, 400), (4.0, 0.1, 5)]
    acc = prv.PRVAccountant(
        prvs=[prv.PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for s, q, _ in mechs],
        max_self_compositions=[t for _, _, t in mechs], eps_error=0.01, delta_error=delta / 1000)
    lo, est, hi = acc.compute_epsilon(delta=delta, num_self_compositions=[t for _, _, t in mechs])
    led = PrivacyLedger("prv", delta=delta)
    led.step(0.9, 0.05, 400)
    led.add_mechanism("estimator", 4.0, 0.1, 5)
    mine_lo, mine_est, mine_hi = led.epsilon_bounds()
    # both intervals have width <= 2 * eps_error around the true value, so they must overlap
    assert mine_lo <= hi + 1e-9 and lo <= mine_hi + 1e-9
    assert mine_est == pytest.approx(est, abs=0.02)


def test_extra_mechanism_adds_privacy_cost_and_rdp_below_prv_gap():
    for acc in ("rdp", "prv"):
        a = PrivacyLedger(acc, 1e-5)
        a.step(1.0, 0.02, 500)
        e0 = a.epsilon()
        a.add_mechanism("estimator", 2.0, 0.05, 10)
        assert a.epsilon() > e0
    # PRV is tighter than RDP for the same history (a known property; both are upper bounds)
    r, p = PrivacyLedger("rdp", 1e-5), PrivacyLedger("prv", 1e-5)
    for led in (r, p):
        led.step(1.0, 0.02, 500)
    assert p.epsilon() < r.epsilon()


def test_ledger_state_roundtrip_and_merging():
    led = PrivacyLedger("rdp", 1e-5)
    for _ in range(3):
        led.step(1.0, 0.1)
    led.add_mechanism("est", 3.0, 0.2)
    led.step(1.0, 0.1, 2)
    assert [(m.name, m.steps) for m in led.entries] == [("dpsgd", 3), ("est", 1), ("dpsgd", 2)]
    other = PrivacyLedger("rdp", 1e-5)
    other.load_state_dict(led.state_dict())
    assert other.entries == led.entries and other.epsilon() == led.epsilon()
    with pytest.raises(ConfigError, match="accountant and delta"):
        PrivacyLedger("prv", 1e-5).load_state_dict(led.state_dict())
    torch.save(led.state_dict(), "/dev/null")  # plain python types only


def test_empty_ledger_and_bad_input():
    assert PrivacyLedger("rdp", 1e-5).epsilon() == 0.0
    with pytest.raises(ConfigError, match="accountant"):
        PrivacyLedger("gdp", 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyLedger("rdp", 1.0)
    led = PrivacyLedger("rdp", 1e-5)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        led.step(0.0, 0.1)
    with pytest.raises(ConfigError, match="sample_rate"):
        led.add_mechanism("x", 1.0, 1.5)
    with pytest.raises(ConfigError, match="steps"):
        led.step(1.0, 0.1, 0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_for_target_reaches_target_from_below(accountant):
    q, steps, eps, delta = 0.05, 200, 4.0, 1e-5
    sigma = noise_for_target(eps, delta, q, steps, accountant)
    e = compose_epsilon([Mechanism("dpsgd", sigma, q, steps)], delta, accountant)
    assert eps - 0.02 <= e <= eps
    # slightly less noise would overspend: it is the smallest such sigma (to the tolerance)
    assert compose_epsilon([Mechanism("dpsgd", sigma * 0.97, q, steps)], delta, accountant) > e
    if accountant == "rdp":
        from opacus.accountants.utils import get_noise_multiplier

        ref = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                   accountant="rdp")
        assert sigma == pytest.approx(ref, rel=0.02)


def test_noise_for_target_includes_extra_mechanisms():
    q, steps, eps, delta = 0.05, 200, 4.0, 1e-5
    extra = [("estimator", 2.0, 0.1, 10)]
    s0 = noise_for_target(eps, delta, q, steps, "rdp")
    s1 = noise_for_target(eps, delta, q, steps, "rdp", extra)
    assert s1 > s0
    total = compose_epsilon([Mechanism("dpsgd", s1, q, steps), Mechanism(*extra[0])], delta, "rdp")
    assert total <= eps
    with pytest.raises(PrivacyBudgetExceeded, match="extra mechanisms alone"):
        noise_for_target(0.5, delta, q, steps, "rdp", [("estimator", 0.5, 1.0, 10)])
    with pytest.raises(ConfigError, match="epsilon"):
        noise_for_target(-1.0, delta, q, steps)


def test_breakdown_is_each_mechanism_alone():
    led = PrivacyLedger("rdp", 1e-5)
    led.step(1.0, 0.05, 100)
    led.add_mechanism("estimator", 3.0, 0.05, 4)
    solo = PrivacyLedger("rdp", 1e-5)
    solo.add_mechanism("estimator", 3.0, 0.05, 4)
    assert led.breakdown()["estimator"] == pytest.approx(solo.epsilon())
    assert led.breakdown()["estimator"] < led.epsilon()
    assert np.isfinite(led.epsilon())
