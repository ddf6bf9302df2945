"""Compare quantization schedules at one budget: fp32, static-all, static-subset, random, dpquant.

Each (dataset, schedule, seed) is one DP training run (``dpquant_sim.training.engine.train``, resumable: a
finished run directory is reused). Writes, under ``--out``:

- ``runs.csv``: one row per run (final test accuracy, epsilon, estimator epsilon alone, the estimator's
  marginal share of the budget, mean quantized FLOP share, noise multiplier, wall time);
- ``table.csv`` / ``table.md``: mean +- std over seeds per (dataset, model, recipe, schedule), and each
  schedule's difference to the reference schedule (``--reference``, default ``random``) pooled over those
  cells (``pooled.csv``).

``fp32`` quantizes nothing, so it runs once per (dataset, model, seed) and its row is repeated for every
recipe (under the first recipe's directory).

Random static baseline (the DPQuant paper's form): ``--random-subsets M`` adds, beside the single-subset
rows (``static-subset`` with ``--select``), M runs per seed of ``static-subset`` with ``select=random`` and
``subset_seed`` 0..M-1 (the same M subsets for every seed and cell); they are reported as ONE row,
``static-subset:random xM``, whose mean +- std is over all M x seeds runs (subset and training seed both
vary; with one seed it is exactly the paper's mean +- std over random subsets), and whose ``subsets`` column
is M. Each subset's own runs stay in runs.csv (column ``subset_seed``).

Estimator share (dpquant): 1 - eps(DP-SGD steps alone, at the run's calibrated sigma) / eps(whole run), i.e.
how much of the epsilon the run spends is due to the estimator; composition is sub-additive, so the
estimator's stand-alone epsilon (also reported) is much larger than its marginal cost.

Defaults run in about 10 minutes on 2 CPU cores:

    .venv/bin/python analysis/compare_schedules.py --out runs/compare_schedules

Bigger: ``--datasets digits,synthetic --models cnn,resnet18 --recipes fp4,fp8 --seeds 0,1,2 --epochs 30``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dpquant_sim.io import atomic_write_df, atomic_write_text

SCHEDULES = ("fp32", "static-all", "static-subset", "random", "dpquant")


def schedule_cfg(token: str, budget: float, select: str) -> dict:
    """Schedule config of a ``--schedules`` token: a kind, optionally with fields, ``dpquant:warmup_epochs=2``.

    >>> schedule_cfg("dpquant:warmup_epochs=2:temperature=0.5", 0.7, "first")
    {'kind': 'dpquant', 'budget': 0.7, 'warmup_epochs': 2, 'temperature': 0.5}
    """
    import yaml

    kind, *opts = token.split(":")
    if kind in ("fp32", "static-all"):
        cfg: dict = {"kind": kind}
    elif kind == "static-subset":
        cfg = {"kind": kind, "budget": budget, "select": select}
    else:
        cfg = {"kind": kind, "budget": budget}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise SystemExit(f"--schedules: {opt!r} in {token!r} is not KEY=VALUE (e.g. dpquant:warmup_epochs=2)")
        cfg[key] = yaml.safe_load(value)
    return cfg


RANDOM_SUBSET_TOKEN = "static-subset:select=random:subset_seed={j}"


def random_subset_tokens(m: int) -> list[str]:
    """The ``--schedules`` tokens of ``--random-subsets m``.

    >>> random_subset_tokens(2)
    ['static-subset:select=random:subset_seed=0', 'static-subset:select=random:subset_seed=1']
    """
    return [RANDOM_SUBSET_TOKEN.format(j=j) for j in range(int(m))]


def random_subset_label(token: str) -> tuple[str, int | None]:
    """(row label, subset_seed) of a schedule token: the random-subset tokens share one label.

    >>> random_subset_label("static-subset:select=random:subset_seed=3")
    ('static-subset:random', 3)
    >>> random_subset_label("random")
    ('random', None)
    """
    prefix = RANDOM_SUBSET_TOKEN.split("{")[0]
    if token.startswith(prefix) and token[len(prefix):].isdigit():
        return "static-subset:random", int(token[len(prefix):])
    return token, None


def train_config(args, dataset: str, model: str, recipe: str, kind: str, seed: int):
    """The validated TrainConfig of one run (raises ConfigError naming the bad field)."""
    from dpquant_sim.training import config

    sched = schedule_cfg(kind, args.budget, args.select)
    unit = getattr(args, "budget_unit", None)
    if unit and "budget" in sched and "budget_unit" not in sched:  # a token's own budget_unit wins
        sched["budget_unit"] = unit
    data = dict(dataset=dataset, model=model, epochs=args.epochs, epsilon=args.epsilon, recipe=recipe,
                batch_size=args.batch_size, lr=args.lr, seed=seed, threads=args.threads, schedule=sched)
    if dataset == "synthetic":
        data.update(n_train=args.synthetic_n, n_test=512,
                    synthetic={"channels": 3, "image_size": args.synthetic_size, "num_classes": 10,
                                               "noise": args.synthetic_noise})
    return config.TrainConfig.parse(data)


def switches_per_epoch(plans) -> float:
    """Mean number of layers whose precision changes from one epoch to the next (symmetric difference of
    consecutive quantized sets), from the metrics' ``plan`` JSON column.

    >>> switches_per_epoch(['{"quantized": {"a": "fp4"}}', '{"quantized": {"b": "fp4"}}', '{"quantized": {"b": "fp4"}}'])
    1.0
    """
    sets = [frozenset(json.loads(p)["quantized"]) for p in plans]
    return sum(len(a ^ b) for a, b in zip(sets, sets[1:])) / (len(sets) - 1) if len(sets) > 1 else 0.0


def run_one(args, dataset: str, model: str, recipe: str, kind: str, seed: int, root: Path) -> dict:
    from dpquant_sim.training import engine
    from dpquant_sim.training.accounting import Mechanism, compose_epsilon

    out = root / dataset / model / recipe / kind.replace(":", "_").replace("=", "-") / f"seed{seed}"
    t0 = time.time()
    res = engine.train(train_config(args, dataset, model, recipe, kind, seed), out, progress=False)
    s = res.summary
    dpsgd_alone = compose_epsilon([Mechanism("dpsgd", s["noise_multiplier"], s["sample_rate"], s["steps"])],
                                  s["delta"], s["accountant"])
    return {
        "dataset": dataset, "model": model, "recipe": recipe, "schedule": kind, "seed": seed,
        "test_acc": s["test_acc"], "epsilon": s["epsilon"], "noise_multiplier": s["noise_multiplier"],
        "estimator_epsilon": s.get("estimator_epsilon", 0.0),
        "estimator_share": 1.0 - dpsgd_alone / s["epsilon"] if kind.startswith("dpquant") else 0.0,
        "quantized_flop_share": s["mean_quantized_flop_share"], "switches": switches_per_epoch(res.metrics["plan"]),
        "wall_s": time.time() - t0,
    }


def summarize(runs: pd.DataFrame, reference: str = "random") -> pd.DataFrame:
    """Mean/std over seeds per (dataset, model, recipe, schedule), plus the difference of means to the
    ``reference`` schedule with its standard error sqrt(s1^2/n1 + s2^2/n2).

    Unpaired on purpose: DP training is chaotic enough that any change (another schedule's layer draws, a 1%
    larger noise multiplier) decorrelates a seed's trajectory, so same-seed differences are not tighter than
    independent ones and a paired standard error would overstate the precision.
    """
    keys = ["dataset", "model", "recipe", "schedule"]
    g = runs.groupby(keys, sort=False)
    if "subset_seed" not in runs:
        runs = runs.assign(subset_seed=float("nan"))
    g = runs.groupby(keys, sort=False)
    t = g.agg(acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"), seeds=("seed", "count"),
              subsets=("subset_seed", "nunique"),
              flop_share=("quantized_flop_share", "mean"), epsilon=("epsilon", "mean"),
              estimator_eps=("estimator_epsilon", "mean"), estimator_share=("estimator_share", "mean"),
              switches=("switches", "mean"))
    t = t.reset_index()
    ref = t[t["schedule"] == reference].set_index(keys[:3])
    idx = pd.MultiIndex.from_frame(t[keys[:3]])
    r_mean = ref["acc_mean"].reindex(idx).to_numpy()
    r_var = (ref["acc_std"] ** 2 / ref["seeds"]).reindex(idx).to_numpy()
    t["vs_ref"] = t["acc_mean"].to_numpy() - r_mean
    t["vs_ref_se"] = (t["acc_std"].to_numpy() ** 2 / t["seeds"].to_numpy() + r_var) ** 0.5
    return t


def pooled(t: pd.DataFrame, reference: str = "random") -> pd.DataFrame:
    """Each schedule's difference to the reference averaged over the cells (dataset, model, recipe) that have both,
    every cell weighted equally; se = sqrt(sum of the cells' se^2) / cells (cells are independent runs).

    >>> t = pd.DataFrame({"schedule": ["dpquant", "dpquant", "random"], "vs_ref": [0.02, 0.04, 0.0],
    ...                   "vs_ref_se": [0.03, 0.04, float("nan")]})
    >>> r = pooled(t).iloc[0]
    >>> r.schedule, round(float(r.vs_ref), 6), round(float(r.vs_ref_se), 6), int(r.cells)
    ('dpquant', 0.03, 0.025, 2)
    """
    rows = []
    for k, g in t[t["schedule"] != reference].groupby("schedule", sort=False):
        g = g.dropna(subset=["vs_ref", "vs_ref_se"])
        if len(g):
            rows.append({"schedule": k, "vs_ref": g["vs_ref"].mean(),
                         "vs_ref_se": (g["vs_ref_se"] ** 2).sum() ** 0.5 / len(g), "cells": len(g)})
    return pd.DataFrame(rows, columns=["schedule", "vs_ref", "vs_ref_se", "cells"])


def pooled_markdown(pool: pd.DataFrame, reference: str = "random") -> str:
    lines = [f"| schedule | vs {reference}, pooled over cells (diff +- se) | cells |", "|---|---|---|"]
    lines += [f"| {r.schedule} | {100 * r.vs_ref:+.1f} +- {100 * r.vs_ref_se:.1f} | {r.cells} |"
              for r in pool.itertuples()]
    return "\n".join(lines) + "\n"


def to_markdown(t: pd.DataFrame, reference: str = "random") -> str:
    lines = ["| dataset | model | recipe | schedule | test acc (mean +- std) | vs " + reference + " (diff +- se) | "
             "seeds | quantized FLOP share | epsilon | estimator eps alone | estimator share | layers switched / epoch |",
             "|" + "---|" * 12]
    for r in t.itertuples():
        std = 0.0 if pd.isna(r.acc_std) else r.acc_std
        schedule = r.schedule
        if getattr(r, "subsets", 0) and r.schedule == "static-subset:random":
            schedule = f"static-subset:random x{r.subsets}"
        vs = "-" if pd.isna(r.vs_ref) or r.schedule == reference else (
            f"{100 * r.vs_ref:+.1f} +- {100 * (0.0 if pd.isna(r.vs_ref_se) else r.vs_ref_se):.1f}")
        lines.append(f"| {r.dataset} | {r.model} | {r.recipe} | {schedule} | {100 * r.acc_mean:.1f} +- "
                     f"{100 * std:.1f} | {vs} | {r.seeds} | {r.flop_share:.3f} | {r.epsilon:.2f} | "
                     f"{r.estimator_eps:.2f} | {100 * r.estimator_share:.1f}% | {r.switches:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_schedules")
    p.add_argument("--datasets", default="digits,synthetic")
    p.add_argument("--models", default="cnn")
    p.add_argument("--recipes", default="fp4")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--select", default="first", help="static-subset selection: first|last|largest")
    p.add_argument("--budget-unit", default=None, choices=["layers", "flops"],
                   help="budget unit of every budgeted schedule (default: each schedule's own, flops for "
                        "static-subset and random, layers for dpquant; set it to compare at equal units)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--synthetic-n", type=int, default=1024)
    p.add_argument("--synthetic-size", type=int, default=12)
    p.add_argument("--synthetic-noise", type=float, default=1.0, help="per-pixel noise std of the synthetic data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--random-subsets", type=int, default=0, metavar="M",
                   help="also run static-subset with select=random for subset_seed 0..M-1 and report them as one "
                        "row, mean +- std over the M x seeds runs (the paper's static baseline)")
    p.add_argument("--reference", default="random",
                   help="the schedule token the table's differences are taken against (default random)")
    args = p.parse_args(argv)

    from dpquant_sim.errors import ConfigError

    root = Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    if args.reference not in args.schedules.split(",") and not (
            args.reference == "static-subset:random" and args.random_subsets > 0):
        raise SystemExit(f"--reference: {args.reference!r} is not one of --schedules {args.schedules!r}")
    if args.random_subsets < 0:
        raise SystemExit(f"--random-subsets: {args.random_subsets} is not a count >= 0")
    tokens = args.schedules.split(",") + random_subset_tokens(args.random_subsets)
    grid = [(d, m, r, k, seed) for d in args.datasets.split(",") for m in args.models.split(",")
            for r in args.recipes.split(",") for k in tokens for seed in seeds]
    for point in grid:  # every configuration is valid before any run starts
        try:
            train_config(args, *point)
        except ConfigError as e:
            raise SystemExit(f"compare_schedules: {e}") from None
    rows, fp32_rows = [], {}
    for d, m, r, k, seed in grid:
        if k == "fp32" and (d, m, seed) in fp32_rows:  # fp32 quantizes nothing: one run serves every recipe
            row = {**fp32_rows[d, m, seed], "recipe": r}
        else:
            row = run_one(args, d, m, r, k, seed, root)
            if k == "fp32":
                fp32_rows[d, m, seed] = row
        label, subset_seed = random_subset_label(k)
        row = {**row, "schedule": label, "subset_seed": subset_seed}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    runs = pd.DataFrame(rows)
    table = summarize(runs, args.reference)
    atomic_write_df(root / "runs.csv", runs)
    atomic_write_df(root / "table.csv", table)
    pool = pooled(table, args.reference)
    atomic_write_df(root / "pooled.csv", pool)
    md = to_markdown(table, args.reference) + "\n" + pooled_markdown(pool, args.reference)
    atomic_write_text(root / "table.md", md)
    print(md)
    return table


if __name__ == "__main__":
    main()
