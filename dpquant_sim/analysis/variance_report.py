"""Summary tables and the self-contained HTML page of the variance-amplification study.

Reads the CSV files a study folder holds (written by ``analysis/variance_study.py``; any subset):

    law_points.csv, law_fits.csv   Proposition 1 per recipe (:mod:`variance_law`)
    grad_norms.csv                 the mechanism in training, per regime/seed/epoch/layer/recipe (:mod:`mechanism`)
    update_variance.csv            predicted vs measured variance of the released update (:mod:`grad_probe`)
    rotation.csv                   rotation's variance argument (:mod:`rotation`)

and writes ``report.html`` (plotly.js embedded once, no network) with each figure's data under ``report_data/``.
Error bars are the standard deviation over seeds.

>>> import pandas as pd
>>> t = pd.DataFrame({"seed": [0, 1], "regime": ["a", "a"], "v": [1.0, 3.0]})
>>> mean_sd(t, ["regime"], "v")[["v_mean", "v_sd", "n"]].values.tolist()
[[2.0, 1.4142135623730951, 2.0]]
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpquant_sim.errors import ConfigError
from dpquant_sim.io import atomic_write_df, atomic_write_text

REGIME_ORDER = ("sgd", "sgd+noise", "dp-sgd")


def mean_sd(df: pd.DataFrame, by: Sequence[str], col: str) -> pd.DataFrame:
    """Mean, sample std (0 for one value) and count of ``col`` per ``by`` group (e.g. over seeds)."""
    g = df.groupby(list(by), sort=False)[col]
    out = pd.DataFrame({f"{col}_mean": g.mean(), f"{col}_sd": g.std(ddof=1).fillna(0.0), "n": g.size().astype(float)})
    return out.reset_index()


def _fmt(m: float, s: float, digits: int = 3) -> str:
    return f"{m:.{digits}g} +- {s:.{digits - 1}g}" if np.isfinite(m) else "n/a"


# ------------------------------------------------------------------------------------------------ tables
def mechanism_table(gn: pd.DataFrame, *, recipe: str | None = None) -> pd.DataFrame:
    """Per (model, regime, layer): the raw-gradient inf-norm (median over examples), 2-norm and spread at the
    last epoch, and the inf-norm relative to SGD's (same seed, epoch and layer) at the last epoch and averaged
    over epochs 1..E (median over examples, and mean over examples: ``linf_mean_vs_sgd_avg``); mean +- std over
    seeds. One recipe's rows are used (the norms do not depend on it)."""
    recipe = recipe or gn["recipe"].iloc[0]
    d = gn[gn["recipe"] == recipe].copy()
    last = d["epoch"].max()
    keys = ["model", "seed", "epoch", "layer"]
    sgd = d[d["regime"] == "sgd"][keys + ["linf_median", "linf_mean"]].rename(
        columns={"linf_median": "linf_sgd", "linf_mean": "linf_mean_sgd"})
    d = d.merge(sgd, on=keys, how="left")
    d["linf_vs_sgd"] = d["linf_median"] / d["linf_sgd"]
    d["linf_mean_vs_sgd"] = d["linf_mean"] / d["linf_mean_sgd"]
    at_last = d[d["epoch"] == last]
    avg = d[d["epoch"] > 0].groupby(["model", "regime", "layer", "seed"], sort=False)[
        ["linf_vs_sgd", "linf_mean_vs_sgd"]].mean().reset_index()
    rows = []
    for (model, regime, layer), g in at_last.groupby(["model", "regime", "layer"], sort=False):
        sel = avg[(avg["model"] == model) & (avg["regime"] == regime) & (avg["layer"] == layer)]
        a, am = sel["linf_vs_sgd"], sel["linf_mean_vs_sgd"]
        ms = (lambda c: _fmt(g[c].mean(), g[c].std(ddof=1) if len(g) > 1 else 0.0))
        rows.append({"model": model, "regime": regime, "layer": layer, "layer_index": g["layer_index"].iloc[0],
                     "epoch": int(last), "seeds": len(g), "linf_median": ms("linf_median"),
                     "l2_median": ms("l2_median"), "spread_median": ms("spread_median"),
                     "linf_vs_sgd_last": ms("linf_vs_sgd"),
                     "linf_vs_sgd_avg": _fmt(a.mean(), a.std(ddof=1) if len(a) > 1 else 0),
                     "linf_mean_vs_sgd_avg": _fmt(am.mean(), am.std(ddof=1) if len(am) > 1 else 0),
                     "noise_to_clipped_elem": ms("noise_to_clipped_elem"), "test_acc": ms("test_acc")})
    out = pd.DataFrame(rows)
    order = {r: i for i, r in enumerate(REGIME_ORDER)}
    return out.sort_values(["model", "layer_index", "regime"], key=lambda s: s.map(order) if s.name == "regime"
                           else s).drop(columns="layer_index").reset_index(drop=True)


