"""One self-contained HTML report of a sweep (or demo) folder.

Sections (each figure's data is also written as CSV under ``<report stem>_data/``: ``report_data/`` for the
default ``report.html``, ``tiny_data/`` for ``--out tiny.html``, so two reports in one folder never share it):

1. Headline table: final accuracy (mean +- std over seeds), epsilon spent (and the delta it is at), the
   theoretical speedup over the same run in bf16 on each accelerator; a caption says what each column is.
2. Pareto frontiers per accelerator (accuracy vs theoretical throughput, and vs roofline throughput);
   seeds aggregated first; dominated points faded; one figure per dataset.
3. Test accuracy vs epoch per schedule.
4. Epsilon spent vs epoch per schedule (DP-SGD plus the DPQuant estimator).
5. The per-epoch layer plans as heatmaps (share of seeds in which a layer ran quantized at each epoch).
6. Where low precision pays: whole-run speedup over the same run in bf16 (theoretical and roofline), per
   accelerator and DP clipping algorithm costed.
7. The cost breakdown per accelerator and schedule (time, energy, dollars).

Every figure is captioned (what is compared, the speedup baseline, the DP setting as epsilon and delta, what the
error bars are), has units in every axis title and plain tick labels, and marks a missing bar with its reason.
plotly.js is embedded once; the page needs no network. ``static=("svg", "pdf")`` also exports each figure as
an image beside its CSV where kaleido and a Chrome/Chromium can render it.

Example: ``build_report("runs/demo")`` writes runs/demo/report.html.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpquant_sim.analysis.figures import bar_figure, heatmap_figure, line_figure, pareto_figure
from dpquant_sim.analysis.pareto import aggregate_seeds, pareto_front
from dpquant_sim.errors import ConfigError
from dpquant_sim.io import atomic_write_df, atomic_write_text

# Logical cost metrics -> column names the cost model may use (first match wins).
COST_ALIASES: dict[str, tuple[str, ...]] = {
    "time_theoretical_s": ("time_theoretical_s", "theoretical_time_s", "time_s_theoretical", "t_theoretical_s"),
    "time_roofline_s": ("time_roofline_s", "roofline_time_s", "time_s_roofline", "t_roofline_s"),
    # Speedup over the same run with every layer in bf16 (the paper's 16-bit baseline).
    "speedup_theoretical": ("speedup_vs_bf16_theoretical", "speedup_theoretical", "theoretical_speedup"),
    "speedup_roofline": ("speedup_vs_bf16_roofline", "speedup_roofline", "roofline_speedup"),
    "energy_j": ("energy_j", "energy_J", "energy_roofline_j", "energy"),
    "dollars": ("dollars", "cost_usd", "usd", "dollars_roofline"),
    "examples": ("examples", "samples", "n_examples", "examples_per_epoch"),
}
# Columns that describe a configuration (everything that is not a seed or an outcome).
CONFIG_COLS = (
    "dataset", "model", "recipe", "schedule_kind", "budget", "schedule_json", "private", "target_epsilon",
    "noise_multiplier_cfg", "optimizer", "batch_size", "epochs_cfg",
)


def cost_column(df: pd.DataFrame, logical: str) -> str | None:
    """The actual column name for a logical cost metric, or None if the table lacks it."""
    for c in COST_ALIASES.get(logical, (logical,)):
        if c in df.columns:
            return c
    return None


def speedup_baseline(df: pd.DataFrame) -> str:
    """The precision the table's speedup columns are measured against ('bf16' for ``speedup_vs_bf16_*``),
    read from the column the report uses; 'the baseline' when the column does not say."""
    c = cost_column(df, "speedup_theoretical") or cost_column(df, "speedup_roofline") or ""
    for p in ("bf16", "fp16", "tf32", "fp32"):
        if f"_{p}" in c:
            return p
    return "the baseline"


def _fmt_num(v: float) -> str:
    return f"{v:g}"


def privacy_text(table: pd.DataFrame) -> str:
    """The DP setting of a table's runs, epsilon and delta stated: 'DP-SGD, target (ε = 8, δ = 1e-05)';
    several targets are listed; non-private runs are named."""
    if "private" in table.columns:
        priv = table[table["private"].astype(str).str.lower().isin(("true", "1", "1.0"))]
    else:
        priv = table
    n_public = table["point_id"].nunique() - priv["point_id"].nunique() if "point_id" in table.columns else 0
    if priv.empty:
        return "non-private training (no DP: ε = ∞, δ = 0)"
    eps = sorted({float(v) for v in priv.get("target_epsilon", pd.Series(dtype=float)).dropna()})
    dl = sorted({float(v) for v in priv.get("delta", pd.Series(dtype=float)).dropna()})
    eps_s = ", ".join(map(_fmt_num, eps)) or "?"
    dl_s = ", ".join(map(_fmt_num, dl)) or "?"
    out = f"DP-SGD, target (ε = {eps_s}, δ = {dl_s})"
    if n_public:
        out += f"; {n_public} non-private run(s) also shown"
    return out


def delta_text(table: pd.DataFrame) -> str:
    dl = sorted({float(v) for v in table.get("delta", pd.Series(dtype=float)).dropna()})
    return ", ".join(map(_fmt_num, dl)) if dl else "?"


def seeds_text(n_seeds: Any) -> str:
    """'error bars: std over 3 seeds' or, with one seed, 'one seed: no error bars'."""
    vals = pd.Series(n_seeds).dropna() if not isinstance(n_seeds, (int, float)) else pd.Series([n_seeds])
    lo, hi = (int(vals.min()), int(vals.max())) if len(vals) else (1, 1)
    if hi <= 1:
        return "one seed per configuration: no error bars"
    return f"error bars: std over {lo if lo == hi else f'{lo}-{hi}'} seeds"


def schedule_label(row: Any) -> str:
    """'dpquant b=0.5 fp4' style label of a configuration row (schedule + budget + recipe)."""
    kind = row["schedule_kind"]
    if kind == "fp32":
        return "fp32"
    parts = [str(kind)]
    b = row.get("budget") if hasattr(row, "get") else row["budget"]
    if kind not in ("static-all",) and b is not None and not (isinstance(b, float) and math.isnan(b)):
        parts.append(f"b={float(b):g}")
    parts.append(str(row["recipe"]))
    return " ".join(parts)


def _config_cols(df: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    cols = [c for c in CONFIG_COLS if c in df.columns] + [c for c in df.columns if c.startswith("grid_")]
    return list(dict.fromkeys(cols + list(extra)))


def run_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, accelerator): final-epoch accuracy/loss/epsilon and whole-run cost.

    Whole-run cost: times, energy and dollars summed over epochs; run-level speedup = sum over epochs of
    the baseline's time (per-epoch time x per-epoch speedup over bf16) / sum of time; throughput = examples / time
    (examples/s) when the cost table reports examples per epoch.
    """
    if table.empty:
        return table.copy()
    acc_cols = ["accelerator"] if "accelerator" in table.columns else []
    keys = ["point_id"] + acc_cols
    t = table.sort_values(keys + ["epoch"])
    last = t.groupby(keys, sort=False).tail(1).set_index(keys)
    out = last[[c for c in last.columns if c not in ("plan",)]].copy()
    g = t.groupby(keys, sort=False)
    for kind in ("theoretical", "roofline"):
        tc, sc = cost_column(t, f"time_{kind}_s"), cost_column(t, f"speedup_{kind}")
        if tc is None:
            continue
        total = g[tc].sum(min_count=1)
        out[f"run_time_{kind}_s"] = total
        if sc is not None:
            base = (t[tc] * t[sc]).groupby([t[k] for k in keys]).sum()
            out[f"run_speedup_{kind}"] = base / total
        ec = cost_column(t, "examples")
        if ec is not None:
            out[f"throughput_{kind}"] = g[ec].sum() / total
    for logical in ("energy_j", "dollars"):
        c = cost_column(t, logical)
        if c is not None:
            out[f"run_{logical}"] = g[c].sum(min_count=1)  # unknown (e.g. no list price) stays NaN, not 0
    out["epochs_run"] = g["epoch"].max() + 1
    out = out.reset_index()
    out["schedule"] = out.apply(schedule_label, axis=1)
    return out


