"""One self-contained HTML report of a sweep (or demo) folder.

Sections (each figure's data is also written as CSV under ``<report stem>_data/``):

1. Headline table: final accuracy (mean +- std over seeds), epsilon spent, theoretical and roofline speedup
   over fp32 on each accelerator.
2. Pareto frontiers per accelerator (accuracy vs theoretical throughput, and vs roofline throughput);
   seeds aggregated first; dominated points faded; one figure per dataset.
3. Test accuracy vs epoch per schedule.
4. Epsilon spent vs epoch per schedule (DP-SGD plus the DPQuant estimator).
5. The per-epoch layer plans as heatmaps (share of seeds in which a layer ran quantized at each epoch).
6. The cost breakdown per accelerator and schedule (time, energy, dollars).

plotly.js is embedded once; the page needs no network.

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
    the fp32 time (per-epoch time x per-epoch speedup) / sum of time; throughput = examples / time
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


def build_sections(table: pd.DataFrame, *, title: str = "dpquant-sim report") -> list[Section]:
    """All report sections (figures + their data) from a tidy sweep table."""
    if table.empty:
        raise ConfigError("results table", "empty", "a sweep folder with at least one finished run")
    table = table.copy()
    table["schedule"] = table.apply(schedule_label, axis=1)
    summary = run_summary(table)
    sections: list[Section] = []

    head = _headline(summary)
    sections.append(Section("Headline comparison", data=head, html=_df_html(headline_table(summary)),
                            slug="headline"))

    # Pareto frontiers, theoretical and roofline, per dataset, faceted by accelerator.
    if "accelerator" in summary.columns:
        for kind in ("theoretical", "roofline"):
            x = f"throughput_{kind}" if f"throughput_{kind}" in summary.columns else f"run_speedup_{kind}"
            if x not in summary.columns:
                continue
            unit = "examples/s" if x.startswith("throughput") else "x over fp32"
            for ds in summary["dataset"].unique():
                sub = summary[summary["dataset"] == ds]
                fr = frontier_table(sub, x)
                symbol = "model" if fr["model"].nunique() > 1 else "recipe"
                fig = pareto_figure(
                    fr, x=f"{x}_mean", y="test_acc_mean", x_err=f"{x}_std", y_err="test_acc_std",
                    color="schedule_kind", symbol=symbol,
                    facet="accelerator", hover=("schedule", "model", "n_seeds"),
                    title=f"Pareto frontier ({kind}): test accuracy vs throughput, {ds} "
                          f"(marker shape: {symbol}; outlined = on the front; bars = std over seeds)",
                    x_title=f"{kind} throughput ({unit})", y_title="final test accuracy",
                )
                sections.append(Section(f"Pareto frontier per accelerator ({kind}, {ds})", fig, fr,
                                        slug=f"pareto_{kind}_{ds}"))

    # Accuracy and epsilon vs epoch (one row per run x epoch, seeds aggregated).
    per_epoch = table.drop_duplicates(["point_id", "epoch"])
    facet = "dataset" if per_epoch["dataset"].nunique() > 1 else None
    ep_keys = _config_cols(per_epoch, ["schedule", "epoch"])
    for metric, ttl, ytitle in (
        ("test_acc", "Test accuracy vs epoch per schedule", "test accuracy"),
        ("epsilon", "Privacy spent (epsilon) vs epoch per schedule", "epsilon (DP-SGD + estimator)"),
    ):
        if metric not in per_epoch.columns:
            continue
        agg = aggregate_seeds(per_epoch, ep_keys, [metric])
        if "model" in agg.columns and agg["model"].nunique() > 1:
            agg["series"] = agg["schedule"] + " / " + agg["model"].astype(str)
        else:
            agg["series"] = agg["schedule"]
        fig = line_figure(agg, x="epoch", y=f"{metric}_mean", error=f"{metric}_std", color="series", facet=facet,
                          title=ttl, y_title=ytitle)
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
            where = f"{g['model'].iloc[0]}/{g['dataset'].iloc[0]}"
            fig = heatmap_figure(m, title=f"Layer plan: {sched} ({where}); share of seeds quantized",
                                 colorbar_title="share quantized")
            data = m.reset_index().melt(id_vars="layer", var_name="epoch", value_name="share_quantized")
            sections.append(Section(f"Per-epoch layer plan: {sched} ({where})", fig, data,
                                    slug=f"plan_{shown}"))
            shown += 1

    # Cost breakdown.
    if "accelerator" in summary.columns:
        cost_cols = [c for c in ("run_time_theoretical_s", "run_time_roofline_s", "run_energy_j", "run_dollars")
                     if c in summary.columns and summary[c].notna().any()]
        if cost_cols:
            keys = ["dataset", "model", "schedule", "accelerator"]
            cb = summary.groupby(keys, sort=False)[cost_cols].mean().reset_index()
            long = cb.melt(id_vars=keys, value_vars=cost_cols, var_name="metric", value_name="value")
            names = {"run_time_theoretical_s": "time, theoretical (s)", "run_time_roofline_s": "time, roofline (s)",
                     "run_energy_j": "energy (J)", "run_dollars": "cost ($)"}
            long["metric"] = long["metric"].map(names)
            if long["model"].nunique() > 1 or long["dataset"].nunique() > 1:
                long["schedule"] = long["schedule"] + " / " + long["model"] + "/" + long["dataset"]
            fig = bar_figure(long, x="accelerator", y="value", color="schedule", facet="metric", facet_cols=2,
                             title="Cost breakdown per accelerator (whole run, mean over seeds)")
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
        if s.figure is not None:
            part.append(
                s.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{anchor}",
                                 config={"displaylogo": False, "responsive": True})
            )
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


def build_report(
    sweep_dir: str | Path,
    *,
    out: str | Path | None = None,
    accelerators: Any = None,
    title: str | None = None,
    recollect: bool = False,
    png: bool = False,
) -> Path:
    """Write ``<sweep_dir>/report.html`` (or ``out``) and its figure data under ``<stem>_data/``.

    Uses ``results.parquet``/``results.csv`` of the folder; collects it first when absent (or
    ``recollect=True``), costing on the sweep's accelerators (else all profiles). Explicit ``accelerators``
    (a list of profile names or "all") re-cost the runs into a derived table written beside the report as
    ``<stem>_results.csv``/``.parquet``: the sweep's own results table is never rewritten with other
    accelerators. ``png=True`` also exports each figure as PNG beside its CSV (needs kaleido and a browser;
    otherwise a one-line message per figure says so).

    Raises ConfigError when ``sweep_dir`` has no runs/ or ``out`` is a folder; RunFolderError when a run's
    metrics.csv disagrees with its summary.json (see ``sweep.collect.check_run_consistent``).
    """
    from dpquant_sim.io import clean_stale_temps
    from dpquant_sim.sweep.collect import TABLE_CSV, TABLE_PARQUET, collect_sweep, load_table, write_table

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs").is_dir():
        raise ConfigError("report dir", str(sweep_dir), "a sweep or demo folder containing runs/")
    out = Path(out) if out is not None else sweep_dir / "report.html"
    if out.is_dir():
        raise ConfigError("report --out", str(out), f"an HTML file path, not a folder (e.g. {str(out / 'report.html')!r})")
    name = sweep_dir.name
    sweep_yaml = sweep_dir / "sweep.yaml"
    devices = [1]
    sweep_accs = None
    if sweep_yaml.is_file():
        import yaml

        raw = yaml.safe_load(sweep_yaml.read_text()) or {}
        devices = raw.get("devices") or [1]
        sweep_accs = raw.get("accelerators", "all")
        name = raw.get("name", name)
    have = (sweep_dir / TABLE_PARQUET).is_file() or (sweep_dir / TABLE_CSV).is_file()
    if accelerators is not None:  # a derived table, beside the report, never over the sweep's
        table = collect_sweep(sweep_dir, accelerators=accelerators or "all", write=False, devices=devices)
        write_table(table, out.with_name(out.stem + "_results.csv"))
    elif recollect or not have:
        table = collect_sweep(sweep_dir, accelerators=sweep_accs or "all", devices=devices)
    else:
        table = load_table(sweep_dir)
    title = title or f"dpquant-sim report: {name}"
    sections = build_sections(table, title=title)
    data_dir = out.with_name(out.stem + "_data")
    for folder in (out.parent, data_dir):  # temporaries of a killed earlier report
        clean_stale_temps(folder, owned=False)
    for s in sections:
        if s.data is not None:
            atomic_write_df(data_dir / f"{s.slug}.csv", s.data)
        if png and s.figure is not None:
            from dpquant_sim.analysis.figures import export_png

            if export_png(s.figure, data_dir / f"{s.slug}.png") is None:
                png = False  # one message is enough
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
