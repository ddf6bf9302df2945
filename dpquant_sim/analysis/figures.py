"""Plotly figures written as self-contained HTML (plotly.js embedded, no network needed to view them), each
with the CSV of the data it draws beside it, plus optional PNG export.

>>> import pandas as pd, tempfile, pathlib
>>> df = pd.DataFrame({"x": [1, 2], "y": [3, 4]})
>>> fig = line_figure(df, x="x", y="y", title="demo")
>>> out = write_figure(fig, df, pathlib.Path(tempfile.mkdtemp()) / "demo")
>>> sorted(p.suffix for p in out.values() if p is not None)
['.csv', '.html']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dpquant_sim.io import atomic_write_df, atomic_write_text

# One colour per schedule kind, stable across every figure of a report.
SCHEDULE_COLORS = {
    "fp32": "#636363",
    "static-all": "#d62728",
    "static-subset": "#ff7f0e",
    "random": "#1f77b4",
    "dpquant": "#2ca02c",
}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
TEMPLATE = "plotly_white"


_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def color_for(name: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 - deliberate process-wide cache
    """Stable colour for a schedule kind or a label starting with one ('random b=0.5 fp4' -> random's)."""
    if name in SCHEDULE_COLORS:
        return SCHEDULE_COLORS[name]
    head = name.split(" ", 1)[0]
    if head in SCHEDULE_COLORS:
        return SCHEDULE_COLORS[head]
    if name not in _cache:
        _cache[name] = _EXTRA_COLORS[len(_cache) % len(_EXTRA_COLORS)]
    return _cache[name]


def write_figure(
    fig: Any,
    data: pd.DataFrame | None,
    stem: str | Path,
    *,
    png: bool = False,
) -> dict[str, Path | None]:
    """Write ``fig`` to ``<stem>.html`` (self-contained: plotly.js embedded) and ``data`` to ``<stem>.csv``.

    With ``png=True`` also try ``<stem>.png`` via kaleido; if kaleido or a browser for it is missing, print
    a one-line message saying what to install and return ``png: None`` instead of failing.
    Returns the written paths {"html", "csv", "png"}.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    out: dict[str, Path | None] = {"html": atomic_write_text(stem.with_suffix(".html"), html)}
    out["csv"] = atomic_write_df(stem.with_suffix(".csv"), data) if data is not None else None
    out["png"] = export_png(fig, stem.with_suffix(".png")) if png else None
    return out


def export_png(fig: Any, path: str | Path, *, scale: float = 2.0) -> Path | None:
    """Write a PNG with kaleido if possible; otherwise print why not and return None."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        print(f"PNG export skipped for {path}: install kaleido (pip install kaleido) and a Chrome/Chromium browser")
        return None
    try:
        from dpquant_sim.io import atomic_write

        return atomic_write(path, lambda p: fig.write_image(str(p), format="png", scale=scale))
    except Exception as e:  # kaleido present but no browser, or another renderer failure
        print(f"PNG export skipped for {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def _err(col: str | None, df: pd.DataFrame) -> dict | None:
    if col is None or col not in df.columns:
        return None
    vals = df[col].fillna(0.0)
    if not (vals > 0).any():
        return None
    return {"type": "data", "array": vals.tolist(), "visible": True, "thickness": 1}


def _facet_grid(
    df: pd.DataFrame, facet: str | None, facet_cols: int, **subplot_kw: Any
) -> tuple[Any, list[tuple[int, int, pd.DataFrame]], int]:
    """A subplot grid with one panel per distinct ``facet`` value (in order of appearance; one panel if None).

    Returns (figure, panels as (row, col, rows of ``df`` for that value), number of grid rows).
    """
    from plotly.subplots import make_subplots

    facets = [None] if facet is None or facet not in df.columns else list(dict.fromkeys(df[facet].tolist()))
    ncols = min(facet_cols, len(facets))
    nrows = math.ceil(len(facets) / ncols)
    titles = [str(f) for f in facets] if facets != [None] else None
    panels = [(i // ncols + 1, i % ncols + 1, df if fv is None else df[df[facet] == fv])
              for i, fv in enumerate(facets)]
    return make_subplots(rows=nrows, cols=ncols, subplot_titles=titles, **subplot_kw), panels, nrows


def pareto_figure(
    agg: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str = "schedule_kind",
    symbol: str | None = "recipe",
    facet: str | None = "accelerator",
    x_err: str | None = None,
    y_err: str | None = None,
    front_col: str = "on_front",
    hover: Sequence[str] = (),
    title: str = "Pareto frontier",
    x_title: str | None = None,
    y_title: str | None = None,
    facet_cols: int = 3,
) -> Any:
    """Scatter of configurations (dominated points faded, front points solid) with the front as a step line,
    one panel per ``facet`` value (e.g. accelerator). ``x_err``/``y_err`` name std columns (seed spread)."""
    import plotly.graph_objects as go

    # (vertical spacing only matters with several rows of panels)
    fig, panels, nrows = _facet_grid(agg, facet, facet_cols, horizontal_spacing=0.08, vertical_spacing=0.12)
    symbols = ["circle", "diamond", "square", "triangle-up", "x", "star", "cross", "pentagon"]
    sym_values = list(dict.fromkeys(agg[symbol].astype(str))) if symbol and symbol in agg.columns else []
    shown: set[str] = set()
    for r, c, sub in panels:
        for key, g in sub.groupby(color, sort=False, dropna=False):
            name = str(key)
            for on in (True, False):
                gg = g[g[front_col] == on] if front_col in g.columns else g
                if gg.empty:
                    continue
                text = [
                    "<br>".join(f"{h}={row[h]}" for h in hover if h in gg.columns) for _, row in gg.iterrows()
                ]
                marker = {
                    "color": color_for(name),
                    "size": 11 if on else 8,
                    "opacity": 1.0 if on else 0.35,
                    "line": {"width": 1, "color": "black"} if on else {"width": 0},
                }
                if sym_values:
                    marker["symbol"] = [symbols[sym_values.index(str(s)) % len(symbols)] for s in gg[symbol]]
                fig.add_trace(
                    go.Scatter(
                        x=gg[x],
                        y=gg[y],
                        mode="markers",
                        name=name,
                        legendgroup=name,
                        showlegend=name not in shown,
                        marker=marker,
                        error_x=_err(x_err, gg),
                        error_y=_err(y_err, gg),
                        text=text,
                        hovertemplate="%{text}<br>x=%{x:.4g}<br>y=%{y:.4g}<extra>" + name + (
                            " (front)" if on else " (dominated)") + "</extra>",
                    ),
                    row=r,
                    col=c,
                )
                shown.add(name)
        if front_col in sub.columns:
            fr = sub[sub[front_col]].sort_values(x)
            if len(fr):
                fig.add_trace(
                    go.Scatter(
                        x=fr[x], y=fr[y], mode="lines", line={"color": "black", "width": 1, "dash": "dot",
                                                               "shape": "hv"},
                        name="Pareto front", legendgroup="front", showlegend="front" not in shown, hoverinfo="skip",
                    ),
                    row=r,
                    col=c,
                )
                shown.add("front")
    fig.update_xaxes(title_text=x_title or x)
    fig.update_yaxes(title_text=y_title or y)
    fig.update_layout(
        title=title, template=TEMPLATE, height=max(380, 340 * nrows), legend={"title": color}
    )
    return fig


def line_figure(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    error: str | None = None,
    facet: str | None = None,
    title: str = "",
    x_title: str | None = None,
    y_title: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
    facet_cols: int = 3,
) -> Any:
    """Lines of ``y`` vs ``x`` per ``color`` group (optional ``error`` std band as error bars, facets)."""
    import plotly.graph_objects as go

    fig, panels, nrows = _facet_grid(df, facet, facet_cols)
    shown: set[str] = set()
    for r, c, sub in panels:
        groups = [(y, sub)] if color is None else list(sub.groupby(color, sort=True, dropna=False))
        for key, g in groups:
            name = str(key)
            g = g.sort_values(x)
            # Variants of one schedule kind share its colour and differ by dash.
            head = name.split(" ", 1)[0]
            variants = sorted({str(k) for k, _ in groups if str(k).split(" ", 1)[0] == head})
            dash = _DASHES[variants.index(name) % len(_DASHES)] if name in variants else "solid"
            fig.add_trace(
                go.Scatter(
                    x=g[x], y=g[y], mode="lines+markers", name=name, legendgroup=name,
                    showlegend=name not in shown, line={"color": color_for(name), "dash": dash},
                    error_y=_err(error, g),
                ),
                row=r,
                col=c,
            )
            shown.add(name)
    fig.update_xaxes(title_text=x_title or x, type="log" if log_x else None)
    fig.update_yaxes(title_text=y_title or y, type="log" if log_y else None)
    fig.update_layout(title=title, template=TEMPLATE, height=max(380, 320 * nrows))
    return fig


def bar_figure(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    facet: str | None = None,
    title: str = "",
    x_title: str | None = None,
    y_title: str | None = None,
    barmode: str = "group",
    facet_cols: int = 3,
) -> Any:
    """Grouped (or stacked, ``barmode='stack'``) bars of ``y`` per ``x``, coloured by ``color``."""
    import plotly.graph_objects as go

    fig, panels, nrows = _facet_grid(df, facet, facet_cols)
    shown: set[str] = set()
    for r, c, sub in panels:
        groups = [(y, sub)] if color is None else list(sub.groupby(color, sort=False, dropna=False))
        for key, g in groups:
            name = str(key)
            fig.add_trace(
                go.Bar(x=g[x].astype(str), y=g[y], name=name, legendgroup=name, showlegend=name not in shown,
                       marker_color=color_for(name)),
                row=r,
                col=c,
            )
            shown.add(name)
    fig.update_xaxes(title_text=x_title or x)
    fig.update_yaxes(title_text=y_title or y)
    fig.update_layout(title=title, template=TEMPLATE, barmode=barmode, height=max(380, 320 * nrows))
    return fig


def heatmap_figure(
    matrix: pd.DataFrame,
    *,
    title: str = "",
    x_title: str = "epoch",
    y_title: str = "layer",
    colorscale: str = "Blues",
    zmin: float | None = 0.0,
    zmax: float | None = 1.0,
    colorbar_title: str = "quantized",
) -> Any:
    """Heatmap of a (rows x columns) frame, e.g. layers x epochs with 1 = quantized."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Heatmap(
            z=matrix.to_numpy(dtype=float),
            x=[str(c) for c in matrix.columns],
            y=[str(i) for i in matrix.index],
            colorscale=colorscale,
            zmin=zmin,
            zmax=zmax,
            colorbar={"title": {"text": colorbar_title}},
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title, template=TEMPLATE, height=max(300, 60 + 22 * len(matrix.index)),
        xaxis_title=x_title, yaxis_title=y_title, yaxis={"autorange": "reversed"},
    )
    return fig