def frontier_table(summary: pd.DataFrame, x: str, y: str = "test_acc") -> pd.DataFrame:
    """Seed-aggregated configurations with the Pareto front of (``y``, ``x``) marked per accelerator and
    dataset (both maximized). Columns ``<x>_mean``, ``<x>_std``, ``<y>_mean``, ``<y>_std``, ``on_front``."""
    by = [c for c in ("dataset", "accelerator") if c in summary.columns]
    group = _config_cols(summary, by + ["schedule"])
    agg = aggregate_seeds(summary, group, [x, y])
    return pareto_front(agg, f"{x}_mean", f"{y}_mean", (True, True), by=by or None)


def plan_matrix(table: pd.DataFrame, point_ids: Sequence[str]) -> pd.DataFrame:
    """layers x epochs: share of the given runs (seeds) in which each layer ran quantized."""
    rows = table.drop_duplicates(["point_id", "epoch"])
    rows = rows[rows["point_id"].isin(point_ids)]
    layers: list[str] = []
    counts: dict[tuple[str, int], int] = {}
    runs_per_epoch: dict[int, int] = {}
    for _, r in rows.iterrows():
        try:
            plan = json.loads(r["plan"]) if isinstance(r["plan"], str) else {}
        except json.JSONDecodeError:
            plan = {}
        names = list((plan.get("scores") or {}).keys()) + list((plan.get("probs") or {}).keys())
        names += list((plan.get("quantized") or {}).keys())
        for n in names:
            if n not in layers:
                layers.append(n)
        e = int(r["epoch"])
        runs_per_epoch[e] = runs_per_epoch.get(e, 0) + 1
        for n in (plan.get("quantized") or {}):
            counts[(n, e)] = counts.get((n, e), 0) + 1
    epochs = sorted(runs_per_epoch)
    m = pd.DataFrame(0.0, index=layers, columns=epochs)
    for (n, e), c in counts.items():
        m.loc[n, e] = c / runs_per_epoch[e]
    m.index.name, m.columns.name = "layer", "epoch"
    return m


