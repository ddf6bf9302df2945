#!/usr/bin/env python
"""Accelerator comparison: what does each schedule buy on each accelerator?

Costs every finished run of a sweep (or demo) folder on the chosen accelerators (default: every shipped
profile) and writes, into --out:
  accelerator_speedup.{csv,html}   theoretical and roofline speedup over bf16 per schedule x accelerator
  accelerator_cost.{csv,html}      whole-run time (roofline), energy and dollars per schedule x accelerator

    dpquant-sim demo --out runs/demo
    python analysis/accelerator_comparison.py --sweep runs/demo --out results/accelerators
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, required=True, help="sweep or demo folder (holds runs/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--accelerators", default="all", help="comma-separated profile names or 'all'")
    args = ap.parse_args(argv)

    from dpquant_sim.analysis.figures import bar_figure, write_figure
    from dpquant_sim.analysis.report import COST_METRICS, _missing_reason, privacy_text, run_summary
    from dpquant_sim.sweep.collect import collect_sweep

    accs = "all" if args.accelerators == "all" else [a.strip() for a in args.accelerators.split(",")]
    table = collect_sweep(args.sweep, accelerators=accs, write=False)
    if table.empty:
        print(f"no finished runs in {args.sweep}", file=sys.stderr)
        return 1
    s = run_summary(table)
    keys = ["dataset", "model", "schedule", "accelerator"]
    sp = s.groupby(keys, sort=False)[["run_speedup_theoretical", "run_speedup_roofline", "test_acc"]].mean()
    sp = sp.reset_index()
    long = sp.melt(id_vars=keys, value_vars=["run_speedup_theoretical", "run_speedup_roofline"], var_name="kind",
                   value_name="speedup")
    long["kind"] = long["kind"].str.replace("run_speedup_", "", regex=False)
    args.out.mkdir(parents=True, exist_ok=True)
    dp = privacy_text(table)
    fig = bar_figure(long, x="accelerator", y="speedup", color="schedule", facet="kind", facet_cols=1,
                     title="Speedup over bf16 per accelerator (whole run, mean over seeds)",
                     y_title="speedup (× over bf16)",
                     caption="Compared: theoretical (peak-FLOP ratios) and roofline (memory traffic and overheads "
                             f"included) whole-run speedup over the same run with every layer in bf16. {dp}.")
    write_figure(fig, sp, args.out / "accelerator_speedup")
    cost_cols = [c for c in ("run_time_roofline_s", "run_energy_j", "run_dollars") if c in s.columns]
    cost = s.groupby(keys, sort=False)[cost_cols].mean().reset_index()
    clong = cost.melt(id_vars=keys, value_vars=cost_cols, var_name="metric", value_name="value")
    clong["metric"] = clong["metric"].map({k: v[0] for k, v in COST_METRICS.items()})
    fig = bar_figure(clong, x="accelerator", y="value", color="schedule", facet="metric", facet_cols=1,
                     y_units={v[0]: (v[1], v[2]) for v in COST_METRICS.values()}, missing=_missing_reason(table),
                     title="Whole-run cost per accelerator (roofline time, energy at TDP, dollars at list price)",
                     caption=f"Compared: whole-run roofline time, energy (× TDP) and cost (× price per hour) per "
                             f"accelerator and schedule, mean over seeds; n/a: the profile lacks that figure. {dp}.")
    fig.update_yaxes(matches=None)
    write_figure(fig, cost, args.out / "accelerator_cost")
    piv = sp.pivot_table(index="schedule", columns="accelerator", values="run_speedup_theoretical")
    print("theoretical speedup over bf16:\n" + piv.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
