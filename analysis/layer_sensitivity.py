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

With ``--compare-estimators`` it also compares dpquant's two estimators (``estimator: forward | training``,
``dpquant_sim.schedules.estimators``) on the same model: per estimator, the noise-free R_l and clipped R_l over
the whole training set, the sampling std and the DP noise std at the SAME estimator epsilon (the training
estimator is accounted with sensitivity 2 C_s, so its sigma_s is twice the forward one's), the SNR per
estimate, the rank correlation of the two estimators' clipped R_l, and the wall-clock seconds of one estimate at
the estimator's sample rate q_s (median of ``--timing-repeats``, both timed in the same process, ratio
training / forward). Writes ``OUT/estimators.csv`` (per layer) and ``OUT/estimators.json`` (summary).

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
    if mech:  # the ledger's sigma is sigma_s / the estimator's sensitivity factor; the noise std is sigma_s C_s
        from dpquant_sim.schedules.estimators import get_estimator

        sigma *= get_estimator(sched.estimator).sensitivity_factor
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


def _estimator_sigma(cfg, estimator: str) -> tuple[float, float, float]:
    """(sigma_s, q_s, C_s) of dpquant's ``estimator`` at the run's epsilon, delta and epochs: the run's own
    estimator settings when it ran dpquant (auto sigma resolved per estimator), otherwise dpquant's defaults."""
    from dpquant_sim.schedules.configs import DPQuantConfig
    from dpquant_sim.schedules.dpquant import resolve_estimator_noise

    base = cfg.schedule if getattr(cfg.schedule, "kind", None) == "dpquant" else DPQuantConfig()
    sched = base.model_copy(update={"estimator": estimator})
    if base.estimator != estimator and base.noise_multiplier is not None:  # same epsilon: rescale the sigma
        from dpquant_sim.schedules.estimators import get_estimator

        f = get_estimator(estimator).sensitivity_factor / get_estimator(base.estimator).sensitivity_factor
        sched = sched.model_copy(update={"noise_multiplier": base.noise_multiplier * f})
    sched = resolve_estimator_noise(sched, epochs=cfg.epochs, epsilon=cfg.epsilon if cfg.private else None,
                                    delta=cfg.delta, accountant=cfg.accountant)
    return float(sched.noise_multiplier), float(sched.sample_rate), float(sched.clip)


def _snr_columns(d: np.ndarray, clip: float, q: float, noise: float, n_train: int) -> tuple[dict, float, float]:
    """Per-layer R, clipped R, sampling std of one estimate over a training set of ``n_train`` examples (of which
    ``d``'s rows are all or the first few: Var = (1 - q) mean_i(dc_il^2) / (q n_train)), the SNR and the share of
    rows clipped."""
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    dc = d * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    cols = {"R": d.mean(0), "R_clipped": dc.mean(0),
            "sampling_std": np.sqrt((1 - q) * (dc ** 2).mean(0) / (q * n_train))}
    total = np.sqrt(cols["sampling_std"] ** 2 + noise ** 2)
    snr = float(cols["R_clipped"].std(ddof=1) / np.sqrt((total ** 2).mean())) if d.shape[1] > 1 else float("nan")
    return cols, snr, float((norms[:, 0] > clip).mean())


