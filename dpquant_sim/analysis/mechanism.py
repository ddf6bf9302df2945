"""The paper's variance-amplification mechanism, measured in training: SGD vs SGD + noise vs DP-SGD.

DPQuant's argument (DESIGN.md section 7): DP noise perturbs the weights, so the next step's raw per-sample
output gradients -- what the backward quantizer sees -- have a larger inf-norm, and a max-scaled quantizer's
variance grows with it (Proposition 1, :mod:`variance_law`). This module trains the same model on the same data
with the same seed (same initial weights, Poisson batches and noise draws) in three regimes (:data:`REGIMES`)

- ``sgd``: no clipping, no noise (``private=False``);
- ``sgd+noise``: no clipping, plus the same Gaussian noise N(0, sigma^2 C^2) on the gradient sum as DP-SGD.
  The engine has no such mode, so it runs as DP-SGD whose clipping bound ``UNCLIPPED_NORM`` (1e6) no example
  reaches, with noise multiplier sigma C / 1e6: the clipped sum is the plain sum, the noise std is sigma C (its
  epsilon column means nothing);
- ``dp-sgd``: clipping at C and noise sigma C, sigma calibrated by the engine for the target epsilon;

all through the public ``training.engine.train`` (one epoch at a time, resumed from its checkpoint, so the
trajectory is exactly that of an uninterrupted run) and, after every epoch (and at initialization, epoch 0),
probes the model on a fixed batch of ``probe_size`` training examples (:mod:`grad_probe`):

- per layer, the distribution over examples of ||dy_i||_inf and ||dy_i||_2 of the raw output gradients
  (sum-reduced loss, so dy_i = d loss_i / d y_i), and of the per-example weight-gradient norms;
- the ratio of the DP noise per coordinate (sigma C) to a clipped gradient element (the RMS element of the
  layer's block of c_i g_i, clip factor at C, median over examples), the paper's "noise is ~25x an element";
- per recipe, the realized quantization error of its grad quantizer on those tensors (and of its weight and
  activation quantizers on the layer's weight and input);
- at validation epochs, per recipe, the variance stochastic rounding adds to the released update with every
  layer quantized: predicted by the corrected analytic model (:func:`grad_probe.predicted_update_variance`,
  exact and Proposition-1-law variants) and measured (:func:`grad_probe.update_variance_mc`), at the same batch
  size B (the probe batch *is* one batch of the run's expected size), next to the DP noise variance.

Example (a few seconds):
    >>> from dpquant_sim.analysis.mechanism import MechanismConfig
    >>> MechanismConfig(epochs=1, seeds=(0,), recipes=("fp4",)).regimes
    ('sgd', 'sgd+noise', 'dp-sgd')
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dpquant_sim.errors import ConfigError
from dpquant_sim.io import atomic_write_df

UNCLIPPED_NORM = 1e6  # clipping bound of the sgd+noise regime: far above any per-example gradient norm here
STUDY_RECIPES = ("fp8", "fp4", "luq_fp4", "int8")  # the list; missing recipes are skipped


@dataclass(frozen=True)
class Regime:
    """How gradients are privatized in one regime: per-example clipping at C and/or Gaussian noise sigma C."""

    name: str
    clip: bool
    noise: bool
    description: str


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("sgd", False, False, "plain SGD: no clipping, no noise"),
    Regime("sgd+noise", False, True, "SGD plus the same Gaussian noise N(0, sigma^2 C^2) on the sum, no clipping"),
    Regime("dp-sgd", True, True, "DP-SGD: per-example clipping at C, noise N(0, sigma^2 C^2) on the sum"),
)}


def parse_regime(token: str) -> tuple[Regime, float | None]:
    """A ``regimes`` entry: a regime name, optionally with its own learning rate, ``"dp-sgd:lr=2"``.

    >>> parse_regime("dp-sgd:lr=2")[0].name, parse_regime("dp-sgd:lr=2")[1]
    ('dp-sgd', 2.0)
    """
    name, _, rest = token.partition(":")
    if name not in REGIMES:
        raise ConfigError("regime", token, tuple(REGIMES) + ("<regime>:lr=<float>",))
    if not rest:
        return REGIMES[name], None
    key, sep, value = rest.partition("=")
    try:
        lr = float(value)
    except ValueError:
        lr = -1.0
    if key != "lr" or not sep or not lr > 0:
        raise ConfigError("regime", token, "<regime> or <regime>:lr=<positive float>, e.g. 'dp-sgd:lr=2'")
    return REGIMES[name], lr


def default_recipes() -> tuple[str, ...]:
    """The study's recipes that exist in this tree (``luq_fp4`` joins when it is registered)."""
    from dpquant_sim.nn.config import RECIPES

    return tuple(r for r in STUDY_RECIPES if r in RECIPES)


