"""Pareto frontier vs a brute-force O(n^2) dominance check; seed aggregation vs numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpquant_sim.analysis.pareto import aggregate_seeds, pareto_front, pareto_mask, seed_frontier
from dpquant_sim.errors import ConfigError


def brute_force(x, y, maximize):
    """Independent reference: a point is on the front iff no other point is >= in both and > in one."""
    sx = 1 if maximize[0] else -1
    sy = 1 if maximize[1] else -1
    out = []
    for i in range(len(x)):
        if np.isnan(x[i]) or np.isnan(y[i]):
            out.append(False)
            continue
        dominated = False
        for j in range(len(x)):
            if j == i or np.isnan(x[j]) or np.isnan(y[j]):
                continue
            ge = sx * x[j] >= sx * x[i] and sy * y[j] >= sy * y[i]
            gt = sx * x[j] > sx * x[i] or sy * y[j] > sy * y[i]
            if ge and gt:
                dominated = True
                break
        out.append(not dominated)
    return np.array(out, dtype=bool)


# Small integer grids force many ties in one or both objectives; NaNs appear too.
values = st.one_of(st.integers(0, 5).map(float), st.just(float("nan")))


@settings(max_examples=300, deadline=None)
@given(
    pts=st.lists(st.tuples(values, values), min_size=0, max_size=40),
    maximize=st.tuples(st.booleans(), st.booleans()),
)
def test_pareto_mask_matches_brute_force(pts, maximize):
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    assert pareto_mask(x, y, maximize).tolist() == brute_force(x, y, maximize).tolist()


@settings(max_examples=100, deadline=None)
@given(pts=st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_pareto_mask_continuous_values(pts):
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    assert pareto_mask(x, y).tolist() == brute_force(x, y, (True, True)).tolist()


def test_ties_are_all_on_front():
    m = pareto_mask([1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 1.0, 3.0])
    assert m.tolist() == [True, True, False, True]


def test_by_group_computes_separate_fronts():
    df = pd.DataFrame({"acc": [0.9, 0.5, 0.9, 0.5], "tput": [1.0, 2.0, 1.0, 0.5], "accel": ["a", "a", "b", "b"]})
    out = pareto_front(df, "acc", "tput", by="accel")
    assert out["on_front"].tolist() == [True, True, True, False]
    # Without grouping the b-row (0.5, 0.5) is dominated and (0.5, 2.0) still on the front.
    assert pareto_front(df, "acc", "tput")["on_front"].tolist() == [True, True, True, False]


def test_unknown_column_is_clear_error():
    with pytest.raises(ConfigError, match="column='nope'"):
        pareto_front(pd.DataFrame({"a": [1]}), "a", "nope")


def test_aggregate_seeds_matches_numpy():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"sched": np.repeat(["x", "y"], 3), "seed": [0, 1, 2] * 2, "acc": rng.random(6), "t": rng.random(6)}
    )
    agg = aggregate_seeds(df, ["sched"], ["acc", "t"]).set_index("sched")
    for s in ("x", "y"):
        v = df[df.sched == s]["acc"].to_numpy()
        assert agg.loc[s, "acc_mean"] == pytest.approx(v.mean())
        assert agg.loc[s, "acc_std"] == pytest.approx(v.std(ddof=1))
        assert agg.loc[s, "acc_min"] == pytest.approx(v.min())
        assert agg.loc[s, "n_seeds"] == 3


def test_seed_frontier_uses_means_not_best_seed():
    # Schedule "lucky" has one great seed but a poor mean: it must not be on the front.
    df = pd.DataFrame(
        {
            "sched": ["steady"] * 2 + ["lucky"] * 2,
            "seed": [0, 1, 0, 1],
            "acc": [0.80, 0.80, 0.95, 0.40],
            "tput": [1.0, 1.0, 1.0, 1.0],
            "accelerator": ["h100"] * 4,
        }
    )
    fr = seed_frontier(df, x="tput", y="acc", group=["sched"]).set_index("sched")
    assert bool(fr.loc["steady", "on_front"]) and not bool(fr.loc["lucky", "on_front"])
    assert fr.loc["lucky", "acc_std"] > 0
