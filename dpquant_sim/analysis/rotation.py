"""Rotation's variance argument, measured: E[Var(g_l)] = (1 - p_l) Var_fp + p_l Var_q per layer.

The summaries of DPQuant argue that rotating which layers run quantized helps because a layer quantized with
probability p_l has, averaged over epochs, variance (1 - p_l) Var_fp + p_l Var_q. This module trains DP-SGD
runs under rotating schedules (``random``, ``dpquant``) and static ones (``static-all``, ``static-subset``)
through the public ``training.engine.train`` (one epoch at a time) and, after every epoch e, probes the model
on a fixed batch of the run's expected batch size B (:mod:`grad_probe`):

- ``mc_var_plan``: the variance stochastic rounding adds to layer l's block of the released update under the
  plan the run used in epoch e (measured over ``update_draws`` draws; DP noise and the batch held fixed);
- ``mc_var_all``: the same with every layer quantized (Var_q - Var_fp of the argument);
- ``pred_plan`` / ``pred_all``: the corrected analytic model's prediction of both
  (:func:`grad_probe.predicted_update_variance`, direct + propagated);
- ``noise_var``: the DP noise variance of the block, sigma^2 C^2 d_l / B^2 (Var_fp).

:func:`rotation_summary` then compares, per run and layer, the measured time average
``noise + mean_e mc_var_plan`` with the argument's ``noise + p_l mean_e mc_var_all`` (p_l: the share of epochs
in which l was quantized), and :func:`accuracy_relation` sets each run's time-averaged quantization variance
(and squared bias) beside its final accuracy.

Example:
    >>> RotationConfig(schedules=("random",), seeds=(0,), epochs=1).schedule_config("random")
    {'kind': 'random', 'budget': 0.7}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from dpquant_sim.errors import ConfigError
from dpquant_sim.io import atomic_write_df

ROTATION_SCHEDULES = ("static-all", "static-subset", "random", "dpquant")


@dataclass(frozen=True)
class RotationConfig:
    """DP-SGD runs of one model under several schedules (same recipe, budget, epsilon and seeds).

    Attributes as in ``TrainConfig`` (lr 2.0 and batch 256 are the engine's DP defaults); ``budget`` is the
    quantized share of GEMM FLOPs for the budgeted schedules; ``update_draws`` stochastic-rounding draws per
    measured variance; ``probe_size`` None = batch_size.
    """

    dataset: str = "digits"
    model: str = "cnn"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2.0
    max_grad_norm: float = 1.0
    epsilon: float = 8.0
    delta: float = 1e-5
    recipe: str = "fp4"
    budget: float = 0.7
    schedules: tuple[str, ...] = ROTATION_SCHEDULES
    seeds: tuple[int, ...] = (0, 1, 2)
    update_draws: int = 6
    probe_size: int | None = None
    n_train: int | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        from dpquant_sim.nn.config import RECIPES

        for s in self.schedules:
            if s not in ROTATION_SCHEDULES:
                raise ConfigError("schedules", s, ROTATION_SCHEDULES)
        if self.recipe not in RECIPES:
            raise ConfigError("recipe", self.recipe, tuple(RECIPES))
        if not 0 < self.budget <= 1:
            raise ConfigError("budget", self.budget, "a share in (0, 1]")
        if self.update_draws < 2:
            raise ConfigError("update_draws", self.update_draws, "an integer >= 2")
        if not self.schedules or not self.seeds or self.epochs < 1:
            raise ConfigError("schedules/seeds/epochs", (self.schedules, self.seeds, self.epochs),
                              "non-empty schedules and seeds, epochs >= 1")

    def schedule_config(self, kind: str) -> dict[str, Any]:
        return {"kind": kind} if kind == "static-all" else {"kind": kind, "budget": self.budget}

    def train_config(self, kind: str, seed: int) -> dict[str, Any]:
        d = {"dataset": self.dataset, "model": self.model, "epochs": self.epochs, "batch_size": self.batch_size,
             "lr": self.lr, "max_grad_norm": self.max_grad_norm, "epsilon": self.epsilon, "delta": self.delta,
             "recipe": self.recipe, "schedule": self.schedule_config(kind), "seed": seed, "threads": self.threads,
             "private": True}
        if self.n_train is not None:
            d["n_train"] = self.n_train
        return d


def run_rotation(cfg: RotationConfig, out: str | Path, *, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train and probe every (schedule, seed) under ``out/runs``; write and return ``rotation.csv``.

    Resumable like :func:`mechanism.run_regime` (probe rows in each run folder's ``probe_rotation.csv``).
    Each run's noise multiplier is calibrated once by the engine (``mechanism.calibrated_sigma``) and then
    fixed, with the target epsilon kept as a cap.
    """
    from dpquant_sim.analysis import grad_probe as gp
    from dpquant_sim.analysis.mechanism import calibrated_sigma
    from dpquant_sim.plan import EpochPlan
    from dpquant_sim.training.engine import load_run, train

    out = Path(out)
    frames = []
    for seed in cfg.seeds:
        for kind in cfg.schedules:
            run_dir = out / "runs" / f"{kind}_s{seed}"
            f = run_dir / "probe_rotation.csv"
            rows = pd.read_csv(f) if f.is_file() else pd.DataFrame()
            done = set(rows["epoch"]) if len(rows) else set()
            tc = cfg.train_config(kind, seed)
            if (run_dir / "config.yaml").is_file():
                from dpquant_sim.training.config import TrainConfig

                sigma = float(TrainConfig.from_yaml(run_dir / "config.yaml").noise_multiplier)
            else:
                sigma, _ = calibrated_sigma(tc, out)
            tc = {**tc, "noise_multiplier": sigma}
            for epoch in range(1, cfg.epochs + 1):
                res = train(tc, run_dir, progress=False, stop_after=epoch)
                if epoch in done:
                    continue
                _, data, model = load_run(run_dir)
                row = res.metrics.iloc[epoch - 1]
                plan = EpochPlan.from_json(row["plan"]).quantized
                xs, ys = data.train.tensors
                idx = gp.probe_indices(len(xs), cfg.probe_size or cfg.batch_size, seed)
                xb, yb = xs[idx], ys[idx]
                probe = gp.capture(model, xb, yb)
                C, B = cfg.max_grad_norm, cfg.batch_size
                plan_map = {n: plan.get(n) for n in probe.layers}
                all_map = {n: cfg.recipe for n in probe.layers}
                noise = gp.noise_variance(probe, noise_multiplier=sigma, clip=C, batch_size=B)
                pred_plan = gp.predicted_update_variance(probe, plan_map, clip=C, batch_size=B)
                pred_all = gp.predicted_update_variance(probe, all_map, clip=C, batch_size=B)
                mc_all = gp.update_variance_mc(model, xb, yb, all_map, clip=C, batch_size=B,
                                               draws=cfg.update_draws, seed=seed)
                if any(v is not None for v in plan_map.values()) and plan_map != all_map:
                    mc_plan = gp.update_variance_mc(model, xb, yb, plan_map, clip=C, batch_size=B,
                                                    draws=cfg.update_draws, seed=seed)
                elif plan_map == all_map:
                    mc_plan = mc_all
                else:  # nothing quantized: no stochastic rounding, no variance, no bias
                    mc_plan = {n: {"var": 0.0, "bias2": 0.0, "signal": mc_all[n]["signal"]} for n in probe.layers}
                new = [{"dataset": cfg.dataset, "model": cfg.model, "recipe": cfg.recipe, "schedule": kind,
                        "budget": cfg.budget, "seed": seed, "epoch": epoch, "layer": n,
                        "layer_index": probe.call_order.index(n), "quantized": plan_map[n] is not None,
                        "mc_var_plan": mc_plan[n]["var"], "mc_bias2_plan": mc_plan[n]["bias2"],
                        "mc_var_all": mc_all[n]["var"], "mc_bias2_all": mc_all[n]["bias2"],
                        "pred_plan": pred_plan[n]["total"], "pred_all": pred_all[n]["total"],
                        "noise_var": noise[n], "signal": mc_all[n]["signal"], "sigma": sigma,
                        "test_acc": float(row["test_acc"]), "quantized_flop_share": float(row["quantized_flop_share"])}
                       for n in probe.layers]
                rows = pd.concat([rows, pd.DataFrame(new)], ignore_index=True)
                atomic_write_df(f, rows)
                log(f"rotation {kind} seed {seed} epoch {epoch}: probed")
            frames.append(rows)
    table = pd.concat(frames, ignore_index=True)
    atomic_write_df(out / "rotation.csv", table)
    return table


def rotation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (schedule, seed, layer): p_l, measured E_e[Var] = noise + mean mc_var_plan, the argument's
    noise + p_l mean mc_var_all, their ratio, and the same for the quantization part alone."""
    g = table.groupby(["model", "recipe", "schedule", "seed", "layer"], sort=False)
    s = g.agg(layer_index=("layer_index", "first"), p=("quantized", "mean"), noise=("noise_var", "mean"),
              var_plan=("mc_var_plan", "mean"), var_all=("mc_var_all", "mean"), pred_plan=("pred_plan", "mean"),
              bias2_plan=("mc_bias2_plan", "mean")).reset_index()
    s["measured_total"] = s["noise"] + s["var_plan"]
    s["argument_total"] = s["noise"] + s["p"] * s["var_all"]
    s["total_ratio"] = s["measured_total"] / s["argument_total"]
    s["argument_quant"] = s["p"] * s["var_all"]
    s["quant_ratio"] = np.where(s["argument_quant"] > 0, s["var_plan"] / s["argument_quant"].where(
        s["argument_quant"] > 0, 1.0), np.nan)
    return s


def accuracy_relation(table: pd.DataFrame) -> pd.DataFrame:
    """Per run: final test accuracy, time-averaged quantization variance and squared bias of the whole
    update (summed over layers), both also relative to the summed noise variance and the summed signal."""
    per_epoch = table.groupby(["model", "recipe", "schedule", "seed", "epoch"], sort=False).agg(
        var=("mc_var_plan", "sum"), bias2=("mc_bias2_plan", "sum"), noise=("noise_var", "sum"),
        signal=("signal", "sum"), acc=("test_acc", "first"), share=("quantized_flop_share", "first")).reset_index()
    last = per_epoch.groupby(["model", "recipe", "schedule", "seed"], sort=False)["epoch"].transform("max")
    runs = per_epoch.groupby(["model", "recipe", "schedule", "seed"], sort=False).agg(
        quant_var=("var", "mean"), quant_bias2=("bias2", "mean"), noise_var=("noise", "mean"),
        signal=("signal", "mean"), quantized_flop_share=("share", "mean")).reset_index()
    final = per_epoch[per_epoch["epoch"] == last][["model", "recipe", "schedule", "seed", "acc"]]
    runs = runs.merge(final.rename(columns={"acc": "final_test_acc"}), on=["model", "recipe", "schedule", "seed"])
    runs["quant_var_over_noise"] = runs["quant_var"] / runs["noise_var"]
    runs["quant_bias2_over_signal"] = runs["quant_bias2"] / runs["signal"]
    return runs


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points."""
    a, b = pd.Series(np.asarray(x, float)), pd.Series(np.asarray(y, float))
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return math.nan
    return float(np.corrcoef(a[ok].rank(), b[ok].rank())[0, 1])


__all__ = ["RotationConfig", "ROTATION_SCHEDULES", "run_rotation", "rotation_summary", "accuracy_relation",
           "spearman"]