@dataclass
class Section:
    title: str
    figure: Any | None = None
    data: pd.DataFrame | None = None
    html: str = ""
    slug: str = ""
    caption: str = ""  # shown under the section's table (figures carry theirs in the figure itself)


def _headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per schedule configuration (and dataset/model): acc mean/std, epsilon, speedups per accelerator."""
    if summary.empty:
        return summary
    keys = [c for c in ("dataset", "model") if c in summary.columns and summary[c].nunique() > 1] + ["schedule"]
    runs = summary.drop_duplicates("point_id")
    g = runs.groupby(keys, sort=False)
    head = pd.DataFrame(
        {
            "test_acc_mean": g["test_acc"].mean(),
            "test_acc_std": g["test_acc"].std(ddof=1).fillna(0.0),
            "epsilon": g["epsilon"].mean() if "epsilon" in runs.columns else np.nan,
            "seeds": g["point_id"].nunique(),
        }
    )
    if "accelerator" in summary.columns:
        for kind in ("theoretical", "roofline"):
            col = f"run_speedup_{kind}"
            if col in summary.columns:
                piv = summary.groupby(keys + ["accelerator"], sort=False)[col].mean().unstack("accelerator")
                piv.columns = [f"{kind[:4]}_x_{a}" for a in piv.columns]
                head = head.join(piv)
    return head.reset_index()


KIND_ORDER = {"fp32": 0, "static-all": 1, "static-subset": 2, "random": 3, "dpquant": 4}


def headline_table(summary: pd.DataFrame, accelerators: Sequence[str] | None = None) -> pd.DataFrame:
    """Compact headline: schedule, final test accuracy (mean, +- std over seeds when > 1), epsilon spent, and
    the theoretical speedup over the same run in bf16 on each accelerator (one column per accelerator)."""
    head = _headline(summary)
    if head.empty:
        return head
    def key(i: int) -> tuple:
        sched = head["schedule"].iloc[i]
        where = tuple(str(head[c].iloc[i]) for c in ("dataset", "model") if c in head.columns)
        return where + (KIND_ORDER.get(sched.split()[0], 9), sched)

    head = head.iloc[sorted(range(len(head)), key=key)]
    out = pd.DataFrame({"schedule": head["schedule"].to_numpy()})
    for c in ("model", "dataset"):
        if c in head.columns:
            out.insert(0, c, head[c].to_numpy())
    multi = (head["seeds"] > 1).any()
    out["accuracy"] = [f"{m:.3f} +- {s:.3f}" if multi else f"{m:.3f}"
                       for m, s in zip(head["test_acc_mean"], head["test_acc_std"])]
    out["epsilon"] = [f"{v:.2f}" if pd.notna(v) else "-" for v in head["epsilon"]]
    for c in head.columns:
        if c.startswith("theo_x_"):
            a = c[len("theo_x_"):]
            if accelerators is None or a in accelerators:
                out[a] = [f"{v:.2f}x" if pd.notna(v) else "-" for v in head[c]]
    return out


def headline_html(summary: pd.DataFrame, table: pd.DataFrame) -> tuple[str, str]:
    """The headline table as HTML with descriptive column headers, and its caption (what every column is)."""
    head = headline_table(summary)
    if head.empty:
        return _df_html(head), ""
    base = speedup_baseline(table)
    runs = summary.drop_duplicates("point_id")
    n = runs.groupby("schedule")["point_id"].nunique() if "schedule" in runs.columns else pd.Series([1])
    seeds = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}-{int(n.max())}"
    multi = n.max() > 1
    accs = [c for c in head.columns if c not in ("model", "dataset", "schedule", "accuracy", "epsilon")]
    delta = delta_text(table)
    names = {"accuracy": "final test accuracy" + (" (mean ± std)" if multi else ""),
             "epsilon": f"ε spent (δ = {delta})"}
    names.update({a: f"{a}: speedup × {base}" for a in accs})
    shown = head.rename(columns=names)
    shown["final test accuracy" + (" (mean ± std)" if multi else "")] = [
        v.replace(" +- ", " ± ") for v in head["accuracy"]]
    caption = (
        f"Columns. schedule: which layers run in low precision (kind; b = budget, the quantized share of the "
        f"FLOPs or of the layers, per the schedule's budget_unit; recipe, e.g. fp4); fp32 = no layer quantized. final test accuracy: after the last epoch, as a "
        f"fraction, {'mean ± std over ' + seeds + ' seeds' if multi else 'one seed'}. ε spent: privacy spent "
        f"by the whole run (DP-SGD accountant plus the DPQuant estimator's share) at δ = {delta}; "
        f"{privacy_text(table)}. One column per accelerator: theoretical whole-run speedup (peak-FLOP ratios, "
        f"the paper's convention) over the same run with every layer in {base} (the baseline; the fp32 "
        f"schedule runs its unquantized layers in {base}, hence 1.00×); the roofline speedup (memory traffic "
        f"and overheads included) is in 'Where low precision pays'.")
    return _df_html(shown), caption


def _missing_reason(table: pd.DataFrame) -> Any:
    """reason(metric label, accelerator) -> why a cost bar is absent, read from the accelerator's profile."""
    from dpquant_sim.cost.profiles import load_profiles

    profiles = load_profiles()
    hw_of = dict(zip(table["accelerator"], table["hw"])) if {"accelerator", "hw"} <= set(table.columns) else {}

    def reason(metric: Any, acc: Any) -> str:
        p = profiles.get(hw_of.get(acc, acc))
        m = str(metric)
        if p is not None and m.startswith("energy") and p.tdp_w is None:
            return "no TDP in profile"
        if p is not None and m.startswith("cost") and p.price_usd_per_s is None:
            return "no price_per_hour in profile"
        return "not in the cost table"

    return reason


