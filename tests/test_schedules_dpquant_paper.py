"""DPQuant's paper sampler: pi = softmax(-beta x scores), k = round(budget x n) layers drawn without replacement,
each draw proportional to the remaining pi; the plan's probs are the draw's exact inclusion probabilities.

References are independent of the code under test: enumeration of every ordered draw (itertools), closed-form
softmax, hand-computed cases, Monte Carlo frequencies."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.schedules import build_schedule
from dpquant_sim.schedules.base import LayerInfo, ScheduleContext
from dpquant_sim.schedules.budget import layer_count, successive_draw, successive_inclusion_probabilities


def enumerate_inclusion(weights, k):
    """Brute force: sum over every ordered k-draw (i_1..i_k) of prod_t w_{i_t} / (W - w_{i_1} - ... - w_{i_{t-1}})."""
    w = [float(x) for x in weights]
    n, total = len(w), sum(w)
    incl = [0.0] * n
    sets: dict[frozenset, float] = {}
    for seq in itertools.permutations(range(n), k):
        p, left = 1.0, total
        for i in seq:
            p *= w[i] / left
            left -= w[i]
        for i in seq:
            incl[i] += p
        sets[frozenset(seq)] = sets.get(frozenset(seq), 0.0) + p
    return np.array(incl), sets


def softmax_closed_form(x):
    e = [math.exp(v - max(x)) for v in x]
    return np.array([v / sum(e) for v in e])


CASES = [
    ([0.0, 0.0, 0.0, 0.0], 2),
    ([math.log(2.0), 0.0, 0.0], 2),
    ([0.3, -1.2, 2.5, 0.0, -0.7], 2),
    ([0.3, -1.2, 2.5, 0.0, -0.7], 3),
    ([4.0, -4.0, 1.0, 0.5, -2.0, 3.0], 4),
    ([0.0, -30.0, -5.0, -12.0, 1.0, -0.1, -2.0], 3),   # strongly skewed (e^-30)
    ([-0.5, 0.9, -1.3, 0.2, 1.7, -2.2, 0.0, 0.4, -0.8], 5),
    ([10.0, 9.0, -40.0, 0.0, 0.0], 4),                 # the e^-50 layer must still be drawn when 4 of 5 are
]


@pytest.mark.parametrize("logits,k", CASES)
def test_inclusion_probabilities_match_enumeration_of_every_ordered_draw(logits, k):
    want, _ = enumerate_inclusion(softmax_closed_form(logits), k)
    got = successive_inclusion_probabilities(logits, k)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    assert got.sum() == pytest.approx(k, abs=1e-10)


def test_inclusion_is_not_proportional_to_pi_hand_case():
    """pi = (1/2, 1/4, 1/4), k = 2: P(a) = 1/2 + 2 x 1/4 x 2/3 = 5/6; P(b) = 1/4 + 1/2 x 1/2 + 1/4 x 1/3 = 7/12,
    while k pi = (1, 1/2, 1/2)."""
    got = successive_inclusion_probabilities([math.log(2.0), 0.0, 0.0], 2)
    np.testing.assert_allclose(got, [5 / 6, 7 / 12, 7 / 12], atol=1e-12)


def test_large_n_inclusion_sums_to_k_and_matches_monte_carlo():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, 30)
    got = successive_inclusion_probabilities(logits, 21)
    assert got.sum() == pytest.approx(21, abs=1e-9)
    draws = 4000
    freq = np.zeros(30)
    g = np.random.default_rng(1)
    for _ in range(draws):
        freq[successive_draw(logits, 21, g)] += 1
    se = np.sqrt(got * (1 - got) / draws)
    assert np.all(np.abs(freq / draws - got) <= 5 * se + 1e-9)


def test_draw_frequencies_match_enumerated_set_probabilities():
    logits = [0.3, -1.2, 2.5, 0.0, -0.7]
    _, sets = enumerate_inclusion(softmax_closed_form(logits), 2)
    g, draws = np.random.default_rng(7), 20000
    counts: dict[frozenset, int] = {}
    for _ in range(draws):
        s = frozenset(successive_draw(logits, 2, g).tolist())
        counts[s] = counts.get(s, 0) + 1
    for s, p in sets.items():
        assert abs(counts.get(s, 0) / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (s, p)


def test_layer_count_rounds_halves_up():
    assert [layer_count(b, n) for b, n in [(0.5, 5), (0.5, 4), (0.75, 21), (0.9, 21), (0.9, 5), (0.05, 4)]] == [
        3, 2, 16, 19, 5, 1]


# --- the schedule --------------------------------------------------------------------------------------------------
def layers(n):
    return [LayerInfo(f"l{i}", 10 * (i + 1)) for i in range(n)]


def deltas_fn(values):
    def fn(names, q, gen):
        return torch.tensor([values] * 40, dtype=torch.float64), 40.0
    return fn


@pytest.mark.parametrize("n", [4, 7, 21])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_exactly_k_distinct_layers_every_epoch(n, ratio):
    k = math.floor(ratio * n + 0.5)
    vals = list(np.linspace(0.0, 0.02, n))
    sched, rng = build_schedule({"kind": "dpquant", "budget": ratio, "interval": 2}), np.random.default_rng(n)
    for e in range(6):
        plan = sched.plan(ScheduleContext(e, 6, layers(n), "fp4", rng, private=False, loss_deltas=deltas_fn(vals)))
        assert len(plan.quantized) == k == plan.info["k"]
        assert len(set(plan.info["draw_order"])) == k and set(plan.info["draw_order"]) == set(plan.quantized)
        assert sum(plan.probs.values()) == pytest.approx(k, abs=1e-9)
        assert plan.info["realized_share"] == pytest.approx(k / n)


def test_plan_records_closed_form_softmax_and_exact_inclusion():
    """Non-private, ema 0: scores are the exact clipped means (rows of norm < 1), pi = softmax(-beta s)."""
    vals = [0.01, 0.03, 0.0, 0.02, 0.015]
    sched = build_schedule({"kind": "dpquant", "budget": 0.5, "beta": 80.0, "ema": 0.0})
    plan = sched.plan(ScheduleContext(0, 4, layers(5), "fp4", np.random.default_rng(0), private=False,
                                      loss_deltas=deltas_fn(vals)))
    names = [f"l{i}" for i in range(5)]
    pi = softmax_closed_form([-80.0 * v for v in vals])
    np.testing.assert_allclose([plan.info["pi_softmax"][n] for n in names], pi, rtol=1e-12)
    want, _ = enumerate_inclusion(pi, 3)  # round(2.5) = 3, halves up
    np.testing.assert_allclose([plan.probs[n] for n in names], want, atol=1e-11)
    assert plan.info["sampler"] == "paper" and plan.info["budget_unit"] == "layers" and plan.info["k"] == 3
    assert plan.info["score_scale"] == "none" and plan.info["estimator_epsilon"] == 0.0
    # the most sensitive layer is least likely, the least sensitive most likely
    assert min(plan.probs, key=plan.probs.get) == "l1" and max(plan.probs, key=plan.probs.get) == "l2"


def test_std_scale_makes_beta_per_spread():
    vals = [0.01, 0.03, 0.0, 0.02]
    sched = build_schedule({"kind": "dpquant", "budget": 0.5, "beta": 1.5, "ema": 0.0, "score_scale": "std"})
    plan = sched.plan(ScheduleContext(0, 4, layers(4), "fp4", np.random.default_rng(0), private=False,
                                      loss_deltas=deltas_fn(vals)))
    s = np.array(vals)
    z = (s - s.mean()) / s.std()
    np.testing.assert_allclose([plan.info["pi_softmax"][f"l{i}"] for i in range(4)],
                               softmax_closed_form(list(-1.5 * z)), rtol=1e-12)


def test_warmup_is_uniform_k_of_n():
    sched = build_schedule({"kind": "dpquant", "budget": 0.75, "warmup_epochs": 1})
    plan = sched.plan(ScheduleContext(0, 4, layers(4), "fp4", np.random.default_rng(0), private=False,
                                      loss_deltas=deltas_fn([0, 1, 0, 0])))
    assert plan.info["warmup"] and len(plan.quantized) == 3
    assert plan.probs == pytest.approx({f"l{i}": 0.75 for i in range(4)}, abs=1e-12)


def test_seeded_and_resumable():
    vals = list(np.linspace(0.0, 0.03, 7))

    def run(seed, start, stop, sched=None):
        sched = sched or build_schedule({"kind": "dpquant", "budget": 0.5, "interval": 2})
        rng = np.random.default_rng(seed)
        return [sched.plan(ScheduleContext(e, stop, layers(7), "fp4", rng, private=False,
                                           loss_deltas=deltas_fn(vals))).to_json() for e in range(start, stop)], sched

    a, _ = run(3, 0, 10)
    assert a == run(3, 0, 10)[0]
    assert a != run(4, 0, 10)[0]
    head, s1 = run(3, 0, 4)
    s2 = build_schedule({"kind": "dpquant", "budget": 0.5, "interval": 2})
    s2.load_state_dict(s1.state_dict())
    tail, _ = run(99, 4, 10, sched=s2)
    assert head + tail == a


def test_refusals_name_the_field():
    with pytest.raises(ConfigError, match="budget_unit"):
        build_schedule({"kind": "dpquant", "budget_unit": "flops"})
    with pytest.raises(ConfigError, match="temperature"):
        build_schedule({"kind": "dpquant", "temperature": 0.5})
    with pytest.raises(ConfigError, match="uniform_mix"):
        build_schedule({"kind": "dpquant", "uniform_mix": 0.0})
    with pytest.raises(ConfigError, match="beta"):
        build_schedule({"kind": "dpquant", "sampler": "uniform-mix-systematic", "beta": 5.0})
    # the earlier sampler keeps a FLOP budget
    build_schedule({"kind": "dpquant", "sampler": "uniform-mix-systematic", "budget_unit": "flops"})


@pytest.mark.slow
def test_training_run_quantizes_exactly_k_layers_and_logs_pi_and_estimator_epsilon(tmp_path):
    """The issue's acceptance run, shortened to 2 epochs: round(0.5 x 5) = 3 of the CNN's 5 layers every
    epoch; the plans (plans.jsonl, one JSON line per epoch beside metrics.csv) hold pi (a softmax: positive,
    sums to 1), the exact inclusion probabilities (sum 3) and the estimator's epsilon (> 0, equal to the
    metrics column)."""
    import json

    import pandas as pd

    from dpquant_sim.training.engine import train

    out = tmp_path / "run"
    train({"dataset": "digits", "model": "cnn", "epochs": 2, "epsilon": 8.0, "delta": 1e-5, "recipe": "fp4",
           "schedule": {"kind": "dpquant", "budget": 0.5}, "threads": 1}, out, progress=False)
    m = pd.read_csv(out / "metrics.csv")
    plans = [json.loads(line) for line in (out / "plans.jsonl").read_text().splitlines()]
    assert len(m) == 2 == len(plans) and [p["epoch"] for p in plans] == list(m["epoch"])
    for (_, row), plan in zip(m.iterrows(), plans):
        info = plan["info"]
        assert len(plan["quantized"]) == 3 == info["k"] and info["sampler"] == "paper"
        pi = np.array(list(info["pi_softmax"].values()))
        assert len(pi) == 5 and np.all(pi > 0) and pi.sum() == pytest.approx(1.0)
        assert sum(plan["probs"].values()) == pytest.approx(3.0, abs=1e-9)
        assert info["estimator_epsilon"] > 0 and row["estimator_epsilon"] == pytest.approx(info["estimator_epsilon"])