def loss_adjusted_table(gn: pd.DataFrame, *, recipe: str | None = None) -> pd.DataFrame:
    """Is a regime's inf-norm explained by how far training has got? Per (model, layer): least squares of
    log median ||dy_i||_inf on log(probe loss) pooled over regimes, seeds and epochs 1..E (slope, R^2), and each
    regime's mean residual as a factor (exp), mean +- std over seeds: 1 = the inf-norm the loss predicts."""
    recipe = recipe or gn["recipe"].iloc[0]
    d = gn[(gn["recipe"] == recipe) & (gn["epoch"] > 0) & (gn["loss_mean"] > 0) & (gn["linf_median"] > 0)]
    rows = []
    for (model, layer), g in d.groupby(["model", "layer"], sort=False):
        X, Y = np.log(g["loss_mean"].to_numpy()), np.log(g["linf_median"].to_numpy())
        A = np.stack([np.ones_like(X), X], 1)
        coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
        res = Y - A @ coef
        row: dict[str, Any] = {"model": model, "layer": layer, "slope": round(float(coef[1]), 3),
                               "R2": round(float(1 - res.var() / Y.var()), 3) if Y.var() > 0 else np.nan}
        per = g.assign(res=res).groupby(["regime", "seed"], sort=False)["res"].mean()
        for regime, r in per.groupby(level=0, sort=False):
            f = np.exp(r.to_numpy())
            row[regime] = _fmt(f.mean(), f.std(ddof=1) if len(f) > 1 else 0.0)
        rows.append(row)
    return pd.DataFrame(rows)


def quant_table(gn: pd.DataFrame) -> pd.DataFrame:
    """Per (model, regime, recipe): realized quantization error of dy relative to ||dy||^2 (mean over layers),
    and relative to SGD's at the same seed and epoch (mean over epochs 1..E), mean +- std over seeds."""
    d = gn[gn["epoch"] > 0]
    per = d.groupby(["model", "regime", "recipe", "seed", "epoch"], sort=False).agg(
        rel=("quant_var_rel", "mean"), var=("quant_var", "sum")).reset_index()
    sgd = per[per["regime"] == "sgd"][["model", "recipe", "seed", "epoch", "var"]].rename(columns={"var": "var_sgd"})
    per = per.merge(sgd, on=["model", "recipe", "seed", "epoch"], how="left")
    per["var_vs_sgd"] = per["var"] / per["var_sgd"]
    s = per.groupby(["model", "regime", "recipe", "seed"], sort=False)[["rel", "var_vs_sgd"]].mean().reset_index()
    rows = []
    for (model, regime, recipe), g in s.groupby(["model", "regime", "recipe"], sort=False):
        sd = (lambda c: g[c].std(ddof=1) if len(g) > 1 else 0.0)
        rows.append({"model": model, "regime": regime, "recipe": recipe, "seeds": len(g),
                     "quant_err_rel_dy": _fmt(g["rel"].mean(), sd("rel")),
                     "quant_var_vs_sgd": _fmt(g["var_vs_sgd"].mean(), sd("var_vs_sgd"))})
    return pd.DataFrame(rows)