COST_METRICS = {  # column -> (panel title, axis title, unit)
    "run_time_theoretical_s": ("time, theoretical", "whole-run time", "s"),
    "run_time_roofline_s": ("time, roofline", "whole-run time", "s"),
    "run_energy_j": ("energy (roofline time × TDP)", "energy", "J"),
    "run_dollars": ("cost (roofline time × price)", "cost", "$"),
}


def build_sections(table: pd.DataFrame, *, title: str = "dpquant-sim report") -> list[Section]:
    """All report sections (figures + their data) from a tidy sweep table."""
    if table.empty:
        raise ConfigError("results table", "empty", "a sweep folder with at least one finished run")
    table = table.copy()
    table["schedule"] = table.apply(schedule_label, axis=1)
    summary = run_summary(table)
    sections: list[Section] = []
    base = speedup_baseline(table)
    dp = privacy_text(table)
    delta = delta_text(table)

    head = _headline(summary)
    h_html, h_caption = headline_html(summary, table)
    sections.append(Section("Headline comparison", data=head, html=h_html, slug="headline", caption=h_caption))

    # Pareto frontiers, theoretical and roofline, per dataset, faceted by accelerator.
    if "accelerator" in summary.columns:
        for kind in ("theoretical", "roofline"):
            x = f"throughput_{kind}" if f"throughput_{kind}" in summary.columns else f"run_speedup_{kind}"
            if x not in summary.columns:
                continue
            tput = x.startswith("throughput")
            what = {"theoretical": "theoretical (peak-FLOP ratios only)",
                    "roofline": "roofline (memory traffic and overheads included)"}[kind]
            for ds in summary["dataset"].unique():
                sub = summary[summary["dataset"] == ds]
                fr = frontier_table(sub, x)
                symbol = "model" if fr["model"].nunique() > 1 else "recipe"
                caption = (
                    f"Compared: final test accuracy vs {what} "
                    + ("training throughput" if tput else f"whole-run speedup over the same run in {base}")
                    + f", one panel per accelerator (own x scale); unquantized layers costed in {base}. {dp}. "
                    f"Means over seeds; {seeds_text(fr['n_seeds'])}. Outlined markers: on the Pareto front "
                    f"(dotted step line); faded: dominated. Colour: schedule kind; marker shape: {symbol}.")
                fig = pareto_figure(
                    fr, x=f"{x}_mean", y="test_acc_mean", x_err=f"{x}_std", y_err="test_acc_std",
                    color="schedule_kind", symbol=symbol,
                    facet="accelerator", hover=("schedule", "model", "n_seeds"),
                    title=f"Pareto frontier ({kind}): accuracy vs {'throughput' if tput else 'speedup'}, {ds}",
                    caption=caption, x_unit="examples/s" if tput else None,
                    x_title=f"{kind} throughput" if tput else f"{kind} speedup (× over {base})",
                    y_title="final test accuracy (fraction)", color_title="schedule kind (colour)",
                )
                sections.append(Section(f"Pareto frontier per accelerator ({kind}, {ds})", fig, fr,
                                        slug=f"pareto_{kind}_{ds}"))

    # Accuracy and epsilon vs epoch (one row per run x epoch, seeds aggregated).
    per_epoch = table.drop_duplicates(["point_id", "epoch"])
    facet = "dataset" if per_epoch["dataset"].nunique() > 1 else None
    ep_keys = _config_cols(per_epoch, ["schedule", "epoch"])
    for metric, ttl, ytitle, cap in (
        ("test_acc", "Test accuracy vs epoch per schedule", "test accuracy (fraction)",
         "Compared: test accuracy after each epoch, per schedule (mean over seeds)"),
        ("epsilon", "Privacy spent (epsilon) vs epoch per schedule", f"ε spent (at δ = {delta})",
         f"Compared: privacy spent ε after each epoch at δ = {delta} (DP-SGD accountant plus the DPQuant "
         "estimator's share), per schedule. Schedules with the same noise multiplier and sampling rate spend the "
         "same ε, so their lines coincide: each has its own dash style and marker shape"),
    ):
        if metric not in per_epoch.columns:
            continue
        agg = aggregate_seeds(per_epoch, ep_keys, [metric])
        if "model" in agg.columns and agg["model"].nunique() > 1:
            agg["series"] = agg["schedule"] + " / " + agg["model"].astype(str)
        else:
            agg["series"] = agg["schedule"]
        spread = agg.groupby([c for c in ("dataset", "epoch") if c in agg.columns])[f"{metric}_mean"]
        if metric == "epsilon" and agg["series"].nunique() > 1 and bool(
                ((spread.max() - spread.min()) <= 0.005 * spread.max().abs().clip(lower=1e-12)).all()):
            cap += f" (here all {agg['series'].nunique()} schedules agree within 0.5% at every epoch)"
        fig = line_figure(agg, x="epoch", y=f"{metric}_mean", error=f"{metric}_std", color="series", facet=facet,
                          title=ttl, y_title=ytitle, x_title="epoch",
                          caption=f"{cap}. {dp}; {seeds_text(agg['n_seeds'])}.", distinct=True)
        sections.append(Section(ttl, fig, agg, slug=f"{metric}_vs_epoch"))

    # Layer plans heatmaps: one per quantized schedule configuration (first dataset/model), seeds pooled.
    if "plan" in per_epoch.columns:
        cfgs = per_epoch[per_epoch["schedule_kind"] != "fp32"]
        group_cols = _config_cols(cfgs, ["schedule"])
        shown = 0
        for key, g in cfgs.groupby(group_cols, sort=False, dropna=False):
            if shown >= 8:
                break
            m = plan_matrix(per_epoch, g["point_id"].unique().tolist())
            if m.empty:
                continue
            sched = g["schedule"].iloc[0]
            recipe = g["recipe"].iloc[0] if "recipe" in g.columns else "low precision"
            where = f"{g['model'].iloc[0]}/{g['dataset'].iloc[0]}"
            n = g["point_id"].nunique()
            fig = heatmap_figure(
                m, title=f"Layer plan: {sched} ({where})", colorbar_title="share of seeds quantized",
                x_title="epoch", y_title="layer (module name)",
                caption=f"Compared: layers and epochs, by the share of the {n} seed(s) in which the layer ran in "
                        f"{recipe} in that epoch (1: every seed; 0: it stayed in {base}). {privacy_text(g)}.")
            data = m.reset_index().melt(id_vars="layer", var_name="epoch", value_name="share_quantized")
            sections.append(Section(f"Per-epoch layer plan: {sched} ({where})", fig, data,
                                    slug=f"plan_{shown}"))
            shown += 1

    pays = speedup_by_clipping(summary)
    if not pays.empty:
        long = pd.concat([
            pays.assign(kind=k, speedup=pays[k], speedup_std=pays[f"{k}_std"]) for k in ("theoretical", "roofline")
        ], ignore_index=True)
        long["panel"] = long["kind"] + ", clipping: " + long["clipping"].astype(str)
        fig = bar_figure(long, x="hw", y="speedup", color="schedule", facet="panel", facet_cols=2,
                         error="speedup_std", x_title="accelerator", y_title=f"speedup (× over {base})",
                         title=f"Speedup over the same run in {base}, per accelerator and clipping algorithm",
                         caption=f"Compared: theoretical (peak-FLOP ratios) and roofline (memory traffic and "
                                 f"overheads included) whole-run speedup of each quantized schedule over the same "
                                 f"run with every layer in {base}, costed under each DP clipping algorithm; > 1 "
                                 f"(dotted line): low precision pays. {dp}. Mean over seeds; "
                                 f"{seeds_text(pays['n_seeds'])}.")
        fig.add_hline(y=1.0, line_dash="dot")
        top = float(np.nanmax(long["speedup"] + long["speedup_std"])) if len(long) else 1.0
        fig.update_yaxes(range=[0, 1.12 * max(top, 1.0)])  # one scale: theoretical and roofline side by side
        table_ = pays.assign(cell=[f"{t:.2f} / {r:.2f}" for t, r in zip(pays["theoretical"], pays["roofline"])])
        wide = table_.pivot_table(index=["clipping", "schedule"], columns="hw", values="cell", aggfunc="first",
                                  sort=False).reset_index()
        sections.append(Section(f"Where low precision pays: speedup over {base} per accelerator and clipping "
                                "algorithm", fig, pays, slug="speedup_by_clipping",
                                html=_df_html(wide) + f"<p>theoretical / roofline whole-run speedup over the same "
                                f"run with every layer in {base}, costed under each DP clipping algorithm (hooks: "
                                "per-sample gradients materialised; ghost: second backward pass; bk: "
                                "book-keeping; mixed: per-layer norm method; docs/cost_model.md). Every exact "
                                "algorithm computes the same update, so accuracy is shared.</p>"))

    # Cost breakdown.
    if "accelerator" in summary.columns:
        cost_cols = [c for c in COST_METRICS if c in summary.columns and summary[c].notna().any()]
        if cost_cols:
            keys = ["dataset", "model", "schedule", "accelerator"]
            g = summary.groupby(keys, sort=False)
            cb = g[cost_cols].mean().reset_index()
            sd = g[cost_cols].std(ddof=1).reset_index()
            nseeds = g["point_id"].nunique().to_numpy()
            long = cb.melt(id_vars=keys, value_vars=cost_cols, var_name="metric", value_name="value")
            long["std"] = sd.melt(id_vars=keys, value_vars=cost_cols, var_name="metric", value_name="std")["std"]
            long["n_seeds"] = np.tile(nseeds, len(cost_cols))
            long["unit"] = long["metric"].map({k: v[2] for k, v in COST_METRICS.items()})
            long["metric"] = long["metric"].map({k: v[0] for k, v in COST_METRICS.items()})
            if long["model"].nunique() > 1 or long["dataset"].nunique() > 1:
                long["schedule"] = long["schedule"] + " / " + long["model"] + "/" + long["dataset"]
            order = sorted(range(len(long)), key=lambda i: (KIND_ORDER.get(str(long["schedule"].iloc[i]).split()[0],
                                                                            9), str(long["schedule"].iloc[i])))
            long = long.iloc[order].reset_index(drop=True)
            units = {v[0]: (v[1], v[2]) for v in COST_METRICS.values()}
            fig = bar_figure(
                long, x="accelerator", y="value", color="schedule", facet="metric", facet_cols=2, error="std",
                y_units=units, missing=_missing_reason(table), x_title="accelerator",
                title="Cost breakdown per accelerator (whole run)",
                caption=f"Compared: whole-run time (theoretical: peak-FLOP ratios; roofline: memory traffic and "
                        f"overheads included), energy (roofline time × the profile's TDP) and cost (roofline time × "
                        f"the profile's price per hour) per accelerator and schedule; unquantized layers in {base}. "
                        f"Each panel has its own unit. n/a: the profile lacks that figure. {dp}. Mean over seeds; "
                        f"{seeds_text(long['n_seeds'])}.")
            fig.update_yaxes(matches=None)
            sections.append(Section("Cost breakdown", fig, long, slug="cost_breakdown"))
        extra = [c for c in summary.columns if c.startswith("share_") or c.startswith("time_fp")]
        if extra:
            sections[-1].html += "<p>Per-precision columns: " + ", ".join(map(html.escape, extra)) + "</p>"
    notes = accelerator_notes(table)
    if not notes.empty:
        sections.append(Section("Accelerator notes: precision fallbacks and time error bands", data=notes,
                                html=_df_html(notes) + "<p>runs as: precisions the schedule asks for that the "
                                "accelerator has no native path for, and what runs instead (their time is "
                                "that precision's). time band: range of the GEMM model's cross-validated "
                                "error, measured on this device, transferred from the same silicon, or the "
                                "generic band of a device without measurements (docs/cost_model.md).</p>",
                                slug="accelerator_notes"))
    return sections