@dataclass(frozen=True)
class MechanismConfig:
    """One mechanism study (every regime x seed trains ``epochs`` epochs of the same model and data).

    Attributes:
        dataset, model, epochs, batch_size (expected batch B), lr, momentum: the training runs (one lr for all
            regimes, so that the noise moves the weights by the same amount in sgd+noise and dp-sgd).
        max_grad_norm: C. epsilon, delta: DP-SGD's target; sigma is calibrated by the engine (RDP).
        noise_multiplier: fix sigma instead of calibrating it (then epsilon is only reported).
        regimes, seeds, recipes: what to run and measure; a regime may carry its own learning rate,
            ``"dp-sgd:lr=2"`` (the entry is the regime's label in every output).
        probe_size: examples in the probe batch (None: batch_size, so the update is validated at B).
        draws: stochastic-rounding draws for the realized quantization error of dy.
        update_draws: draws for the measured update variance (>= 2).
        validate_every: measure/predict the update variance every k-th epoch (and at the last); 0 = last only.
        n_train: training subset size (None: the dataset's). threads: torch threads per run.
    """

    dataset: str = "digits"
    model: str = "cnn"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.25
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    regimes: tuple[str, ...] = ("sgd", "sgd+noise", "dp-sgd")
    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: tuple[str, ...] = field(default_factory=default_recipes)
    probe_size: int | None = None
    draws: int = 2
    update_draws: int = 8
    validate_every: int = 5
    n_train: int | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        from dpquant_sim.nn.config import RECIPES

        for r in self.regimes:
            parse_regime(r)
        if len(set(self.regimes)) != len(self.regimes):
            raise ConfigError("regimes", self.regimes, "distinct entries")
        for r in self.recipes:
            if r not in RECIPES:
                raise ConfigError("recipes", r, tuple(RECIPES))
        if not self.regimes or not self.seeds or not self.recipes:
            raise ConfigError("regimes/seeds/recipes", (self.regimes, self.seeds, self.recipes), "non-empty lists")
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "max_grad_norm": self.max_grad_norm > 0, "epsilon": self.epsilon > 0, "draws": self.draws >= 1,
                  "update_draws": self.update_draws >= 2, "validate_every": self.validate_every >= 0}
        for k, ok in checks.items():
            if not ok:
                raise ConfigError(k, getattr(self, k), "a positive value (update_draws >= 2, validate_every >= 0)")
        if self.probe_size is not None and self.probe_size < 1:
            raise ConfigError("probe_size", self.probe_size, "a positive integer or None (= batch_size)")

    def validates(self, epoch: int) -> bool:
        """Whether the update variance is measured after ``epoch`` completed epochs."""
        return epoch == self.epochs or (self.validate_every > 0 and epoch > 0 and epoch % self.validate_every == 0)

    def base_train(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dataset": self.dataset, "model": self.model, "epochs": self.epochs,
                             "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
                             "delta": self.delta, "threads": self.threads, "schedule": {"kind": "fp32"}}
        if self.n_train is not None:
            d["n_train"] = self.n_train
        return d


