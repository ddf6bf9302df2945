"""Budget semantics shared by every schedule: closed forms, Monte Carlo, rotation, determinism, static picks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules import build_schedule
from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
from dpquant_sim.schedules.budget import (
    draw_subset, expected_share, greedy_subset, inclusion_probabilities, layer_sizes,
)

FLOPS = [10, 30, 60, 100]
LAYERS = [LayerInfo(n, f) for n, f in zip("abcd", FLOPS)]


def ctx(epoch=0, layers=LAYERS, seed=0, **kw):
    return ScheduleContext(epoch=epoch, epochs=100, layers=layers, recipe="fp4", rng=np.random.default_rng(seed), **kw)


def reference_pi(a, w, b):
    """Independent reference: solve sum_l min(1, c a_l) w_l = b W for c by root finding (scipy brentq)."""
    a, w = np.asarray(a, float), np.asarray(w, float)
    f = lambda c: np.sum(np.minimum(1.0, c * a) * w) - b * w.sum()  # noqa: E731
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    c = brentq(f, 0.0, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
    return np.minimum(1.0, c * a)


@settings(max_examples=200, deadline=None)
@given(
    a=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=12),
    b=st.floats(0.01, 1.0),
    data=st.data(),
)
def test_inclusion_probabilities_closed_form(a, b, data):
    w = data.draw(st.lists(st.floats(1.0, 1e6), min_size=len(a), max_size=len(a)))
    pi = inclusion_probabilities(a, w, b)
    assert np.all(pi >= 0) and np.all(pi <= 1)
    # the identity that defines the budget: sum pi_l w_l = b W (float64 round-off only)
    assert math.isclose(float(np.dot(pi, w)), b * sum(w), rel_tol=1e-9)
    assert math.isclose(expected_share(pi, w), b, rel_tol=1e-9)
    np.testing.assert_allclose(pi, reference_pi(a, w, b), rtol=1e-7, atol=1e-9)


def test_capped_proportional_hand_example():
    # a = (.7, .2, .1), w = (1, 1, 2), b = .75: uncapped c = 3/1.1 gives .7c > 1 -> cap layer 0;
    # then c = (3 - 1) / (.2 + .2) = 5: pi = (1, 1, .5), sum pi w = 3 = .75 * 4.
    np.testing.assert_allclose(inclusion_probabilities([0.7, 0.2, 0.1], [1, 1, 2], 0.75), [1.0, 1.0, 0.5])
    # uniform weights: pi = b everywhere, in either unit
    np.testing.assert_allclose(inclusion_probabilities([1, 1, 1], [5, 1, 100], 0.3), [0.3] * 3)
    # zero-weight layers take the rest only when the positive ones are all capped
    np.testing.assert_allclose(inclusion_probabilities([1, 0, 0], [1, 1, 2], 0.5), [1.0, 1 / 3, 1 / 3])
    assert inclusion_probabilities([0.5, 0.5], [1, 1], 1.0).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_budget_out_of_range_is_config_error(bad):
    with pytest.raises(ConfigError, match="budget"):
        inclusion_probabilities([1, 1], [1, 1], bad)


@pytest.mark.parametrize("method", ["systematic", "poisson"])
def test_monte_carlo_inclusion_and_share(method):
    rng = np.random.default_rng(123)
    w = np.array([10.0, 30, 60, 100, 5, 250])
    pi = inclusion_probabilities([0.05, 0.3, 0.1, 0.2, 0.15, 0.2], w, 0.6)
    n = 8000
    masks = np.array([draw_subset(pi, rng, method) for _ in range(n)])
    freq = masks.mean(0)
    se = np.sqrt(pi * (1 - pi) / n)
    assert np.all(np.abs(freq - pi) <= 5 * se + 1e-12), (freq, pi)
    shares = masks @ w / w.sum()
    assert abs(shares.mean() - 0.6) <= 5 * shares.std() / math.sqrt(n) + 1e-12
    if method == "systematic":
        # fixed-size property: the count is floor or ceil of sum pi
        counts = masks.sum(1)
        assert set(np.unique(counts)) <= {math.floor(pi.sum()), math.ceil(pi.sum())}


def test_pi_one_and_zero_are_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = draw_subset([1.0, 0.0, 0.3, 0.7], rng)
        assert m[0] and not m[1] and m.sum() == 2


def test_layer_units():
    assert layer_sizes(FLOPS, "layers").tolist() == [1.0] * 4
    with pytest.raises(ConfigError, match="budget_unit"):
        layer_sizes(FLOPS, "bytes")


# --- static selections, hand-checked (W = 200 FLOPs) ---------------------------------------------------
@pytest.mark.parametrize(
    "select,budget,unit,expected",
    [
        ("first", 0.3, "flops", ["a", "b"]),  # prefixes 5%, 20%, 50%: 20% is nearest to 30%
        ("first", 0.2, "flops", ["a", "b"]),  # reaches 20% exactly
        ("first", 0.4, "flops", ["a", "b", "c"]),  # 50% is nearer than 20%
        ("first", 0.35, "flops", ["a", "b", "c"]),  # 20% and 50% tie at 15 points: the larger prefix
        ("last", 0.5, "flops", ["d"]),  # 100/200 = 50%
        ("last", 0.51, "flops", ["d"]),  # 50% is nearer than 80%
        ("last", 0.7, "flops", ["c", "d"]),  # 80% is nearer than 50%
        ("largest", 0.6, "flops", ["d"]),  # d 50% (gap 10) vs c+d 80% (gap 20)
        ("largest", 0.01, "flops", ["d"]),  # at least one layer
        ("first", 0.5, "layers", ["a", "b"]),
        ("last", 0.26, "layers", ["d"]),  # 1 layer (25%) is nearest to 26%
        ("last", 0.4, "layers", ["c", "d"]),  # 2 layers (50%) nearer than 1 (25%)
    ],
)
def test_static_subset_hand_checked(select, budget, unit, expected):
    plan = build_schedule({"kind": "static-subset", "select": select, "budget": budget, "budget_unit": unit}).plan(
        ctx()
    )
    assert sorted(plan.quantized) == expected
    assert plan.quantized_flop_share == pytest.approx(sum(FLOPS["abcd".index(n)] for n in expected) / 200)
    assert greedy_subset(list("abcd"), layer_sizes(FLOPS, unit), budget, select) == expected


def test_static_named_and_unknown():
    plan = build_schedule({"kind": "static-subset", "select": "named", "layers": ["d", "a"]}).plan(ctx())
    assert plan.quantized == {"a": "fp4", "d": "fp4"}
    assert plan.quantized_flop_share == pytest.approx(110 / 200)
    with pytest.raises(ConfigError, match="nope"):
        build_schedule({"kind": "static-subset", "select": "named", "layers": ["nope"]}).plan(ctx())
    with pytest.raises(ConfigError, match="layers"):
        build_schedule({"kind": "static-subset", "select": "named"})


def test_fp32_and_static_all():
    p0 = build_schedule({"kind": "fp32"}).plan(ctx())
    assert p0.quantized == {} and p0.quantized_flop_share == 0.0
    p1 = build_schedule({"kind": "static-all"}).plan(ctx())
    assert p1.quantized == {n: "fp4" for n in "abcd"} and p1.quantized_flop_share == 1.0


def test_build_schedule_rejects_bad_config():
    with pytest.raises(ConfigError, match="schedule.kind"):
        build_schedule({"kind": "greedy"})
    with pytest.raises(ConfigError, match="schedule.budget"):
        build_schedule({"kind": "random", "budget": 2.0})


# --- rotation and determinism ---------------------------------------------------------------------------
def _fixed_deltas(values):
    import torch

    def fn(names, q, gen):
        return torch.tensor([values] * 20, dtype=torch.float64), 20.0

    return fn


def _schedules():
    return {
        "random": {"kind": "random", "budget": 0.5},
        # strongly prioritised dpquant: layer d (most FLOPs) is "fragile"
        "dpquant": {"kind": "dpquant", "sampler": "uniform-mix-systematic", "budget": 0.5, "budget_unit": "flops",
                    "uniform_mix": 0.2, "temperature": 0.5},
        # the paper's sampler at its defaults: k = 2 of 4 layers, beta 100 on raw deltas (d is e^-87 as likely)
        "dpquant-paper": {"kind": "dpquant", "budget": 0.5},
    }


@pytest.mark.parametrize("kind", ["random", "dpquant"])  # not the paper sampler: it has no uniform floor
def test_rotation_reaches_every_layer(kind):
    sched = build_schedule(_schedules()[kind])
    rng = np.random.default_rng(7)
    extra = dict(private=False, loss_deltas=_fixed_deltas([0.01, 0.02, 0.03, 0.9]))
    first = sched.plan(ScheduleContext(0, 100, LAYERS, "fp4", rng, **extra))
    pi_min = min(first.probs.values())
    assert pi_min > 0
    # P(some layer never drawn in E epochs) <= L (1 - pi_min)^E; choose E so that this is < 1e-9
    bound = math.ceil(math.log(1e-9 / len(LAYERS)) / math.log(1 - pi_min))
    seen = set(first.quantized)
    for e in range(1, bound):
        seen |= set(sched.plan(ScheduleContext(e, 100, LAYERS, "fp4", rng, **extra)).quantized)
        if len(seen) == len(LAYERS):
            break
    assert seen == {"a", "b", "c", "d"}, (bound, pi_min)


@pytest.mark.parametrize("kind", ["random", "dpquant"])
def test_expected_share_is_budget_for_every_schedule(kind):
    sched = build_schedule(_schedules()[kind])
    plan = sched.plan(ctx(private=False, loss_deltas=_fixed_deltas([0.01, 0.02, 0.03, 0.9])))
    w = np.array(FLOPS, float)
    pi = np.array([plan.probs[n] for n in "abcd"])
    assert expected_share(pi, w) == pytest.approx(0.5, rel=1e-12)
    assert plan.info["expected_share"] == pytest.approx(0.5, rel=1e-12)
    assert plan.quantized_flop_share == pytest.approx(sum(w[["abcd".index(n) for n in plan.quantized]]) / w.sum())


@pytest.mark.parametrize("kind", ["random", "dpquant", "dpquant-paper"])
def test_seeded_determinism_and_resume(kind):
    extra = dict(private=False, loss_deltas=_fixed_deltas([0.01, 0.02, 0.03, 0.9]))

    def run(seed, epochs, sched=None, start=0):
        sched = sched or build_schedule(_schedules()[kind])
        rng = np.random.default_rng(seed)
        plans = [sched.plan(ScheduleContext(e, epochs, LAYERS, "fp4", rng, **extra)) for e in range(start, epochs)]
        return plans, sched

    a, _ = run(5, 12)
    b, _ = run(5, 12)
    c, _ = run(6, 12)
    assert [p.to_json() for p in a] == [p.to_json() for p in b]
    assert [p.quantized for p in a] != [p.quantized for p in c]
    # resume from a state_dict taken after epoch 4: the remaining plans are identical
    first, s1 = run(5, 5)
    s2 = build_schedule(_schedules()[kind])
    s2.load_state_dict(s1.state_dict())
    rest, _ = run(99, 12, sched=s2, start=5)  # a different ctx.rng must not matter once the state is loaded
    assert [p.to_json() for p in first + rest] == [p.to_json() for p in a]


def test_random_hold_epochs_keeps_each_draw_and_resumes_mid_hold():
    """hold_epochs=3: draws at epochs 0, 3, 6 (info.redrawn), identical sets in between; every epoch's
    inclusion probabilities are still the budget; a schedule restored mid-hold returns the held set."""
    cfg = {"kind": "random", "budget": 0.5, "budget_unit": "layers", "hold_epochs": 3}
    sched, rng = build_schedule(cfg), np.random.default_rng(5)
    plans = [sched.plan(ScheduleContext(e, 100, LAYERS, "fp4", rng)) for e in range(8)]
    assert [p.info["redrawn"] for p in plans] == [e % 3 == 0 for e in range(8)]
    for e in range(8):
        assert set(plans[e].quantized) == set(plans[e - e % 3].quantized)
        assert plans[e].probs == pytest.approx({n: 0.5 for n in "abcd"})
    # restore after epoch 4 (mid-hold) and continue: epoch 5 is epoch 3's set, epoch 6 a fresh draw
    sched2, rng2 = build_schedule(cfg), np.random.default_rng(5)
    for e in range(5):
        sched2.plan(ScheduleContext(e, 100, LAYERS, "fp4", rng2))
    resumed = build_schedule(cfg)
    resumed.load_state_dict(sched2.state_dict())
    tail = [resumed.plan(ScheduleContext(e, 100, LAYERS, "fp4", rng2)) for e in (5, 6, 7)]
    assert [set(p.quantized) for p in tail] == [set(p.quantized) for p in plans[5:8]]
    # over many draws each layer is held in about half the epochs (the budget), as with hold 1
    sched3, rng3 = build_schedule(cfg), np.random.default_rng(0)
    counts = {n: 0 for n in "abcd"}
    for e in range(3000):
        for n in sched3.plan(ScheduleContext(e, 3000, LAYERS, "fp4", rng3)).quantized:
            counts[n] += 1
    assert all(abs(c / 3000 - 0.5) < 0.05 for c in counts.values())
    with pytest.raises(ConfigError, match="hold_epochs"):
        build_schedule({"kind": "random", "budget": 0.5, "hold_epochs": 0})


@pytest.mark.parametrize("phase", [0, 1])
def test_random_alternate_switches_one_fixed_set_every_epoch_and_resumes(phase):
    """pattern='alternate': one set of share 2b (2 of 8 layers at b = 0.125), drawn once, quantized at epochs
    with (e + phase) even and empty in between; a restored schedule keeps the set; across seeds the set is a
    uniform random pair (each layer in it with probability 2b = 0.25)."""
    layers = [LayerInfo(f"l{i}", 10 * (i + 1)) for i in range(8)]
    cfg = {"kind": "random", "budget": 0.125, "budget_unit": "layers", "pattern": "alternate",
           "alternate_phase": phase}
    sched, rng = build_schedule(cfg), np.random.default_rng(3)
    plans = [sched.plan(ScheduleContext(e, 10, layers, "fp4", rng)) for e in range(6)]
    on = [(e + phase) % 2 == 0 for e in range(6)]
    assert [p.info["on"] for p in plans] == on
    the_set = set(plans[0 if on[0] else 1].quantized)
    assert len(the_set) == 2
    for e, p in enumerate(plans):
        assert set(p.quantized) == (the_set if on[e] else set())
        assert sum(p.probs.values()) == pytest.approx(2.0 if on[e] else 0.0)
    # time-averaged share = budget
    assert np.mean([len(p.quantized) / 8 for p in plans]) == pytest.approx(0.125)
    resumed = build_schedule(cfg)
    resumed.load_state_dict(sched.state_dict())
    assert set(resumed.plan(ScheduleContext(6, 10, layers, "fp4", np.random.default_rng(99))).quantized) == (
        the_set if (6 + phase) % 2 == 0 else set())
    counts = {layer.name: 0 for layer in layers}
    for seed in range(2000):
        for n in build_schedule(cfg).plan(ScheduleContext(phase, 10, layers, "fp4",
                                                          np.random.default_rng(seed))).quantized:
            counts[n] += 1
    # each layer in the set with probability 0.25: binomial sd sqrt(2000 * .25 * .75) = 19.4; 5 sd
    assert all(abs(c - 500) < 5 * 19.4 for c in counts.values()), counts


def test_random_alternate_refusals():
    with pytest.raises(ConfigError, match="schedule.budget"):
        build_schedule({"kind": "random", "budget": 0.6, "pattern": "alternate"})
    with pytest.raises(ConfigError, match="hold_epochs"):
        build_schedule({"kind": "random", "budget": 0.5, "pattern": "alternate", "hold_epochs": 2})


def test_static_random_subset_is_uniform_fixed_and_seeded():
    """select='random', layers unit: round(0.5 x 5) = 3 layers (halves up), the same set every epoch; over
    4000 subset seeds each of the C(5, 3) = 10 sets appears with frequency 1/10 (binomial, 5 sd)."""
    layers = [LayerInfo(f"l{i}", 10 * (i + 1)) for i in range(5)]
    cfg = {"kind": "static-subset", "select": "random", "budget": 0.5, "budget_unit": "layers"}
    sched, rng = build_schedule({**cfg, "subset_seed": 11}), np.random.default_rng(0)
    plans = [sched.plan(ScheduleContext(e, 5, layers, "fp4", rng)) for e in range(5)]
    assert len({frozenset(p.quantized) for p in plans}) == 1 and len(plans[0].quantized) == 3
    # subset_seed fixes the set whatever the run's RNG; None derives it from the run's RNG
    other = build_schedule({**cfg, "subset_seed": 11}).plan(ScheduleContext(0, 5, layers, "fp4",
                                                                           np.random.default_rng(99)))
    assert other.quantized == plans[0].quantized
    derived = {frozenset(build_schedule(cfg).plan(ScheduleContext(0, 5, layers, "fp4",
                                                                  np.random.default_rng(s))).quantized)
               for s in range(30)}
    assert len(derived) > 1
    # resume: the restored schedule returns the drawn set even under another RNG
    r = build_schedule(cfg)
    first = r.plan(ScheduleContext(0, 5, layers, "fp4", np.random.default_rng(4))).quantized
    r2 = build_schedule(cfg)
    r2.load_state_dict(r.state_dict())
    assert r2.plan(ScheduleContext(1, 5, layers, "fp4", np.random.default_rng(5))).quantized == first
    counts: dict = {}
    for s in range(4000):
        q = frozenset(build_schedule({**cfg, "subset_seed": s}).plan(
            ScheduleContext(0, 5, layers, "fp4", np.random.default_rng(0))).quantized)
        counts[q] = counts.get(q, 0) + 1
    assert len(counts) == math.comb(5, 3)
    sd = math.sqrt(4000 * 0.1 * 0.9)
    assert all(abs(c - 400) < 5 * sd for c in counts.values()), counts


def test_static_random_subset_flops_unit_matches_enumerated_orderings():
    """FLOPs unit: the prefix, in a uniformly random order, whose share is nearest the budget. Reference: every
    one of the 4! orders, its nearest prefix by hand (ties to the larger), each order with probability 1/24."""
    import itertools

    w = np.array(FLOPS, float)
    ref: dict = {}
    for order in itertools.permutations(range(4)):
        shares = np.cumsum(w[list(order)]) / w.sum()
        gaps = np.abs(shares - 0.5)
        k = max(i for i in range(4) if gaps[i] <= gaps.min() + 1e-12) + 1
        key = frozenset("abcd"[i] for i in order[:k])
        ref[key] = ref.get(key, 0) + 1 / 24
    cfg = {"kind": "static-subset", "select": "random", "budget": 0.5, "budget_unit": "flops"}
    counts: dict = {}
    n = 4000
    for s in range(n):
        q = frozenset(build_schedule({**cfg, "subset_seed": s}).plan(ctx()).quantized)
        counts[q] = counts.get(q, 0) + 1
    assert set(counts) == set(ref)
    for key, p in ref.items():
        assert abs(counts[key] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (key, p, counts[key] / n)