def update_table(uv: pd.DataFrame) -> pd.DataFrame:
    """Per (model, regime, recipe): predicted / measured stochastic-rounding variance of the whole released
    update (exact model, direct term alone, Proposition-1 law), quantization variance / DP noise variance and
    squared quantization bias / signal; mean +- std over seeds x validation epochs, plus the per-layer range
    of predicted / measured."""
    tot = uv.groupby(["model", "regime", "recipe", "seed", "epoch"], sort=False)[
        ["pred_direct", "pred_total", "pred_law_total", "mc_var", "mc_bias2", "signal", "noise_var"]
    ].sum().reset_index()
    tot["ratio"] = tot["pred_total"] / tot["mc_var"]
    tot["ratio_direct"] = tot["pred_direct"] / tot["mc_var"]
    tot["ratio_law"] = tot["pred_law_total"] / tot["mc_var"]
    tot["var_over_noise"] = tot["mc_var"] / tot["noise_var"].where(tot["noise_var"] > 0)
    tot["bias2_over_signal"] = tot["mc_bias2"] / tot["signal"]
    tot["var_over_signal"] = tot["mc_var"] / tot["signal"]
    uv = uv.assign(layer_ratio=uv["pred_total"] / uv["mc_var"])
    rows = []
    for (model, regime, recipe), g in tot.groupby(["model", "regime", "recipe"], sort=False):
        lr = uv[(uv["model"] == model) & (uv["regime"] == regime) & (uv["recipe"] == recipe)]["layer_ratio"]
        sd = (lambda c: g[c].std(ddof=1) if len(g) > 1 else 0.0)
        rows.append({"model": model, "regime": regime, "recipe": recipe, "points": len(g),
                     "batch_size": int(uv["batch_size"].iloc[0]) if "batch_size" in uv else np.nan,
                     "pred/meas": _fmt(g["ratio"].mean(), sd("ratio")),
                     "pred/meas per layer (min..max)": f"{lr.min():.2f}..{lr.max():.2f}",
                     "direct only": _fmt(g["ratio_direct"].mean(), sd("ratio_direct")),
                     "law": _fmt(g["ratio_law"].mean(), sd("ratio_law")),
                     "quant var / noise var": _fmt(g["var_over_noise"].mean(), sd("var_over_noise")),
                     "quant var / signal": _fmt(g["var_over_signal"].mean(), sd("var_over_signal")),
                     "quant bias^2 / signal": _fmt(g["bias2_over_signal"].mean(), sd("bias2_over_signal"))})
    return pd.DataFrame(rows)