def calibrated_sigma(train_cfg: Mapping[str, Any], work: Path) -> tuple[float, dict[str, Any]]:
    """The noise multiplier the engine calibrates for a private config (and its run_info), from a dry start.

    ``train(..., stop_after=0)`` builds the run (calibration included) and writes run_info.json without
    training; the folder is removed afterwards.
    """
    from dpquant_sim.training.engine import train

    tmp = work / "_calibrate"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train(dict(train_cfg), tmp, progress=False, stop_after=0)
        info = json.loads((tmp / "run_info.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return float(info["noise_multiplier"]), info


def regime_train_config(study: MechanismConfig, regime: str, seed: int, sigma: float) -> dict[str, Any]:
    """The TrainConfig fields of one (regime, seed) run (see the module docstring for sgd+noise)."""
    r, lr = parse_regime(regime)
    d = {**study.base_train(), "seed": seed}
    if lr is not None:
        d["lr"] = lr
    if not r.noise:
        return {**d, "private": False}
    if r.clip:
        return {**d, "private": True, "noise_multiplier": sigma, "max_grad_norm": study.max_grad_norm,
                "epsilon": study.epsilon if study.noise_multiplier is None else None}
    return {**d, "private": True, "noise_multiplier": sigma * study.max_grad_norm / UNCLIPPED_NORM,
            "max_grad_norm": UNCLIPPED_NORM}


def _fit_laws(recipes: Sequence[str]) -> dict[str, tuple[float, float]]:
    from dpquant_sim.analysis.variance_law import fit_law, law_points

    fits = fit_law(law_points(recipes, points=10, reps=2))
    return {r.recipe: (float(r.exponent), float(r.constant)) for r in fits.itertuples()}


def probe_epoch(study: MechanismConfig, model: torch.nn.Module, data, *, regime: str, seed: int, epoch: int,
                sigma: float, laws: Mapping[str, tuple[float, float]] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """grad_norms rows and (at validation epochs) update-variance rows for one model state."""
    from dpquant_sim.analysis import grad_probe as gp

    C = study.max_grad_norm
    B = study.batch_size
    xs, ys = data.train.tensors
    idx = gp.probe_indices(len(xs), study.probe_size or B, seed)
    xb, yb = xs[idx], ys[idx]
    probe = gp.capture(model, xb, yb)
    reg = parse_regime(regime)[0]
    c_dp = probe.clip_factors(C)
    c_run = probe.clip_factors(C if reg.clip else None)
    key = {"dataset": study.dataset, "model": study.model, "regime": regime, "seed": seed, "epoch": epoch}
    gen = torch.Generator().manual_seed(1000 * seed + epoch)
    norm_rows, upd_rows = [], []
    for j, layer in enumerate(probe.layers):
        linf, l2 = gp.layer_norms(probe, layer)
        gnorm = probe.layer_grad_norm[:, j].double()
        d_l = probe.layer_params[layer]
        elem = (c_dp * gnorm / math.sqrt(d_l)).numpy()  # RMS element of the clipped per-example block
        base = {**key, "layer": layer, "layer_index": probe.call_order.index(layer),
                "n_elements": probe.dy[layer][0].numel(),
                "layer_params": d_l, **gp.summarize(linf, "linf"), **gp.summarize(l2, "l2"),
                **gp.summarize(linf**2 / np.maximum(l2**2, 1e-300) * probe.dy[layer][0].numel(), "spread"),
                **gp.summarize(gnorm.numpy(), "grad_norm"),
                "total_grad_norm_median": float(probe.total_grad_norm.median()),
                "total_grad_norm_max": float(probe.total_grad_norm.max()),
                "clip_factor_median": float(c_run.median()),
                "noise_std": sigma * C if reg.noise else 0.0,
                "noise_to_clipped_elem": float(sigma * C / np.median(elem)) if np.median(elem) > 0 else math.inf,
                "loss_mean": float(probe.loss.mean())}
        for recipe in study.recipes:
            q = gp.quantization_error(probe, layer, recipe, draws=study.draws, generator=gen)
            n_el = q["grad_elems"]
            per_el = q["grad_sq"] / n_el
            norm_rows.append({**base, "recipe": recipe, "quant_var": float(per_el.mean()),
                              "quant_var_rel": float(q["grad_sq"].sum() / max((l2**2).sum(), 1e-300)),
                              "quant_var_over_linf2": float(np.median(per_el / np.maximum(linf**2, 1e-300))),
                              "weight_qerr_rel": q["weight_rel"], "act_qerr_rel": q["act_rel"]})
    if study.validates(epoch):
        clip = C if reg.clip else None
        noise = gp.noise_variance(probe, noise_multiplier=sigma if reg.noise else 0.0, clip=C, batch_size=B)
        for recipe in study.recipes:
            pred = gp.predicted_update_variance(probe, recipe, clip=clip, batch_size=B, generator=gen)
            law = (gp.predicted_update_variance(probe, recipe, clip=clip, batch_size=B, model="law", laws=laws)
                   if laws and recipe in laws else None)
            mc = gp.update_variance_mc(model, xb, yb, {n: recipe for n in probe.layers}, clip=clip, batch_size=B,
                                       draws=study.update_draws, seed=seed)
            for layer in probe.layers:
                upd_rows.append({**key, "layer": layer, "layer_index": probe.call_order.index(layer), "recipe": recipe,
                                 "batch_size": B, "probe_size": probe.batch,
                                 "pred_direct": pred[layer]["direct"], "pred_propagated": pred[layer]["propagated"],
                                 "pred_total": pred[layer]["total"],
                                 "pred_law_total": law[layer]["total"] if law else math.nan,
                                 "mc_var": mc[layer]["var"], "mc_bias2": mc[layer]["bias2"],
                                 "signal": mc[layer]["signal"], "noise_var": noise[layer]})
    return norm_rows, upd_rows


def _init_model(run_dir: Path):
    from dpquant_sim.training.engine import build_run_model, load_run

    cfg, data, trained = load_run(run_dir)
    return build_run_model(cfg, data), data


def run_regime(study: MechanismConfig, regime: str, seed: int, sigma: float, out: Path, *,
               laws: Mapping[str, tuple[float, float]] | None = None,
               log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train one (regime, seed) epoch by epoch in ``out/runs/<regime>_s<seed>`` and probe after each epoch.

    Resumable: probe rows are kept in ``probe_norms.csv`` / ``probe_update.csv`` inside the run folder and
    epochs already probed are skipped (the engine resumes training from its checkpoint).
    """
    from dpquant_sim.training.engine import load_run, train

    run_dir = out / "runs" / f"{regime.replace('+', '_').replace(':', '_').replace('=', '')}_s{seed}"
    f_norm, f_upd = run_dir / "probe_norms.csv", run_dir / "probe_update.csv"
    norms = pd.read_csv(f_norm) if f_norm.is_file() else pd.DataFrame()
    upd = pd.read_csv(f_upd) if f_upd.is_file() else pd.DataFrame()
    done = set(norms["epoch"]) if len(norms) else set()
    cfg = regime_train_config(study, regime, seed, sigma)
    for epoch in range(0, study.epochs + 1):
        if epoch > 0 or not (run_dir / "checkpoint.pt").is_file():
            train(cfg, run_dir, progress=False, stop_after=max(epoch, 1))
        if epoch in done:
            continue
        if epoch == 0:
            model, data = _init_model(run_dir)
        else:
            _, data, model = load_run(run_dir)
        n_rows, u_rows = probe_epoch(study, model, data, regime=regime, seed=seed, epoch=epoch, sigma=sigma, laws=laws)
        norms = pd.concat([norms, pd.DataFrame(n_rows)], ignore_index=True)
        atomic_write_df(f_norm, norms)
        if u_rows:
            upd = pd.concat([upd, pd.DataFrame(u_rows)], ignore_index=True)
            atomic_write_df(f_upd, upd)
        log(f"{regime} seed {seed} epoch {epoch}: probed")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    acc = dict(zip(metrics["epoch"] + 1, metrics["test_acc"]))
    norms["test_acc"] = norms["epoch"].map(acc)
    return norms, upd


def run_mechanism(study: MechanismConfig, out: str | Path, *, log: Callable[[str], None] = print
                  ) -> dict[str, pd.DataFrame]:
    """Run every (regime, seed) of ``study`` under ``out`` and write ``grad_norms.csv`` and
    ``update_variance.csv`` (atomically). Returns {"grad_norms", "update_variance", "runs"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if study.noise_multiplier is not None:
        sigma = float(study.noise_multiplier)
    else:
        sigma, _ = calibrated_sigma({**study.base_train(), "private": True, "epsilon": study.epsilon,
                                     "max_grad_norm": study.max_grad_norm, "seed": study.seeds[0]}, out)
    log(f"noise multiplier sigma = {sigma:.4f} (epsilon {study.epsilon}, {study.epochs} epochs, B {study.batch_size})")
    laws = _fit_laws(study.recipes)
    frames_n, frames_u, runs = [], [], []
    for seed in study.seeds:
        for regime in study.regimes:
            n, u = run_regime(study, regime, seed, sigma, out, laws=laws, log=log)
            frames_n.append(n)
            frames_u.append(u)
            runs.append({"regime": regime, "seed": seed, "sigma": sigma,
                         "final_test_acc": float(n.loc[n["epoch"] == study.epochs, "test_acc"].iloc[0])})
    res = {"grad_norms": pd.concat(frames_n, ignore_index=True),
           "update_variance": pd.concat(frames_u, ignore_index=True), "runs": pd.DataFrame(runs)}
    res["grad_norms"]["sigma"] = sigma
    atomic_write_df(out / "grad_norms.csv", res["grad_norms"])
    atomic_write_df(out / "update_variance.csv", res["update_variance"])
    atomic_write_df(out / "runs.csv", res["runs"])
    return res


__all__ = ["Regime", "REGIMES", "parse_regime", "MechanismConfig", "UNCLIPPED_NORM", "STUDY_RECIPES", "default_recipes",
           "calibrated_sigma", "regime_train_config", "probe_epoch", "run_regime", "run_mechanism"]