def speedup_by_clipping(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std, ``n_seeds``) over seeds of the whole-run speedup over bf16 (theoretical, roofline) per
    (clipping algorithm costed, schedule, accelerator, device count) for the quantized schedules; empty without
    cost columns."""
    need = {"clipping_costed", "hw", "run_speedup_theoretical", "run_speedup_roofline"}
    if summary.empty or not need <= set(summary.columns):
        return pd.DataFrame()
    quant = summary[summary["schedule_kind"] != "fp32"].copy()
    if quant.empty:
        return pd.DataFrame()
    quant["hw"] = [h if int(d) == 1 else f"{h} x{int(d)}" for h, d in zip(quant["hw"], quant.get("devices", 1))] \
        if "devices" in quant.columns else quant["hw"]
    if quant["model"].nunique() > 1 or quant["dataset"].nunique() > 1:
        quant["schedule"] = quant["schedule"] + " / " + quant["model"] + "/" + quant["dataset"]
    g = quant.groupby(["clipping_costed", "schedule", "hw"], sort=False)
    out = pd.DataFrame({"theoretical": g["run_speedup_theoretical"].mean(),
                        "roofline": g["run_speedup_roofline"].mean(),
                        "theoretical_std": g["run_speedup_theoretical"].std(ddof=1).fillna(0.0),
                        "roofline_std": g["run_speedup_roofline"].std(ddof=1).fillna(0.0),
                        "n_seeds": g["point_id"].nunique()}).reset_index()
    return out.rename(columns={"clipping_costed": "clipping"})


def accelerator_notes(table: pd.DataFrame) -> pd.DataFrame:
    """Per accelerator: the precision fallbacks its runs hit and the error band of its roofline times."""
    if "accelerator" not in table.columns:
        return pd.DataFrame()
    from dpquant_sim.cost.profiles import load_profiles

    profiles = load_profiles()
    rows = []
    for acc, g in table.groupby("accelerator", sort=True):
        hw = g["hw"].iloc[0] if "hw" in g.columns else acc
        fb = sorted({f.strip() for v in g.get("fallbacks", pd.Series(dtype=str)).dropna().astype(str)
                     for f in v.split(",") if f.strip()})
        row = {"accelerator": acc, "runs as": ", ".join(fb) or "(all native)"}
        p = profiles.get(hw)
        if p is not None:
            lo, hi, basis = p.error_band
            row["time band"] = f"{lo * 100:+.0f}% / {hi * 100:+.0f}%"
            row["band from"] = basis
        rows.append(row)
    return pd.DataFrame(rows)


def _df_html(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(no finished runs)</p>"
    return df.to_html(index=False, classes="tbl", border=0, float_format=lambda v: f"{v:.4g}")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
table.tbl{border-collapse:collapse;font-size:0.9em}
table.tbl td,table.tbl th{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
table.tbl th{background:#f6f6f6} .meta{color:#666;font-size:0.9em} nav a{margin-right:1em}
.caption{color:#444;font-size:0.9em;max-width:1100px}
section{overflow-x:auto} .fig{min-width:980px}
"""