def compare_estimators(run_dir: str | Path, recipe: str | None = None, *, iters: int = 1, lr: float | None = None,
                       repeats: int = 5, max_examples: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Forward vs training estimator on a finished run's model: per-layer table and a summary dict (SNR per
    estimate at the same estimator epsilon, wall-clock seconds per estimate and their ratio, same process).

    ``max_examples``: compute the noise-free R_l from the first M training examples only (the training
    estimator costs (L + 1)(3 iters + 1) batch-of-one passes per example); the noise figures still refer to
    one estimate on the whole training set (N), the timings too."""
    import time

    from dpquant_sim.nn.shapes import gemm_layers
    from dpquant_sim.training.engine import load_run
    from dpquant_sim.training.sensitivity import make_loss_delta_fn
    from dpquant_sim.training.sensitivity_training import make_training_delta_fn

    cfg, data, model = load_run(run_dir)
    recipe = recipe or cfg.recipe
    names = [s.name for s in gemm_layers(model, data.input_shape)]
    n = len(data.train)
    fwd = make_loss_delta_fn(model, data.train, recipe=recipe, dp=cfg.private)
    sub = data.train
    if max_examples is not None and max_examples < n:
        from torch.utils.data import TensorDataset

        sub = TensorDataset(*(t[:max_examples] for t in data.train.tensors))
    fwd_sub = make_loss_delta_fn(model, sub, recipe=recipe, dp=cfg.private)
    step = cfg.lr / cfg.batch_size if lr is None else float(lr)  # the engine's default: one example's share
    trn_sub = make_training_delta_fn(model, sub, recipe=recipe, lr=step, grad_clip=cfg.max_grad_norm,
                                     dp=cfg.private)
    trn = make_training_delta_fn(model, data.train, recipe=recipe, lr=step, grad_clip=cfg.max_grad_norm,
                                 dp=cfg.private)
    call = {"forward": lambda q, g: fwd(names, q, g),
            "training": lambda q, g: trn(names, q, g, iters=iters)}
    table = pd.DataFrame({"layer": names})
    summary: dict = {"run": str(run_dir), "recipe": str(recipe), "n_train": n, "n_rows": len(sub),
                     "layers": len(names),
                     "estimator_iters": iters, "estimator_lr": step,
                     "estimator_grad_clip": cfg.max_grad_norm, "timing_repeats": repeats}
    full = {}
    rows = {"forward": lambda g: fwd_sub(names, 1.0, g), "training": lambda g: trn_sub(names, 1.0, g, iters=iters)}
    for est in ("forward", "training"):
        sigma, q, clip = _estimator_sigma(cfg, est)
        d, _ = rows[est](torch.Generator().manual_seed(0))  # every example (of the first M): noise-free R_l
        d = d.double().numpy()
        full[est] = d
        noise = sigma * clip / (q * n)
        cols, snr, clipped = _snr_columns(d, clip, q, noise, n)
        for k, v in cols.items():
            table[f"{est}_{k}"] = v
        summary[est] = {"sigma_s": sigma, "q_s": q, "clip_s": clip, "noise_std": noise,
                        "sampling_std_rms": float(np.sqrt((cols["sampling_std"] ** 2).mean())),
                        "spread_clipped_R": float(np.std(cols["R_clipped"], ddof=1)) if len(names) > 1 else 0.0,
                        "snr": snr, "clipped_fraction": clipped, "per_example_sd": float(d.std(0, ddof=1).mean())}
    # one estimate's rows at the estimator's own rate (privatisation is negligible), the two estimators
    # interleaved so that a change in the machine's load hits both
    times: dict = {"forward": [], "training": []}
    for r in range(repeats):
        for est in ("forward", "training"):
            t0 = time.perf_counter()
            call[est](summary[est]["q_s"], torch.Generator().manual_seed(1000 + r))
            times[est].append(time.perf_counter() - t0)
    for est in ("forward", "training"):
        summary[est]["seconds_per_estimate"] = float(np.median(times[est]))
    summary["time_ratio_training_over_forward"] = (summary["training"]["seconds_per_estimate"]
                                                   / summary["forward"]["seconds_per_estimate"])
    a, b = table["forward_R_clipped"].rank(), table["training_R_clipped"].rank()
    summary["spearman_clipped_R"] = float(np.corrcoef(a, b)[0, 1]) if len(names) > 1 else float("nan")
    summary["row_correlation"] = float(np.corrcoef(full["forward"].ravel(), full["training"].ravel())[0, 1])
    return table, summary


def estimator_markdown(summary: dict) -> str:
    """The side-by-side table of ``compare_estimators``'s summary, as markdown."""
    rows = ["| estimator | sigma_s | DP noise std | sampling std (rms) | spread of clipped R_l | SNR per estimate "
            "| rows clipped | s per estimate |", "|---|---|---|---|---|---|---|---|"]
    for est in ("forward", "training"):
        s = summary[est]
        rows.append(f"| {est} | {s['sigma_s']:.3g} | {s['noise_std']:.4f} | {s['sampling_std_rms']:.4f} | "
                    f"{s['spread_clipped_R']:.4f} | {s['snr']:.2f} | {100 * s['clipped_fraction']:.0f}% | "
                    f"{s['seconds_per_estimate']:.3f} |")
    rows.append(f"\ntraining estimator: {summary['estimator_iters']} step(s) of size {summary['estimator_lr']:.4g}, "
                f"clip {summary['estimator_grad_clip']:g}; R_l from {summary['n_rows']} of {summary['n_train']} "
                f"examples; training / forward wall-clock per estimate: "
                f"{summary['time_ratio_training_over_forward']:.1f}x (median of {summary['timing_repeats']}, "
                f"interleaved); Spearman rank correlation of clipped R_l: {summary['spearman_clipped_R']:.2f}")
    return "\n".join(rows)


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
    p.add_argument("--compare-estimators", action="store_true",
                   help="also compare the forward and training estimators (SNR per estimate, wall-clock cost)")
    p.add_argument("--estimator-iters", type=int, default=1, help="training estimator: short steps per policy")
    p.add_argument("--estimator-lr", type=float, default=None, help="training estimator: step size (default: "
                   "the run's lr / batch size, as in training)")
    p.add_argument("--timing-repeats", type=int, default=5, help="estimates timed per estimator (median)")
    p.add_argument("--max-examples", type=int, default=None, help="R_l of the estimator comparison from the first M "
                   "training examples only (default: all)")
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
    if args.compare_estimators:
        layers_t, summary = compare_estimators(run, args.recipe, iters=args.estimator_iters, lr=args.estimator_lr,
                                               repeats=args.timing_repeats, max_examples=args.max_examples)
        atomic_write_df(out / "estimators.csv", layers_t)
        atomic_write_text(out / "estimators.json", json.dumps(summary, indent=1))
        print(estimator_markdown(summary))
    return table


if __name__ == "__main__":
    main()
