"""Pre-pruning and gradient dropping vs unpruned DP-SGD: accuracy and the cost model's speedup, from run folders.

Reads finished run directories named ``<variant>_s<seed>`` under ``--runs`` (written by ``dpquant-sim train``)
and prints one markdown row per variant: final test accuracy (mean +- sample std over seeds), final epsilon,
the private training-set size, the share of GEMM FLOPs kept (run_info.json ``prune.kept_gemm_flop_share``) and
the cost model's theoretical and roofline speedup per training step over the ``--baseline`` variant
(``dpquant_sim.cost.run.cost_run`` on ``--hw``: mean step time over the run, the baseline's divided by the
variant's; a channel-pruned run is costed with its smaller GEMMs; per step, because a public split shrinks
the private set and so the steps per epoch). Reads no data.

    .venv/bin/python analysis/prune_drop_table.py --runs runs/prune_drop --baseline dpsgd \\
        --variants dpsgd,dpsgd_pub10,mag_ch50,synflow_ch50,snippub_ch50,drop_rand50
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _time(run: Path, hw: str) -> tuple[float, float]:
    from dpquant_sim.cost.run import cost_run

    df = cost_run(run, [hw])
    steps = float(df["steps"].sum())
    return float(df["time_theoretical_s"].sum()) / steps, float(df["time_roofline_s"].sum()) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--variants", required=True, help="comma-separated variant names (folder prefixes)")
    ap.add_argument("--baseline", default="dpsgd")
    ap.add_argument("--hw", default="h100_sxm")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    base_dirs = sorted(a.runs.glob(f"{a.baseline}_s*"))
    if not base_dirs:
        raise SystemExit(f"no {a.baseline}_s* run folders under {a.runs}")
    bt = _time(base_dirs[0], a.hw)
    print(f"| variant | test acc % (mean +- std) | seeds | epsilon | private n_train | kept GEMM FLOP share | "
          f"speedup per step, theoretical / roofline ({a.hw}) |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        dirs = sorted(d for d in a.runs.glob(f"{v}_s*") if (d / "summary.json").is_file())
        if not dirs:
            print(f"| {v} | (no finished runs) | 0 | | | | |")
            continue
        sums = [json.loads((d / "summary.json").read_text()) for d in dirs]
        info = json.loads((dirs[0] / "run_info.json").read_text())
        accs = [100 * s["test_acc"] for s in sums]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        eps = max(s["epsilon"] for s in sums)
        kept = (info.get("prune") or {}).get("kept_gemm_flop_share", 1.0)
        t = _time(dirs[0], a.hw)
        print(f"| {v} | {statistics.mean(accs):.1f} +- {sd:.1f} | {len(accs)} | {eps:.3f} | {info['n_train']} | "
              f"{kept:.3f} | {bt[0] / t[0]:.2f} / {bt[1] / t[1]:.2f} |")


if __name__ == "__main__":
    main()