def render_html(sections: Sequence[Section], *, title: str, meta: str = "") -> str:
    """Assemble sections into one HTML page with plotly.js embedded once."""
    from plotly.offline import get_plotlyjs

    body = []
    nav = []
    for i, s in enumerate(sections):
        anchor = s.slug or f"s{i}"
        nav.append(f'<a href="#{anchor}">{html.escape(s.title)}</a>')
        part = [f'<section id="{anchor}"><h2>{html.escape(s.title)}</h2>', s.html]
        if s.caption:
            part.append(f'<p class="caption">{html.escape(s.caption)}</p>')
        if s.figure is not None:
            part.append('<div class="fig">' + s.figure.to_html(
                full_html=False, include_plotlyjs=False, div_id=f"fig-{anchor}",
                config={"displaylogo": False, "responsive": True,
                        "toImageButtonOptions": {"format": "svg", "filename": anchor}}) + "</div>")
        part.append("</section>")
        body.append("\n".join(part))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p><nav>{' '.join(nav)}</nav>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _config_delta(run_dir: Path) -> float | None:
    """The delta a run was configured with (its config.yaml; the TrainConfig default when the file omits it)."""
    import yaml

    from dpquant_sim.training.config import TrainConfig

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    v = raw.get("delta", TrainConfig.model_fields["delta"].default)
    return float(v) if v is not None else None


