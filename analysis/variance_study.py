#!/usr/bin/env python
"""Variance-amplification study: does DP noise amplify quantization variance the way the DPQuant paper argues?

    python analysis/variance_study.py --out runs/variance --quick   # 1.5 minutes on 2 cores (under 5)
    python analysis/variance_study.py --out runs/variance           # full: 3 seeds, CNN (about 25 min on 2 cores)

Parts (``--only`` picks some; default: law, mechanism, rotation; then the report):

  law         Proposition 1 per recipe: Var(q(x)) against ||x||_inf^2 over inputs of varying spread, for every
              registered recipe's grad quantizer (per-sample, MX and NVFP4 block scales): fitted exponent and
              constant -> law_points.csv, law_fits.csv
  mechanism   the same model, data and seed trained as SGD, SGD + the same Gaussian noise (no clipping) and
              DP-SGD; per epoch and layer: ||dy_i||_inf and ||dy_i||_2 of the raw per-example output gradients,
              noise per coordinate / clipped gradient element, each recipe's realized quantization error on
              them; at validation epochs the corrected analytic model's prediction of the variance stochastic
              rounding adds to the released update against its measurement at the same batch size
              -> grad_norms.csv, update_variance.csv, runs.csv
  rotation    DP-SGD under static-all, static-subset, random and dpquant: measured E[Var(g_l)] against
              (1 - p_l) Var_fp + p_l Var_q per layer, and against accuracy -> rotation.csv
  analytic    (optional) amax-scaled relative MSE per format, distribution and scale-group size (numerical
              integration) -> analytic_relative_mse.{csv,html}
  drop        (optional) accuracy drop of static-all vs fp32 with and without DP noise, two sweeps
              -> empirical/variance-{nodp,dp}/ (each with its report.html), empirical_drop.{csv,html}

and report.html (plotly, self-contained) with every figure's CSV under report_data/. Resumable: training runs
and finished probes are reused (delete --out to start over). Heavy parts run one thread per run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

PARTS = ("law", "mechanism", "rotation", "analytic", "drop")
DEFAULT_PARTS = ("law", "mechanism", "rotation")
FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8", "int4"]


def _csv_list(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def law(out: Path, args) -> None:
    from dpquant_sim.analysis.variance_law import fit_law, law_points
    from dpquant_sim.io import atomic_write_df
    from dpquant_sim.nn.config import RECIPES

    pts = law_points(list(RECIPES), points=8 if args.quick else 16, reps=2, draws=4)
    fits = fit_law(pts)
    atomic_write_df(out / "law_points.csv", pts)
    atomic_write_df(out / "law_fits.csv", fits)
    cols = ["recipe", "format", "scaling", "exponent", "exponent_se", "constant", "ratio_min", "ratio_max",
            "block_exponent", "follows"]
    print(fits[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))


def mechanism(out: Path, args) -> None:
    from dpquant_sim.analysis.mechanism import MechanismConfig, default_recipes, run_mechanism
    from dpquant_sim.analysis.variance_report import loss_adjusted_table, mechanism_table, quant_table, update_table
    from dpquant_sim.io import atomic_write_df

    frames: dict[str, list[pd.DataFrame]] = {"grad_norms": [], "update_variance": [], "runs": []}
    for model in args.models:
        cfg = MechanismConfig(
            dataset=args.dataset, model=model, epochs=args.epochs or (4 if args.quick else 15),
            lr=args.lr, batch_size=args.batch_size, epsilon=args.epsilon,
            regimes=tuple(args.regimes), seeds=tuple(args.seeds),
            recipes=tuple(args.recipes) if args.recipes else default_recipes(),
            update_draws=4 if args.quick else 8,
            validate_every=args.validate_every if args.validate_every is not None else (0 if args.quick else 5),
            threads=args.threads)
        t0 = time.time()
        res = run_mechanism(cfg, out / "mechanism" / model,
                            log=lambda s: print(f"  [{time.time() - t0:6.0f} s] {model}: {s}", flush=True))
        for k in frames:
            frames[k].append(res[k].assign(model=model) if k == "runs" else res[k])
    gn = pd.concat(frames["grad_norms"], ignore_index=True)
    uv = pd.concat(frames["update_variance"], ignore_index=True)
    atomic_write_df(out / "grad_norms.csv", gn)
    atomic_write_df(out / "update_variance.csv", uv)
    atomic_write_df(out / "runs.csv", pd.concat(frames["runs"], ignore_index=True))
    for table in (mechanism_table(gn), loss_adjusted_table(gn), quant_table(gn), update_table(uv)):
        print(table.to_string(index=False))


def rotation(out: Path, args) -> None:
    from dpquant_sim.analysis.rotation import RotationConfig, run_rotation
    from dpquant_sim.analysis.variance_report import rotation_tables
    from dpquant_sim.io import atomic_write_df

    frames = []
    for model in args.models:
        cfg = RotationConfig(
            dataset=args.dataset, model=model, epochs=args.rotation_epochs or (3 if args.quick else 10),
            recipe=args.rotation_recipe, seeds=tuple(args.seeds), epsilon=args.epsilon,
            schedules=("static-all", "random", "dpquant") if args.quick else
            ("static-all", "static-subset", "random", "dpquant"),
            update_draws=3 if args.quick else 6, threads=args.threads)
        t0 = time.time()
        frames.append(run_rotation(cfg, out / "rotation" / model,
                                   log=lambda s: print(f"  [{time.time() - t0:6.0f} s] {model}: {s}", flush=True)))
    rot = pd.concat(frames, ignore_index=True)
    atomic_write_df(out / "rotation.csv", rot)
    print(rotation_tables(rot)[1].to_string(index=False))


def analytic(out: Path, args) -> None:
    from dpquant_sim.analysis import variance as V
    from dpquant_sim.analysis.figures import line_figure, write_figure

    fmts = ["fp8_e4m3", "fp4_e2m1", "int8", "int4"] if args.quick else FORMATS
    # n=1 (one scale per element) is exact for amax scaling, so it is left out of the log-scale figure.
    ns = (16, 32, 256, 4096) if args.quick else (4, 16, 32, 128, 256, 1024, 4096, 65536)
    t = V.analytic_table(fmts, ns=ns, k=16 if args.quick else 32)
    t["series"] = t["format"] + " / " + t["rounding"]
    fig = line_figure(t, x="n", y="relative_mse", color="series", facet="distribution", log_x=True, log_y=True,
                      title="Analytic quantization error (amax scaling): relative MSE vs elements per scale",
                      x_title="elements sharing one scale (n)", y_title="E[(q(x)-x)^2] / E[x^2]")
    write_figure(fig, t, out / "analytic_relative_mse")
    print(f"analytic: {len(t)} rows")


def drop(out: Path, args) -> None:
    from dpquant_sim.analysis.figures import line_figure, write_figure
    from dpquant_sim.analysis.report import build_report
    from dpquant_sim.analysis.variance import quantization_drop
    from dpquant_sim.sweep.collect import collect_sweep
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.sweep.runner import run_sweep

    base = {"dataset": args.dataset, "model": "mlp" if args.quick else "cnn", "epochs": 2 if args.quick else 6,
            "batch_size": 64, "lr": 1.0}
    grid = {"schedule": [{"kind": "fp32"}, {"kind": "static-all"}], "recipe": ["fp8", "fp4"],
            "seed": [0] if args.quick else [0, 1, 2]}
    sweeps = [
        # Non-private SGD sees unclipped gradients (larger norm than DP's clipped mean): lr 0.1 keeps it stable.
        {"name": "variance-nodp", "base": {**base, "private": False, "lr": 0.1}, "grid": grid},
        {"name": "variance-dp", "base": {**base, "private": True},
         "grid": {**grid, "noise_multiplier": [0.5, 1.0, 2.0] if args.quick else [0.5, 1.0, 2.0, 4.0]}},
    ]
    edir = out / "empirical"
    tables = []
    for raw in sweeps:  # one folder per sweep (a run folder holds one sweep)
        cfg = SweepConfig.from_dict({**raw, "accelerators": ["h100_sxm", "b200"]})
        sdir = edir / raw["name"]
        res = run_sweep(cfg, sdir, workers=args.workers, collect=False)
        if res.failed:
            print(f"warning: {len(res.failed)} empirical runs failed (see {sdir}/runs/*/error.txt)", file=sys.stderr)
        tables.append(collect_sweep(sdir, accelerators=["h100_sxm", "b200"], points=res.points))
        build_report(sdir, title=f"Variance study: empirical sweep {raw['name']}")
    table = pd.concat(tables, ignore_index=True)
    table["noise_multiplier"] = table["noise_multiplier_cfg"].fillna(0.0).where(table["private"], 0.0)
    d = quantization_drop(table, by=("dataset", "model", "noise_multiplier", "recipe"))
    d = d[d["schedule_kind"] == "static-all"]
    fig = line_figure(d, x="noise_multiplier", y="drop_mean", error="drop_std", color="recipe",
                      title="Empirical: accuracy drop of static-all quantization vs fp32 (0 = no DP noise), batch 64",
                      x_title="noise multiplier (0: non-private SGD)", y_title="test accuracy drop (fp32 - quantized)")
    write_figure(fig, d, out / "empirical_drop")
    print(f"drop: {table['point_id'].nunique()} runs; drops:\n{d.to_string(index=False)}")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from dpquant_sim.errors import ConfigError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 4 mechanism epochs, 3 rotation epochs over static-all/random/dpquant, fewer draws "
                         "(under 5 minutes on 2 cores)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts (repeatable)")
    ap.add_argument("--models", type=_csv_list, default=["cnn"], help="comma list of models (default cnn)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seeds", type=lambda s: [int(t) for t in _csv_list(s)], default=None,
                    help="comma list (default 0,1,2; --quick: 0)")
    ap.add_argument("--epochs", type=int, default=None, help="mechanism epochs (default 15; --quick: 4)")
    ap.add_argument("--rotation-epochs", type=int, default=None, help="rotation epochs (default 10; --quick: 3)")
    ap.add_argument("--regimes", type=_csv_list, default=None,
                    help="comma list of regimes, optionally with their own learning rate (default "
                         "sgd,sgd+noise,dp-sgd,dp-sgd:lr=2; --quick: sgd,sgd+noise,dp-sgd)")
    ap.add_argument("--validate-every", type=int, default=None,
                    help="measure the update variance every k-th epoch and at the last (default 5; 0: last only; "
                         "--quick: last only)")
    ap.add_argument("--recipes", type=_csv_list, default=None,
                    help="mechanism recipes (default: fp8, fp4, luq_fp4, int8, those registered)")
    ap.add_argument("--rotation-recipe", default="fp4")
    ap.add_argument("--lr", type=float, default=0.25, help="mechanism learning rate, all regimes (default 0.25)")
    ap.add_argument("--batch-size", type=int, default=256, help="expected batch size B (default 256)")
    ap.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD target epsilon (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run (default 1)")
    ap.add_argument("--workers", type=int, default=None, help="parallel training runs (drop part)")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.regimes is None:
        args.regimes = ["sgd", "sgd+noise", "dp-sgd"] + ([] if args.quick else ["dp-sgd:lr=2"])
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only or list(DEFAULT_PARTS)
    fns = {"law": law, "mechanism": mechanism, "rotation": rotation, "analytic": analytic, "drop": drop}
    import torch

    torch.set_num_threads(args.threads)
    try:
        for part in parts:
            t0 = time.time()
            print(f"== {part}", flush=True)
            fns[part](args.out, args)
            print(f"{part}: {time.time() - t0:.0f} s", flush=True)
        from dpquant_sim.analysis.variance_report import build_variance_report

        if any(p in parts for p in ("law", "mechanism", "rotation")) or (args.out / "grad_norms.csv").is_file():
            rep = build_variance_report(args.out, meta=f"dpquant-sim {_git_commit()}; command: variance_study.py "
                                        + " ".join(sys.argv[1:] if argv is None else argv))
            print(f"report: {rep}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
