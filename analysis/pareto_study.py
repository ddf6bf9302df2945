#!/usr/bin/env python
"""Pareto study: schedules x formats x seeds x models x datasets, costed on 6 accelerators.

    python analysis/pareto_study.py --out results/pareto              # analysis/sweeps/pareto_full.yaml (108 runs;
                                                                       # ResNet18 needs a cluster or a GPU box)
    python analysis/pareto_study.py --out results/pareto --quick      # reduced: small CNN, 2 seeds, fp4 (~40 runs)
    python analysis/pareto_study.py --out results/pareto --executor ray --address auto   # on a Ray cluster

Writes into --out: the sweep (runs/, results.csv/.parquet), report.html, and per accelerator-kind
frontier tables + figures:
  frontier_theoretical.{csv,html}, frontier_roofline.{csv,html}   seed-aggregated configurations, on_front flag
  frontier_summary.csv                                              only the points on each front
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ACCELERATORS = ["h100_sxm", "b200", "mi355x", "gaudi3", "tpu_v6e", "a100_sxm"]


def quick_config():
    """The reduced sweep: digits + small synthetic, small CNN, all schedules at budget 0.5, fp4, 2 seeds."""
    from dpquant_sim.sweep.config import SweepConfig

    return SweepConfig.from_dict(
        {
            "name": "pareto-quick",
            "base": {"epochs": 4, "batch_size": 64, "lr": 1.0, "private": True, "epsilon": 8, "model": "cnn",
                     "synthetic": {"channels": 1, "image_size": 8, "num_classes": 10, "noise": 1.0},
                     "n_train": None},
            "grid": {
                "dataset": ["digits", "synthetic"],
                "schedule": [{"kind": "fp32"}, {"kind": "static-all"}, {"kind": "static-subset", "select": "largest"},
                             {"kind": "random"}, {"kind": "dpquant"}],
                "budget": [0.5],
                "recipe": ["fp8", "fp4"],
                "seed": [0, 1],
            },
            "accelerators": ACCELERATORS,
        },
        source="pareto_study --quick",
    )


def frontiers(out: Path, table) -> None:
    from dpquant_sim.analysis.figures import pareto_figure, write_figure
    from dpquant_sim.analysis.report import frontier_table, run_summary

    summary = run_summary(table)
    fronts = []
    for kind in ("theoretical", "roofline"):
        x = f"run_speedup_{kind}"
        fr = frontier_table(summary, x)
        fr["kind"] = kind
        fig = pareto_figure(fr, x=f"{x}_mean", y="test_acc_mean", x_err=f"{x}_std", y_err="test_acc_std",
                            color="schedule_kind", symbol="recipe", facet="accelerator",
                            hover=("schedule", "model", "dataset", "n_seeds"),
                            title=f"Pareto frontier ({kind}): final test accuracy vs speedup over bf16",
                            x_title=f"{kind} speedup over bf16 (x)", y_title="final test accuracy")
        write_figure(fig, fr, out / f"frontier_{kind}")
        fronts.append(fr)
    import pandas as pd

    for fr in fronts:  # one speedup column for both kinds
        k = fr["kind"].iloc[0]
        fr["speedup_mean"] = fr[f"run_speedup_{k}_mean"]
        fr["speedup_std"] = fr[f"run_speedup_{k}_std"]
    allf = pd.concat(fronts, ignore_index=True)
    on = allf[allf["on_front"]].sort_values(["kind", "dataset", "model", "accelerator", "speedup_mean"])
    cols = [c for c in ("kind", "dataset", "model", "accelerator", "schedule", "n_seeds", "test_acc_mean",
                        "test_acc_std", "speedup_mean", "speedup_std") if c in on.columns]
    on[cols].to_csv(out / "frontier_summary.csv", index=False)
    print(on[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="reduced sweep (small CNN only, 2 seeds)")
    ap.add_argument("--config", type=Path, default=ROOT / "sweeps" / "pareto_full.yaml",
                    help="sweep YAML for the full study")
    ap.add_argument("--executor", choices=("local", "ray"), default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--address", default=None, help="Ray cluster address")
    args = ap.parse_args(argv)

    from dpquant_sim.analysis.report import build_report
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import run_sweep

    cfg = quick_config() if args.quick else SweepConfig.from_yaml(args.config)
    t0 = time.time()
    res = run_sweep(cfg, args.out, executor=args.executor, workers=args.workers, address=args.address)
    print(f"sweep: {len(res.finished)} run, {len(res.skipped)} skipped, {len(res.failed)} failed, "
          f"{time.time() - t0:.0f} s")
    if res.table is None or res.table.empty:
        print("no finished runs", file=sys.stderr)
        return 1
    frontiers(args.out, res.table)
    print(f"report: {build_report(args.out)}")
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
