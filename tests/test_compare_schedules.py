"""analysis/compare_schedules.py: schedule tokens and the summary table's statistics (hand-computed)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "compare_schedules", Path(__file__).resolve().parents[1] / "analysis" / "compare_schedules.py"
)
cs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cs)


def test_schedule_tokens():
    assert cs.schedule_cfg("fp32", 0.5, "first") == {"kind": "fp32"}
    assert cs.schedule_cfg("static-subset", 0.5, "last") == {"kind": "static-subset", "budget": 0.5, "select": "last"}
    assert cs.schedule_cfg("dpquant:uniform_mix=1.0:score_scale=shrink", 0.7, "first") == {
        "kind": "dpquant", "budget": 0.7, "uniform_mix": 1.0, "score_scale": "shrink"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        cs.schedule_cfg("dpquant:warmup", 0.7, "first")


def test_summary_difference_to_random_and_its_standard_error():
    acc = {"random": [0.70, 0.80, 0.75], "dpquant": [0.60, 0.90], "fp32": [0.5]}
    rows = [{"dataset": "d", "model": "m", "recipe": "r", "schedule": k, "seed": i, "test_acc": a,
             "quantized_flop_share": 0.5, "epsilon": 2.0, "estimator_epsilon": 0.0, "estimator_share": 0.0,
             "switches": 1.0}
            for k, v in acc.items() for i, a in enumerate(v)]
    t = cs.summarize(pd.DataFrame(rows)).set_index("schedule")
    # by hand: means 0.75 / 0.75; sample variances 0.0025 (n=3) and 0.045 (n=2)
    assert t.loc["dpquant", "acc_mean"] == pytest.approx(0.75)
    assert t.loc["dpquant", "vs_ref"] == pytest.approx(0.0, abs=1e-12)
    assert t.loc["dpquant", "vs_ref_se"] == pytest.approx(math.sqrt(0.0025 / 3 + 0.045 / 2))
    assert t.loc["random", "vs_ref"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(t.loc["fp32", "vs_ref_se"])  # one seed: no spread, no standard error
    md = cs.to_markdown(t.reset_index())
    assert "| dpquant | 75.0 +- 21.2 | +0.0 +- 15.3 | 2 |" in md


def test_bad_schedule_field_is_one_error_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match=r"schedule\.foo=1 is not allowed"):
        cs.main(["--out", str(out), "--datasets", "digits", "--seeds", "0", "--epochs", "1",
                 "--schedules", "random,dpquant:foo=1"])
    assert not out.exists()  # the valid 'random' point did not run either


def test_fp32_runs_once_for_every_recipe_and_the_pooled_table(tmp_path, monkeypatch):
    calls = []

    def fake_run(args, d, m, r, k, seed, root):
        calls.append((r, k, seed))
        acc = {"fp32": 0.9, "random": 0.5, "dpquant": 0.6 if r == "fp4" else 0.5}[k] + 0.01 * seed
        return {"dataset": d, "model": m, "recipe": r, "schedule": k, "seed": seed, "test_acc": acc,
                "epsilon": 8.0, "noise_multiplier": 1.0, "estimator_epsilon": 0.0, "estimator_share": 0.0,
                "quantized_flop_share": 0.5, "switches": 0.0, "wall_s": 0.0}

    monkeypatch.setattr(cs, "run_one", fake_run)
    cs.main(["--out", str(tmp_path), "--datasets", "digits", "--recipes", "fp4,fp8", "--seeds", "0,1",
             "--schedules", "fp32,random,dpquant"])
    t_static = cs.summarize(pd.read_csv(tmp_path / "runs.csv"), "fp32").set_index(["recipe", "schedule"])
    assert t_static.loc[("fp4", "dpquant"), "vs_ref"] == pytest.approx(0.6 - 0.9)
    assert sorted(c for c in calls if c[1] == "fp32") == [("fp4", "fp32", 0), ("fp4", "fp32", 1)]
    assert len(calls) == 2 + 2 * 2 * 2
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(runs[runs.schedule == "fp32"].recipe) == ["fp4", "fp4", "fp8", "fp8"]
    pool = pd.read_csv(tmp_path / "pooled.csv").set_index("schedule")
    # dpquant: +0.1 in the fp4 cell, 0 in fp8, every std 0.00707 (seeds 0, 1): se = sqrt(2 * 2 * 0.00005 / 2) / 2
    assert pool.loc["dpquant", "vs_ref"] == pytest.approx(0.05)
    assert pool.loc["dpquant", "vs_ref_se"] == pytest.approx(math.sqrt(4 * 0.00005 / 2) / 2)
    assert pool.loc["fp32", "cells"] == 2
    assert "| dpquant | +5.0 +- 0.5 | 2 |" in (tmp_path / "table.md").read_text()


def test_reference_must_be_one_of_the_schedules(tmp_path):
    with pytest.raises(SystemExit, match=r"--reference: 'static-all' is not one of --schedules 'random,dpquant'"):
        cs.main(["--out", str(tmp_path / "x"), "--schedules", "random,dpquant", "--reference", "static-all"])
    assert not (tmp_path / "x").exists()


def test_random_subsets_are_one_row_with_mean_and_std_over_subsets_and_seeds(tmp_path, monkeypatch):
    calls = []

    def fake_run(args, d, m, r, k, seed, root):
        calls.append((k, seed))
        cfg = cs.train_config(args, d, m, r, k, seed).schedule  # the token is a valid static-subset config
        acc = 0.5
        if k.startswith("static-subset:select=random"):
            assert cfg.select == "random" and cfg.budget == args.budget
            acc = 0.6 + 0.1 * cfg.subset_seed + 0.01 * seed
        return {"dataset": d, "model": m, "recipe": r, "schedule": k, "seed": seed, "test_acc": acc,
                "epsilon": 8.0, "noise_multiplier": 1.0, "estimator_epsilon": 0.0, "estimator_share": 0.0,
                "quantized_flop_share": 0.5, "switches": 0.0, "wall_s": 0.0}

    monkeypatch.setattr(cs, "run_one", fake_run)
    cs.main(["--out", str(tmp_path), "--datasets", "digits", "--seeds", "0,1", "--schedules",
             "random,static-subset", "--random-subsets", "3"])
    assert sorted(c for c in calls if c[0].startswith("static-subset:select=random")) == [
        (f"static-subset:select=random:subset_seed={j}", s) for j in range(3) for s in (0, 1)]
    assert ("static-subset", 0) in calls  # the single-subset row is kept beside it
    t = pd.read_csv(tmp_path / "table.csv").set_index("schedule")
    accs = [0.6 + 0.1 * j + 0.01 * s for j in range(3) for s in (0, 1)]
    mean = sum(accs) / 6
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / 5)
    row = t.loc["static-subset:random"]
    assert row["acc_mean"] == pytest.approx(mean) and row["acc_std"] == pytest.approx(std)
    assert row["seeds"] == 6 and row["subsets"] == 3
    md = (tmp_path / "table.md").read_text()
    assert f"| static-subset:random x3 | {100 * mean:.1f} +- {100 * std:.1f} |" in md
    assert "| static-subset | 50.0 +- 0.0 |" in md


def test_budget_unit_applies_to_every_budgeted_schedule_unless_a_token_sets_it():
    import argparse

    args = argparse.Namespace(epochs=1, epsilon=8.0, batch_size=64, lr=1.0, threads=1, budget=0.5, select="first",
                              budget_unit="layers")
    units = {k: cs.train_config(args, "digits", "cnn", "fp4", k, 0).schedule.budget_unit
             for k in ("random", "static-subset", "dpquant")}
    assert units == {"random": "layers", "static-subset": "layers", "dpquant": "layers"}
    assert cs.train_config(args, "digits", "cnn", "fp4", "fp32", 0).schedule.kind == "fp32"
    tok = "dpquant:sampler=uniform-mix-systematic:budget_unit=flops"
    assert cs.train_config(args, "digits", "cnn", "fp4", tok, 0).schedule.budget_unit == "flops"
    args.budget_unit = None  # each schedule's default
    assert cs.train_config(args, "digits", "cnn", "fp4", "random", 0).schedule.budget_unit == "flops"
    assert cs.train_config(args, "digits", "cnn", "fp4", "dpquant", 0).schedule.budget_unit == "layers"
