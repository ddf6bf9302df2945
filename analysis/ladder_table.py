"""The DPQuant paper's ablation ladder from a finished sweep (analysis/sweeps/ladder.yaml).

Rungs, per (epsilon, layer ratio): ``static`` (static-subset with select: random; one random subset per seed,
so mean +- std is over random subsets, the paper's form) -> ``+rotation`` (random) -> ``+prioritization``
(dpquant) -> ``fp32`` (per epsilon; no ratio). Reads SWEEP/results.csv (the final epoch of every complete
point, first accelerator only: accuracy does not depend on the costed accelerator).

Pre-registered comparisons, one-sided, in every (epsilon, ratio) cell: dpquant > random (prioritization helps)
and random > static (rotation helps); Welch's t-test on final test accuracy, Holm's correction over all of
them (2 x cells). Differences are in accuracy points with the unpaired standard error.

    python analysis/ladder_table.py runs/ladder [--out runs/ladder/ladder.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dpquant_sim.analysis.stats import holm

RUNGS = (("static", "static-subset"), ("+rotation", "random"), ("+prioritization", "dpquant"), ("fp32", "fp32"))
COMPARISONS = (("dpquant", "random"), ("random", "static-subset"))


def final_rows(results: pd.DataFrame) -> pd.DataFrame:
    """One row per point: its last epoch, on the first accelerator listed."""
    r = results
    if "accelerator" in r:
        r = r[r["accelerator"] == r["accelerator"].iloc[0]]
    r = r.sort_values("epoch").groupby("point_id", sort=False).tail(1)
    if "complete" in r:
        r = r[r["complete"].astype(bool)]
    return r.reset_index(drop=True)


def ladder(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, tests): mean +- std of the final test accuracy per (epsilon, ratio, rung) and the pre-registered
    one-sided Welch tests with Holm's correction."""
    runs = runs.copy()
    runs["ratio"] = np.where(runs["schedule_kind"] == "fp32", np.nan, runs["budget"])
    rows = []
    for (eps, kind), g in runs.groupby(["target_epsilon", "schedule_kind"], sort=True):
        for ratio, h in (g.groupby("ratio", sort=True) if kind != "fp32" else [(np.nan, g)]):
            rung = next((name for name, k in RUNGS if k == kind), kind)
            rows.append({"epsilon": eps, "ratio": ratio, "rung": rung, "schedule": kind, "seeds": len(h),
                         "acc_mean": h["test_acc"].mean(), "acc_std": h["test_acc"].std()})
    table = pd.DataFrame(rows)
    tests = []
    for (eps, ratio), g in runs[runs["schedule_kind"] != "fp32"].groupby(["target_epsilon", "ratio"], sort=True):
        for a, b in COMPARISONS:
            x = g[g["schedule_kind"] == a]["test_acc"].to_numpy()
            y = g[g["schedule_kind"] == b]["test_acc"].to_numpy()
            if len(x) < 2 or len(y) < 2:
                continue
            t = stats.ttest_ind(x, y, equal_var=False, alternative="greater")
            tests.append({"epsilon": eps, "ratio": ratio, "comparison": f"{a} > {b}", "diff": x.mean() - y.mean(),
                          "se": float(np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))),
                          "t": float(t.statistic), "p": float(t.pvalue)})
    tests_df = pd.DataFrame(tests, columns=["epsilon", "ratio", "comparison", "diff", "se", "t", "p"])
    tests_df["p_holm"] = holm(list(tests_df["p"])) if len(tests_df) else []
    return table, tests_df


def to_markdown(table: pd.DataFrame, tests: pd.DataFrame) -> str:
    lines = ["| epsilon | layer ratio | rung | schedule | test acc (mean +- std) | seeds |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        ratio = "-" if pd.isna(r.ratio) else f"{r.ratio:g}"
        std = 0.0 if pd.isna(r.acc_std) else r.acc_std
        lines.append(f"| {r.epsilon:g} | {ratio} | {r.rung} | {r.schedule} | {100 * r.acc_mean:.1f} +- "
                     f"{100 * std:.1f} | {r.seeds} |")
    lines += ["", "| epsilon | layer ratio | pre-registered (one-sided) | diff (points) +- se | Welch t | p (Holm) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r.epsilon:g} | {r.ratio:g} | {r.comparison} | {100 * r.diff:+.1f} +- {100 * r.se:.1f} | "
              f"{r.t:+.2f} | {r.p:.3f} ({r.p_holm:.3f}) |" for r in tests.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="markdown output (default SWEEP_DIR/ladder.md)")
    args = p.parse_args(argv)
    res = args.sweep_dir / "results.csv"
    if not res.exists():
        raise SystemExit(f"ladder_table: {res} does not exist (run the sweep first; it collects results.csv)")
    table, tests = ladder(final_rows(pd.read_csv(res)))
    md = to_markdown(table, tests)
    (args.out or args.sweep_dir / "ladder.md").write_text(md)
    table.to_csv(args.sweep_dir / "ladder_table.csv", index=False)
    tests.to_csv(args.sweep_dir / "ladder_tests.csv", index=False)
    print(md)
    print(json.dumps({"cells": int(tests[["epsilon", "ratio"]].drop_duplicates().shape[0]), "tests": len(tests)}))
    return md


if __name__ == "__main__":
    main()