def rotation_tables(rot: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-layer summary, per-schedule table, per-run accuracy relation) of a rotation table."""
    from dpquant_sim.analysis.rotation import accuracy_relation, rotation_summary

    s = rotation_summary(rot)
    runs = accuracy_relation(rot)
    rows = []
    for sched, g in s.groupby("schedule", sort=False):
        per_seed = g.groupby("seed").agg(q=("var_plan", "sum"), aq=("argument_quant", "sum"),
                                         tot=("measured_total", "sum"), atot=("argument_total", "sum"))
        per_seed["quant_ratio"] = per_seed["q"] / per_seed["aq"].where(per_seed["aq"] > 0)
        per_seed["total_ratio"] = per_seed["tot"] / per_seed["atot"]
        r = runs[runs["schedule"] == sched]
        sd = (lambda x: x.std(ddof=1) if len(x) > 1 else 0.0)
        rows.append({"schedule": sched, "seeds": len(per_seed),
                     "quantized FLOP share": _fmt(r["quantized_flop_share"].mean(), sd(r["quantized_flop_share"])),
                     "final test acc": _fmt(r["final_test_acc"].mean(), sd(r["final_test_acc"])),
                     "quant var / noise var": _fmt(r["quant_var_over_noise"].mean(), sd(r["quant_var_over_noise"])),
                     "quant bias^2 / signal": _fmt(r["quant_bias2_over_signal"].mean(),
                                                   sd(r["quant_bias2_over_signal"])),
                     "measured / (1-p)Var_fp+pVar_q (quant part)": _fmt(per_seed["quant_ratio"].mean(),
                                                                         sd(per_seed["quant_ratio"])),
                     "same, total incl. noise": _fmt(per_seed["total_ratio"].mean(), sd(per_seed["total_ratio"]))})
    return s, pd.DataFrame(rows), runs


# ------------------------------------------------------------------------------------------------ figures
def _scatter(df: pd.DataFrame, *, x: str, y: str, color: str, facet: str | None, title: str, x_title: str,
             y_title: str, log: bool = True, diagonal: bool = False, facet_cols: int = 3, text: str | None = None):
    import plotly.graph_objects as go

    from dpquant_sim.analysis.figures import TEMPLATE, _facet_grid, color_for

    fig, panels, nrows = _facet_grid(df, facet, facet_cols)
    shown: set[str] = set()
    for r, c, sub in panels:
        for key, g in sub.groupby(color, sort=False):
            name = str(key)
            fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=name, legendgroup=name,
                                     showlegend=name not in shown, marker={"color": color_for(name), "size": 6,
                                                                           "opacity": 0.7},
                                     text=g[text] if text else None), row=r, col=c)
            shown.add(name)
        if diagonal and len(sub):
            lo = float(min(sub[x].min(), sub[y].min()))
            hi = float(max(sub[x].max(), sub[y].max()))
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured",
                                     line={"color": "#999", "dash": "dash"}, showlegend="diag" not in shown),
                          row=r, col=c)
            shown.add("diag")
    fig.update_xaxes(title_text=x_title, type="log" if log else None)
    fig.update_yaxes(title_text=y_title, type="log" if log else None)
    fig.update_layout(title=title, template=TEMPLATE, height=max(380, 320 * nrows))
    return fig


def _per_epoch(gn: pd.DataFrame, col: str, recipe: str) -> pd.DataFrame:
    d = gn[gn["recipe"] == recipe]
    agg = mean_sd(d, ["model", "regime", "layer", "layer_index", "epoch"], col)
    agg["panel"] = agg["model"] + " / " + agg["layer"]
    return agg.sort_values(["model", "layer_index", "epoch"])


def build_sections(folder: Path) -> list[Any]:
    """Report sections for whatever study files ``folder`` holds."""
    from dpquant_sim.analysis.figures import bar_figure, line_figure
    from dpquant_sim.analysis.report import Section, _df_html

    sections = []
    f = folder / "law_fits.csv"
    if f.is_file():
        fits = pd.read_csv(f)
        pts = pd.read_csv(folder / "law_points.csv")
        fig = _scatter(pts, x="spread", y="v", color="family", facet="recipe", title=(
            "Proposition 1 per recipe (grad quantizer): relative error v = E[(q(x)-x)^2]/rms^2 per element vs "
            "spread = ||x||_inf^2/rms^2; slope 1 = Var grows as ||x||_inf^2, slope 0 = as ||x||_2^2"),
            x_title="spread ||x||_inf^2 / rms^2", y_title="v")
        sections.append(Section("Proposition 1, per recipe", fig, pts, _df_html(fits.round(4)), "law"))
    f = folder / "grad_norms.csv"
    if f.is_file():
        gn = pd.read_csv(f)
        rec = "fp4" if "fp4" in set(gn["recipe"]) else gn["recipe"].iloc[0]
        mt = mechanism_table(gn, recipe=rec)
        for col, head, title, ytitle, logy in (
            ("linf_median", "Raw gradients: inf-norm",
             "Raw per-example output gradients: median over examples of ||dy_i||_inf", "||dy_i||_inf", True),
            ("l2_median", "Raw gradients: 2-norm", "Raw per-example output gradients: median of ||dy_i||_2",
             "||dy_i||_2", True),
            ("spread_median", "Raw gradients: shape", "Shape of dy_i: median spread ||dy_i||_inf^2 / rms(dy_i)^2 "
             "(what a max-scaled quantizer's relative error depends on)", "spread", False),
            ("noise_to_clipped_elem", "Noise vs a clipped element", "DP noise per coordinate (sigma C) / RMS element "
             "of the clipped per-example gradient (clip at C)", "ratio", True),
        ):
            agg = _per_epoch(gn, col, rec)
            fig = line_figure(agg, x="epoch", y=f"{col}_mean", error=f"{col}_sd", color="regime", facet="panel",
                              title=title + " (mean +- std over seeds)", x_title="epochs completed",
                              y_title=ytitle, log_y=logy)
            html_ = _df_html(mt) if col == "linf_median" else ""
            sections.append(Section(head, fig, agg, html_, f"mech_{col}"))
        d = gn[(gn["recipe"] == rec) & (gn["epoch"] > 0)].copy()
        d["panel"] = d["model"] + " / " + d["layer"]
        fig = _scatter(d, x="loss_mean", y="linf_median", color="regime", facet="panel", title=(
            "||dy_i||_inf against the probe batch's mean loss: at equal loss the regimes have equal gradients?"),
            x_title="mean probe loss", y_title="median ||dy_i||_inf")
        note = ("<p>log ||dy_i||_inf regressed on log(probe loss), pooled over regimes: slope, R^2 and each regime's "
                "mean residual as a factor (1 = the inf-norm its loss predicts; mean +- std over seeds).</p>")
        sections.append(Section("Inf-norm vs loss", fig, d[["model", "regime", "seed", "epoch", "layer", "loss_mean",
                                                           "linf_median"]],
                                note + _df_html(loss_adjusted_table(gn, recipe=rec)), "mech_linf_loss"))
        q = gn[gn["epoch"] > 0].groupby(["model", "regime", "recipe", "seed", "epoch"], sort=False)[
            "quant_var_rel"].mean().reset_index()
        qa = mean_sd(q, ["model", "regime", "recipe", "epoch"], "quant_var_rel")
        qa["panel"] = qa["model"] + " / " + qa["recipe"]
        fig = line_figure(qa, x="epoch", y="quant_var_rel_mean", error="quant_var_rel_sd", color="regime",
                          facet="panel", title="Realized quantization error of each recipe's grad quantizer on the raw "
                          "dy: E||q(dy)-dy||^2 / ||dy||^2 (mean over layers; mean +- std over seeds)",
                          x_title="epochs completed", y_title="relative error", log_y=True)
        sections.append(Section("Quantization error on the raw gradients", fig, qa, _df_html(quant_table(gn)),
                                "mech_quant"))
    f = folder / "update_variance.csv"
    if f.is_file():
        uv = pd.read_csv(f)
        uv["label"] = uv["recipe"] + " " + uv["layer"] + " e" + uv["epoch"].astype(str)
        fig = _scatter(uv, x="mc_var", y="pred_total", color="recipe", facet="regime", diagonal=True, text="label",
                       title="Corrected analytic model: predicted vs measured variance that stochastic rounding adds "
                             "to each layer's block of the released update (same batch size B)",
                       x_title="measured (draws)", y_title="predicted (direct + propagated)")
        ut = update_table(uv)
        sections.append(Section("Analytic model vs measurement", fig, uv, _df_html(ut), "update"))
        tot = uv.groupby(["model", "regime", "recipe", "seed", "epoch"], sort=False)[
            ["mc_var", "mc_bias2", "noise_var", "signal"]].sum().reset_index()
        long = tot.melt(id_vars=["model", "regime", "recipe", "seed", "epoch"],
                        value_vars=["mc_var", "mc_bias2", "noise_var", "signal"], var_name="part", value_name="value")
        long = long.groupby(["regime", "recipe", "part"], sort=False)["value"].mean().reset_index()
        long["series"] = long["recipe"] + " " + long["part"]
        fig = bar_figure(long, x="regime", y="value", color="part", facet="recipe",
                         y_title="summed over layers (squared update norm, log scale)",
                         title="Released update, summed over layers: quantization variance (mc_var), squared "
                               "quantization bias (mc_bias2), DP noise variance and signal ||u_fp||^2 (mean)")
        fig.update_yaxes(type="log")
        sections.append(Section("Update variance budget", fig, long, "", "update_budget"))
    f = folder / "rotation.csv"
    if f.is_file():
        rot = pd.read_csv(f)
        s, table, runs = rotation_tables(rot)
        from dpquant_sim.analysis.rotation import spearman

        rho_v = spearman(runs["quant_var_over_noise"], runs["final_test_acc"])
        rho_b = spearman(runs["quant_bias2_over_signal"], runs["final_test_acc"])
        fig = bar_figure(s.assign(x=s["layer"]), x="x", y="quant_ratio", color="schedule", title=(
            "Rotation: measured time-averaged quantization variance per layer / p_l x Var_q (1 = the argument "
            "holds); mean over seeds"), x_title="layer", y_title="measured / argument")
        note = (f"<p>Spearman rank correlation over runs: final accuracy vs quant var / noise: {rho_v:.2f}; "
                f"vs quant bias^2 / signal: {rho_b:.2f} ({len(runs)} runs).</p>")
        sections.append(Section("Rotation's variance argument", fig, s, _df_html(table) + note, "rotation"))
        fig = _scatter(runs, x="quant_bias2_over_signal", y="final_test_acc", color="schedule", facet=None,
                       log=False, text="seed", title="Final accuracy vs the run's time-averaged squared quantization "
                       "bias / signal", x_title="quant bias^2 / signal", y_title="final test accuracy")
        sections.append(Section("Accuracy vs quantization error", fig, runs, "", "rotation_acc"))
    return sections


def build_variance_report(folder: str | Path, *, title: str = "Variance amplification under DP noise",
                          meta: str = "") -> Path:
    """Write ``folder/report.html`` and ``folder/report_data/*.csv`` from the study files it holds."""
    from dpquant_sim.analysis.report import render_html

    folder = Path(folder)
    sections = build_sections(folder)
    if not sections:
        raise ConfigError("study folder", str(folder), "a folder holding law_fits.csv, grad_norms.csv, "
                          "update_variance.csv or rotation.csv (run analysis/variance_study.py first)")
    for s in sections:
        if s.data is not None:
            atomic_write_df(folder / "report_data" / f"{s.slug}.csv", s.data)
    out = folder / "report.html"
    atomic_write_text(out, render_html(sections, title=title, meta=html.escape(meta)))
    return out


__all__ = ["mean_sd", "mechanism_table", "loss_adjusted_table", "quant_table", "update_table", "rotation_tables",
           "build_sections",
           "build_variance_report"]