def build_report(
    sweep_dir: str | Path,
    *,
    out: str | Path | None = None,
    accelerators: Any = None,
    title: str | None = None,
    recollect: bool = False,
    png: bool = False,
    clipping: Any = None,
    static: Sequence[str] = (),
) -> Path:
    """Write ``<sweep_dir>/report.html`` (or ``out``) and its figure data under ``<stem>_data/`` (the folder is
    named after the report's file: ``report_data/`` by default, ``tiny_data/`` for ``out='tiny.html'``).

    Uses ``results.parquet``/``results.csv`` of the folder; collects it first when absent (or
    ``recollect=True``), costing on the sweep's accelerators (else all profiles). Explicit ``accelerators``
    (a list of profile names or "all") re-cost the runs into a derived table written beside the report as
    ``<stem>_results.csv``/``.parquet``: the sweep's own results table is never rewritten with other
    accelerators. ``clipping`` ('all' or DP clipping algorithm names) likewise re-costs every private run under
    those algorithms into the derived table (default: the sweep's ``cost_clipping``, else each run's own).
    ``static`` (formats among png, svg, pdf, jpeg, webp; ``png=True`` adds png) also exports each figure as
    ``<stem>_data/<figure>.<format>`` beside its CSV; where kaleido or a Chrome/Chromium is missing, one line
    says so and the HTML report is written all the same.

    Raises ConfigError when ``sweep_dir`` has no runs/ or ``out`` is a folder; RunFolderError when a run's
    metrics.csv disagrees with its summary.json (see ``sweep.collect.check_run_consistent``).
    """
    from dpquant_sim.io import clean_stale_temps
    from dpquant_sim.sweep.collect import TABLE_CSV, TABLE_PARQUET, collect_sweep, load_table, write_table

    from dpquant_sim.analysis.figures import STATIC_FORMATS, export_static

    formats = list(dict.fromkeys(list(static) + (["png"] if png else [])))
    for f in formats:
        if f not in STATIC_FORMATS:
            raise ConfigError("report --static", f, STATIC_FORMATS)
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs").is_dir():
        raise ConfigError("report dir", str(sweep_dir), "a sweep or demo folder containing runs/")
    out = Path(out) if out is not None else sweep_dir / "report.html"
    if out.is_dir():
        raise ConfigError("report --out", str(out), f"an HTML file path, not a folder (e.g. {str(out / 'report.html')!r})")
    name = sweep_dir.name
    sweep_yaml = sweep_dir / "sweep.yaml"
    devices = [1]
    sweep_accs = sweep_clipping = None
    if sweep_yaml.is_file():
        import yaml

        raw = yaml.safe_load(sweep_yaml.read_text()) or {}
        devices = raw.get("devices") or [1]
        sweep_accs = raw.get("accelerators", "all")
        sweep_clipping = raw.get("cost_clipping")
        name = raw.get("name", name)
    have = (sweep_dir / TABLE_PARQUET).is_file() or (sweep_dir / TABLE_CSV).is_file()
    if accelerators is not None or clipping is not None:  # a derived table, beside the report, never over the sweep's
        table = collect_sweep(sweep_dir, accelerators=accelerators or sweep_accs or "all", write=False, devices=devices,
                              clipping=clipping if clipping is not None else sweep_clipping)
        write_table(table, out.with_name(out.stem + "_results.csv"))
    elif recollect or not have:
        table = collect_sweep(sweep_dir, accelerators=sweep_accs or "all", devices=devices, clipping=sweep_clipping)
    else:
        table = load_table(sweep_dir)
    title = title or f"dpquant-sim report: {name}"
    if "delta" not in table.columns and "point_id" in table.columns:  # captions state delta: from each run's config
        table = table.assign(delta=table["point_id"].map(
            {pid: _config_delta(sweep_dir / "runs" / str(pid)) for pid in table["point_id"].unique()}))
    sections = build_sections(table, title=title)
    data_dir = out.with_name(out.stem + "_data")
    for folder in (out.parent, data_dir):  # temporaries of a killed earlier report
        clean_stale_temps(folder, owned=False)
    for s in sections:
        if s.data is not None:
            atomic_write_df(data_dir / f"{s.slug}.csv", s.data)
    if formats:
        export_static({data_dir / s.slug: s.figure for s in sections if s.figure is not None}, formats)
    n_runs = table["point_id"].nunique()
    accs = sorted(table["accelerator"].dropna().unique()) if "accelerator" in table.columns else []
    meta = (
        f"{n_runs} runs; datasets: {', '.join(map(str, table['dataset'].unique()))}; models: "
        f"{', '.join(map(str, table['model'].unique()))}; accelerators: {', '.join(map(str, accs)) or 'none'}. "
        f"Figure data (CSV): {html.escape(data_dir.name)}/. Throughput is examples/s of training (theoretical: "
        "peak FLOP ratios only; roofline: memory and overheads included)."
    )
    atomic_write_text(out, render_html(sections, title=title, meta=meta))
    return out
