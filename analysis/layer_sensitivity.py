"""Noise-free per-layer loss sensitivity of a finished run's model, against the DP estimator's noise.

DPQuant can only beat random rotation if the layers differ in sensitivity by more than its estimator's noise.
This script measures both for a run directory written by ``dpquant-sim train`` (or ``compare_schedules.py``):

- ``R_l``: the mean over the WHOLE training set of ``loss(x; only layer l quantized) - loss(x; full
  precision)`` (the quantity the estimator privatises, DESIGN.md section 1), with its standard error over
  examples, and the same mean after the estimator's per-example L2 clip to ``C_s`` (what the estimator
  targets: clipping biases it);
- the estimator's noise std on each score, ``sigma_s * C_s / (q_s * N)`` (taken from the run's
  ``run_info.json`` when it ran dpquant, otherwise from a dpquant config at the same epsilon and epochs);
- the estimator's sampling std on each score: it sums the clipped deltas of a Poisson sample with rate q_s,
  so Var = (1 - q_s) sum_i dc_il^2 / (q_s N^2) (exact for Poisson sampling);
- SNR = std over layers of the clipped ``R_l`` / rms over layers of the total (sampling + DP) std. Under 1,
  one estimate cannot rank the layers; the EMA over estimates helps by at most sqrt(number of estimates).
  Both noise terms shrink with N (DP noise as 1/N, sampling as 1/sqrt(N)) at a fixed privacy budget.

This is an analysis of PRIVATE data with no privacy protection: it is for studying the method, never for a
model that will be released.

Writes ``OUT/layer_sensitivity.csv`` and ``OUT/layer_sensitivity.html`` (bar chart with error bars and
the noise band), and prints the table::

    .venv/bin/python analysis/layer_sensitivity.py runs/compare_r18w16_eps8/digits/resnet18-w16/fp4/fp32/seed0 \
        --recipe fp4 --out runs/sensitivity_r18w16_digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def estimator_noise_std(run_dir: Path, cfg, n_train: int) -> tuple[float, float, float, float]:
    """(sigma_s, q_s, C_s, noise std per score) for ``cfg``'s run: its own estimator if it ran dpquant,
    otherwise dpquant's defaults at the same epsilon, delta and epochs."""
    from dpquant_sim.schedules.configs import DPQuantConfig
    from dpquant_sim.schedules.dpquant import resolve_estimator_noise

    sched = cfg.schedule if getattr(cfg.schedule, "kind", None) == "dpquant" else DPQuantConfig()
    sched = resolve_estimator_noise(sched, epochs=cfg.epochs, epsilon=cfg.epsilon if cfg.private else None,
                                    delta=cfg.delta, accountant=cfg.accountant)
    info = json.loads((run_dir / "run_info.json").read_text())
    mech = [m for m in info.get("planned_mechanisms", []) if m[0] == "dpquant-estimator"]
    sigma, q = (float(mech[0][1]), float(mech[0][2])) if mech else (sched.noise_multiplier, sched.sample_rate)
    return sigma, q, sched.clip, sigma * sched.clip / (q * n_train)


def layer_sensitivity(run_dir: str | Path, recipe: str | None = None, batch_size: int = 512) -> tuple[pd.DataFrame, dict]:
    """Per-layer table (layer, flops share, R, R se, clipped R) and a dict of the estimator's noise figures."""
    from dpquant_sim.nn.shapes import gemm_layers
    from dpquant_sim.training.engine import load_run
    from dpquant_sim.training.sensitivity import make_loss_delta_fn

    run_dir = Path(run_dir)
    cfg, data, model = load_run(run_dir)
    recipe = recipe or cfg.recipe
    layers = gemm_layers(model, data.input_shape)
    names = [s.name for s in layers]
    flops = np.array([s.forward_flops for s in layers], dtype=np.float64)
    fn = make_loss_delta_fn(model, data.train, recipe=recipe, batch_size=batch_size)
    d, _ = fn(names, 1.0, torch.Generator().manual_seed(0))  # rate 1: every example, no sampling
    d = d.double().numpy()
    n = d.shape[0]
    sigma, q, clip, noise = estimator_noise_std(run_dir, cfg, n)
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    dc = d * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    table = pd.DataFrame({
        "layer": names, "flop_share": flops / flops.sum(), "R": d.mean(0), "R_se": d.std(0, ddof=1) / n ** 0.5,
        "R_clipped": dc.mean(0), "sampling_std": np.sqrt((1 - q) * (dc ** 2).sum(0) / (q * n * n)),
    })
    table["total_std"] = np.sqrt(table["sampling_std"] ** 2 + noise ** 2)
    snr = float(table["R_clipped"].std(ddof=1) / np.sqrt((table["total_std"] ** 2).mean()))
    meta = {"run": str(run_dir), "recipe": str(recipe), "n_train": n, "sigma_s": sigma, "q_s": q, "clip_s": clip,
            "noise_std": noise,
            "sampling_std_rms": float(np.sqrt((table["sampling_std"] ** 2).mean())), "snr": snr, "clipped_fraction": float((norms[:, 0] > clip).mean())}
    return table, meta


def _figure(table: pd.DataFrame, meta: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_bar(x=table["layer"], y=table["R"], name="R_l (mean loss delta)",
                error_y=dict(type="data", array=1.96 * table["R_se"]))
    fig.add_bar(x=table["layer"], y=table["R_clipped"], name=f"clipped to C_s={meta['clip_s']:g}")
    for s in (1, -1):
        fig.add_hline(y=s * meta["noise_std"], line_dash="dot",
                      annotation_text="+- estimator DP noise std" if s > 0 else None)
    fig.update_layout(title=f"Per-layer sensitivity ({meta['recipe']}); SNR {meta['snr']:.2f}: {meta['run']}",
                      yaxis_title="loss(layer quantized) - loss(fp32)", barmode="group", template="plotly_white")
    return fig


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from dpquant_sim.io import atomic_write_df, atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished run directory (config.yaml, run_info.json, checkpoint.pt)")
    p.add_argument("--recipe", default=None, help="quantization recipe (default: the run's)")
    p.add_argument("--out", default=None, help="output folder (default: the run directory)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    for f in ("config.yaml", "run_info.json", "checkpoint.pt"):
        if not (run / f).is_file():
            raise SystemExit(f"run_dir: {str(run)!r} has no {f}; pass a run directory written by dpquant-sim train")
    table, meta = layer_sensitivity(run, args.recipe)
    out = Path(args.out) if args.out else run
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_df(out / "layer_sensitivity.csv", table)
    atomic_write_text(out / "layer_sensitivity.html", _figure(table, meta).to_html(include_plotlyjs=True))
    atomic_write_text(out / "layer_sensitivity.json", json.dumps(meta, indent=1))
    with pd.option_context("display.width", 120, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in meta.items()}))
    return table


if __name__ == "__main__":
    main()
