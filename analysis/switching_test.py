"""Switching ablation: does switching a layer's precision cost accuracy by itself?

Reads a finished sweep of ``random`` schedules (analysis/sweeps/switching_cpu.yaml or switching.yaml) and sorts
each run into an arm by its schedule:

- ``hold``: ``hold_epochs >= epochs`` (one random set for the whole run; no layer ever switches),
- ``redraw``: ``hold_epochs == 1``, ``pattern: redraw`` (a fresh random set every epoch),
- ``alternate``: ``pattern: alternate`` (one random set of twice the share, on and off every epoch),
- anything else (e.g. ``hold_epochs: 2``) is ``hold<R>``; other schedule kinds (fp32, static-all: context arms)
  are named by their kind.

For each arm: final test accuracy mean +- sample std over seeds, and the mean number of layers switching
precision per epoch (from the plans). For each pair of arms: difference of means, Welch's t-test, and a
two-sided permutation test of the difference of means (``--permutations`` random relabellings, fixed seed;
p = (1 + #|diff*| >= |diff|) / (1 + permutations)), with Holm's correction over the pairs reported. Only the
switching arms (hold, redraw, alternate) are compared (3 comparisons); context arms (fp32, static-all) are
only tabulated.

    python analysis/switching_test.py runs/switching_cpu runs/switching_cpu_context [--out FILE.md]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from dpquant_sim.analysis.stats import holm
from dpquant_sim.plan import read_metrics


def arm_of(schedule: dict, epochs: int) -> str:
    """The ablation arm of a random schedule config.

    >>> arm_of({"kind": "random", "hold_epochs": 4}, 4), arm_of({"kind": "random"}, 4)
    ('hold', 'redraw')
    >>> arm_of({"kind": "random", "pattern": "alternate"}, 4), arm_of({"kind": "random", "hold_epochs": 2}, 4)
    ('alternate', 'hold2')
    >>> arm_of({"kind": "static-all"}, 4)
    'static-all'
    """
    if schedule.get("kind") != "random":
        return str(schedule.get("kind"))
    if schedule.get("pattern", "redraw") == "alternate":
        return "alternate"
    h = int(schedule.get("hold_epochs", 1))
    return "redraw" if h == 1 else ("hold" if h >= epochs else f"hold{h}")


def switches_per_epoch(plans: list[str]) -> float:
    """Mean size of the symmetric difference of consecutive epochs' quantized sets.

    >>> switches_per_epoch(['{"quantized": {"a": "fp4"}}', '{"quantized": {}}', '{"quantized": {"a": "fp4"}}'])
    1.0
    """
    sets = [frozenset(json.loads(p)["quantized"]) for p in plans]
    return sum(len(a ^ b) for a, b in zip(sets, sets[1:])) / (len(sets) - 1) if len(sets) > 1 else 0.0


def load_runs(sweep_dir: Path) -> pd.DataFrame:
    rows = []
    for run in sorted((sweep_dir / "runs").iterdir()):
        summary = run / "summary.json"
        if not summary.exists():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        s = json.loads(summary.read_text())
        if not s.get("complete"):
            continue
        m = read_metrics(run)  # metrics.csv with each epoch's plan joined from plans.jsonl
        rows.append({"run": run.name, "arm": arm_of(cfg["schedule"], int(cfg["epochs"])), "seed": cfg["seed"],
                     "test_acc": s["test_acc"], "epsilon": s["epsilon"],
                     "layer_share": float(np.mean([len(json.loads(p)["quantized"]) for p in m["plan"]])),
                     "switches": switches_per_epoch(list(m["plan"]))})
    return pd.DataFrame(rows)


def permutation_p(a: np.ndarray, b: np.ndarray, permutations: int, seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference of means (random relabellings, fixed seed).

    >>> permutation_p(np.array([1.0, 1.1, 0.9]), np.array([1.0, 1.1, 0.9]), 999) == 1.0
    True
    """
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([a, b])
    obs = abs(a.mean() - b.mean())
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(pooled)
        hits += int(abs(p[: a.size].mean() - p[a.size:].mean()) >= obs - 1e-15)
    return float((1 + hits) / (1 + permutations))


def analyse(runs: pd.DataFrame, permutations: int = 20000) -> tuple[pd.DataFrame, pd.DataFrame]:
    arms = pd.DataFrame([{"arm": k, "seeds": len(g), "acc_mean": g.test_acc.mean(), "acc_std": g.test_acc.std(),
                          "layers_quantized": g.layer_share.mean(), "switches": g.switches.mean(),
                          "epsilon": g.epsilon.mean()} for k, g in runs.groupby("arm", sort=True)])
    pairs = []
    tested = [a for a in ("hold", "redraw", "alternate") if a in set(runs.arm)] or sorted(runs.arm.unique())
    for x, y in itertools.combinations(tested, 2):
        a = runs[runs.arm == x].test_acc.to_numpy()
        b = runs[runs.arm == y].test_acc.to_numpy()
        t = stats.ttest_ind(a, b, equal_var=False)
        pairs.append({"a": x, "b": y, "diff": a.mean() - b.mean(),
                      "se": float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)),
                      "welch_t": float(t.statistic), "welch_p": float(t.pvalue),
                      "perm_p": permutation_p(a, b, permutations)})
    pairs_df = pd.DataFrame(pairs)
    if len(pairs_df):
        pairs_df["welch_p_holm"] = holm(list(pairs_df.welch_p))
        pairs_df["perm_p_holm"] = holm(list(pairs_df.perm_p))
    return arms, pairs_df


def to_markdown(arms: pd.DataFrame, pairs: pd.DataFrame) -> str:
    lines = ["| arm | seeds | test acc (mean +- std) | quantized layers / epoch | layers switched / epoch | epsilon |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.arm} | {r.seeds} | {100 * r.acc_mean:.1f} +- {100 * r.acc_std:.1f} | {r.layers_quantized:.2f} "
              f"| {r.switches:.2f} | {r.epsilon:.2f} |" for r in arms.itertuples()]
    lines += ["", "| comparison | diff (points) +- se | Welch t | Welch p (Holm) | permutation p (Holm) |",
              "|---|---|---|---|---|"]
    lines += [f"| {r.a} - {r.b} | {100 * r.diff:+.1f} +- {100 * r.se:.1f} | {r.welch_t:+.2f} | {r.welch_p:.3f} "
              f"({r.welch_p_holm:.3f}) | {r.perm_p:.3f} ({r.perm_p_holm:.3f}) |" for r in pairs.itertuples()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dirs", type=Path, nargs="+", help="finished sweep folders (e.g. arms + context arms)")
    p.add_argument("--permutations", type=int, default=20000)
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default SWEEP_DIR/switching.md)")
    args = p.parse_args(argv)
    runs = pd.concat([load_runs(d) for d in args.sweep_dirs], ignore_index=True)
    if runs.empty:
        raise SystemExit(f"switching_test: no complete runs under {[str(d / 'runs') for d in args.sweep_dirs]}")
    arms, pairs = analyse(runs, args.permutations)
    md = to_markdown(arms, pairs)
    out = args.out or args.sweep_dirs[0] / "switching.md"
    out.write_text(md)
    runs.to_csv(out.with_name("switching_runs.csv"), index=False)
    print(md)
    return md


if __name__ == "__main__":
    main()
