#!/usr/bin/env python
"""Variance-amplification study: analytic, empirical (training) and gradient-level, CSV + HTML per figure.

    python analysis/variance_study.py --out results/variance            # full (about 30-60 min on 2 cores)
    python analysis/variance_study.py --out results/variance --quick    # a few minutes

Writes into --out:
  analytic_relative_mse.{csv,html}    relative MSE of amax-scaled quantization vs scale-group size n, per
                                      format, distribution and rounding (n=1 per element ... 4096 per tensor)
  analytic_noise_amplification.{csv,html}  quantization MSE of a gradient tensor before/after DP noise,
                                      relative to the clean gradient's power, vs noise multiplier
  gradient_variance.{csv,html}        variance/bias quantization adds to the clipped gradient after noisy steps
  empirical/                          the training sweep (runs/, results.csv) and report.html
  empirical_drop.{csv,html}           accuracy drop of static-all quantization vs fp32, with and without DP noise
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8", "int4"]


def analytic(out: Path, quick: bool) -> None:
    from dpquant_sim.analysis import variance as V
    from dpquant_sim.analysis.figures import line_figure, write_figure

    fmts = ["fp8_e4m3", "fp4_e2m1", "int8", "int4"] if quick else FORMATS
    # n=1 (one scale per element) is exact for amax scaling, so it is left out of the log-scale figure.
    ns = (16, 32, 256, 4096) if quick else (4, 16, 32, 128, 256, 1024, 4096, 65536)
    t = V.analytic_table(fmts, ns=ns, k=16 if quick else 32)
    t["series"] = t["format"] + " / " + t["rounding"]
    fig = line_figure(t, x="n", y="relative_mse", color="series", facet="distribution", log_x=True, log_y=True,
                      title="Analytic quantization error (amax scaling): relative MSE vs elements per scale",
                      x_title="elements sharing one scale (n)", y_title="E[(q(x)-x)^2] / E[x^2]")
    write_figure(fig, t, out / "analytic_relative_mse")

    rows = []
    sigmas = (0.0, 0.5, 1.0, 2.0, 4.0) if quick else (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    for fmt in ("fp8_e4m3", "fp4_e2m1", "int8", "int4"):
        for rounding in ("nearest", "stochastic"):
            for s in sigmas:
                # Averaged clipped gradient: per-coordinate std 1e-3 (C = 1, B = 256); noise std sigma C / B.
                r = V.noisy_gradient_error(1e-3, s, 1.0, 256, fmt, 4096, rounding=rounding)
                r.update(format=fmt, rounding=rounding, noise_multiplier=s,
                         mse_over_signal=r["mse_noisy"] / 1e-6)
                rows.append(r)
    a = pd.DataFrame(rows)
    a["series"] = a["format"] + " / " + a["rounding"]
    fig = line_figure(a, x="noise_multiplier", y="mse_over_signal", color="series", log_y=True,
                      title="Noise amplifies quantization error: MSE of quantizing the noisy gradient, relative to "
                            "the clean gradient's power (n=4096 per scale, B=256, C=1)",
                      x_title="noise multiplier sigma", y_title="quantization MSE / clean signal power")
    write_figure(fig, a, out / "analytic_noise_amplification")
    print(f"analytic: {len(t)} + {len(a)} rows")


def gradient(out: Path, quick: bool) -> None:
    from dpquant_sim.analysis.figures import line_figure, write_figure
    from dpquant_sim.analysis.variance import gradient_variance

    sig = (0.0, 1.0, 4.0) if quick else (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    frames = []
    for model in (["mlp"] if quick else ["mlp", "cnn"]):
        for recipe in ("fp8", "fp4"):
            frames.append(gradient_variance(recipe=recipe, model=model, noise_multipliers=sig,
                                            warm_steps=10 if quick else 30, trials=4 if quick else 8))
    g = pd.concat(frames, ignore_index=True)
    g["series"] = g["model"] + " / " + g["recipe"]
    fig = line_figure(g, x="noise_multiplier", y="quant_rel", color="series",
                      title="Gradient level: quantization error of the clipped gradient (variance + bias^2) "
                            "relative to its power, after noisy DP-SGD steps",
                      x_title="noise multiplier of the preceding steps", y_title="(var + bias^2) / signal")
    write_figure(fig, g, out / "gradient_variance")
    print(f"gradient: {len(g)} rows")


def empirical(out: Path, quick: bool, workers: int | None) -> None:
    from dpquant_sim.analysis.figures import line_figure, write_figure
    from dpquant_sim.analysis.report import build_report
    from dpquant_sim.analysis.variance import quantization_drop
    from dpquant_sim.sweep.collect import collect_sweep
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import run_sweep

    base = {"dataset": "digits", "model": "mlp" if quick else "cnn", "epochs": 2 if quick else 6,
            "batch_size": 64, "lr": 1.0}
    grid = {"schedule": [{"kind": "fp32"}, {"kind": "static-all"}], "recipe": ["fp8", "fp4"],
            "seed": [0] if quick else [0, 1, 2]}
    sweeps = [
        # Non-private SGD sees unclipped gradients (larger norm than DP's clipped mean): lr 0.1 keeps it stable.
        {"name": "variance-nodp", "base": {**base, "private": False, "lr": 0.1}, "grid": grid},
        {"name": "variance-dp", "base": {**base, "private": True},
         "grid": {**grid, "noise_multiplier": [0.5, 1.0, 2.0] if quick else [0.5, 1.0, 2.0, 4.0]}},
    ]
    edir = out / "empirical"
    points = []
    for raw in sweeps:
        cfg = SweepConfig.from_dict({**raw, "accelerators": ["h100_sxm", "b200"]})
        res = run_sweep(cfg, edir, workers=workers, collect=False)
        if res.failed:
            print(f"warning: {len(res.failed)} empirical runs failed (see {edir}/runs/*/error.txt)", file=sys.stderr)
        points += res.points
    table = collect_sweep(edir, accelerators=["h100_sxm", "b200"], points=points)
    table["noise_multiplier"] = table["noise_multiplier_cfg"].fillna(0.0).where(table["private"], 0.0)
    drop = quantization_drop(table, by=("dataset", "model", "noise_multiplier", "recipe"))
    drop = drop[drop["schedule_kind"] == "static-all"]
    fig = line_figure(drop, x="noise_multiplier", y="drop_mean", error="drop_std", color="recipe",
                      title="Empirical: accuracy drop of static-all quantization vs fp32 (0 = no DP noise)",
                      x_title="noise multiplier (0: non-private SGD)", y_title="test accuracy drop (fp32 - quantized)")
    write_figure(fig, drop, out / "empirical_drop")
    build_report(edir, title="Variance study: empirical sweep")
    print(f"empirical: {table['point_id'].nunique()} runs; drops:\n{drop.to_string(index=False)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--quick", action="store_true", help="small settings (a few minutes on 2 cores)")
    ap.add_argument("--workers", type=int, default=None, help="parallel training runs (empirical part)")
    ap.add_argument("--only", choices=("analytic", "gradient", "empirical"), action="append",
                    help="run only these parts (repeatable)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["analytic", "gradient", "empirical"]
    for part in parts:
        t0 = time.time()
        if part == "analytic":
            analytic(args.out, args.quick)
        elif part == "gradient":
            gradient(args.out, args.quick)
        else:
            empirical(args.out, args.quick, args.workers)
        print(f"{part}: {time.time() - t0:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
