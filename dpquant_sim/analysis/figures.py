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
import sys
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
_LINE_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "triangle-down", "cross"]
MARKER_SYMBOLS = ["circle", "diamond", "square", "triangle-up", "x", "star", "cross", "pentagon"]

# Unit -> (factor, label) choices, largest first: values are divided by the factor so tick labels are plain
# numbers (never SI suffixes such as "60\u00b5") and the axis title carries the scaled unit.
UNIT_SCALES: dict[str, tuple[tuple[float, str], ...]] = {
    "s": ((1.0, "s"), (1e-3, "ms"), (1e-6, "\u00b5s"), (1e-9, "ns")),
    "J": ((1e6, "MJ"), (1e3, "kJ"), (1.0, "J"), (1e-3, "mJ"), (1e-6, "\u00b5J")),
    "$": ((1.0, "$"), (1e-3, "10\u207b\u00b3 $"), (1e-6, "10\u207b\u2076 $"), (1e-9, "10\u207b\u2079 $")),
    "examples/s": ((1e9, "G examples/s"), (1e6, "M examples/s"), (1e3, "k examples/s"), (1.0, "examples/s")),
}
CAPTION_WIDTH = 115  # characters per caption line (about 800 px at 12 px; figures are at least 980 px wide)
STATIC_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
STATIC_WIDTH = 1150  # px of a static export (the HTML report's figures take the page width)


def scale_unit(values: Any, unit: str) -> tuple[float, str]:
    """(factor, scaled unit) so that ``values / factor`` reads as plain numbers, e.g. 3e-5 s -> (1e-6, '\u00b5s').

    Units not in :data:`UNIT_SCALES` (and all-NaN or zero data) get ``(1.0, unit)``.

    >>> scale_unit([2e-5, 4.7e-4], "s")
    (1e-06, '\u00b5s')
    >>> scale_unit([1.5e9], "examples/s")
    (1000000000.0, 'G examples/s')
    """
    import numpy as np

    choices = UNIT_SCALES.get(unit)
    arr = np.abs(np.asarray(pd.to_numeric(pd.Series(list(values)), errors="coerce"), dtype=float))
    if not choices or arr.size == 0 or not np.isfinite(arr).any() or np.nanmax(arr) == 0:
        return 1.0, unit
    top = float(np.nanmax(arr))
    for factor, label in choices:
        if top >= factor * 0.999:
            return factor, label
    return choices[-1]


def wrap_caption(text: str, width: int = CAPTION_WIDTH) -> list[str]:
    """Caption text broken into lines of at most ``width`` characters (at spaces)."""
    import textwrap

    return textwrap.wrap(text, width=width, break_long_words=False) if text else []


def finish_layout(fig: Any, *, title: str, caption: str = "", height: int, subplot_titles: bool = False,
                  legend_title: str | None = None) -> Any:
    """Title (bold, one line) + caption (wrapped, smaller) above the plot, a top margin that fits both (and the
    panel titles below them), plain tick labels (no SI suffixes) and the template. The caption is also kept in
    ``fig.layout.meta['caption']`` for static exports and tests."""
    lines = wrap_caption(caption)
    heads = wrap_caption(title, 95) or [""]  # long titles wrap too (15 px bold: about 95 characters a line)
    text = "<br>".join(f"<b>{h}</b>" for h in heads) + "".join(
        f"<br><span style='font-size:12px'>{ln}</span>" for ln in lines)
    top = 40 + 20 * (len(heads) - 1) + 17 * len(lines) + (34 if subplot_titles else 14)
    fig.update_layout(
        title={"text": text, "x": 0.01, "xanchor": "left", "yref": "container",
               "y": 1.0 - 12.0 / (height + top), "yanchor": "top", "font": {"size": 15}},
        margin={"t": top, "l": 70, "r": 30, "b": 60},
        template=TEMPLATE, height=height + top, meta={"caption": caption, "title": title},
    )
    if legend_title is not None:
        fig.update_layout(legend={"title": {"text": legend_title}})
    fig.update_xaxes(exponentformat="power", title_font={"size": 12}, tickfont={"size": 11})
    fig.update_yaxes(exponentformat="power", title_font={"size": 12}, tickfont={"size": 11})
    return fig


def _axis_titles(fig: Any, panels: list, *, x_title: str | dict, y_title: str | dict, ncols: int) -> None:
    """Axis titles without overlaps: x titles on the panels of the bottom row of each column (or on every panel
    when they differ per panel, given as {(row, col): title}), y titles on the first column (or per panel)."""
    nrows = max(r for r, _, _ in panels)
    for r, c, _ in panels:
        bottom = not any(r2 > r and c2 == c for r2, c2, _ in panels)
        xt = x_title.get((r, c), "") if isinstance(x_title, dict) else (x_title if bottom else "")
        yt = y_title.get((r, c), "") if isinstance(y_title, dict) else (y_title if c == 1 else "")
        fig.update_xaxes(title_text=xt, row=r, col=c)
        fig.update_yaxes(title_text=yt, row=r, col=c)
    del nrows, ncols


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
    done = export_static({Path(path).with_suffix(""): fig}, ("png",), scale=scale)
    return done[0] if done else None


def static_export_unavailable() -> str | None:
    """Why static images cannot be written here (kaleido missing), or None when kaleido imports. A missing
    browser only shows when rendering; :func:`export_static` reports that too."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "kaleido is not installed"
    return None


_INSTALL_HINT = ("install kaleido (.venv/bin/pip install -c .ci/constraints.txt kaleido, or the [static] extra) "
                 "and a Chrome/Chromium browser (apt-get install chromium)")


def export_static(figs: dict[Path, Any], formats: Sequence[str], *, scale: float = 2.0) -> list[Path] | None:
    """Write each figure as ``<stem>.<format>`` for every format (png, svg, pdf, jpeg, webp) in one browser
    session: SVG and PDF stay vector, PNG at ``scale`` x the figure's size (width :data:`STATIC_WIDTH` px).

    Where the machine cannot render (kaleido or a Chrome/Chromium missing, or the renderer fails), prints ONE
    line saying why and what to install, and returns None; the caller's other outputs are unaffected.
    """
    bad = [f for f in formats if f not in STATIC_FORMATS]
    if bad:
        from dpquant_sim.errors import ConfigError

        raise ConfigError("static format", bad[0], STATIC_FORMATS)
    if not figs or not formats:
        return []
    why = static_export_unavailable()
    what = ", ".join(formats)
    if why is not None:
        print(f"static export ({what}) skipped: {why}; {_INSTALL_HINT}", file=sys.stderr)
        return None
    import plotly.io as pio

    import os

    from dpquant_sim.io import _new_temp

    jobs = [(fig, Path(stem).with_suffix(f".{fmt}"), fmt) for stem, fig in figs.items() for fmt in formats]
    tmp: list[Path] = []
    try:
        for _, p, _ in jobs:  # temporaries a killed export leaves are removed by clean_stale_temps
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp.append(_new_temp(p))
        pio.write_images([f for f, _, _ in jobs], tmp, format=[fmt for _, _, fmt in jobs],
                         scale=[scale if fmt in ("png", "jpeg", "webp") else 1 for _, _, fmt in jobs],
                         width=[STATIC_WIDTH] * len(jobs),
                         height=[int(f.layout.height or 500) for f, _, _ in jobs])
    except Exception as e:  # kaleido present but no browser, or another renderer failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"static export ({what}) skipped: {type(e).__name__}: {first[:200]}; {_INSTALL_HINT}", file=sys.stderr)
        for p in tmp:
            p.unlink(missing_ok=True)
        return None
    for (_, p, _), t in zip(jobs, tmp):
        os.replace(t, p)
    return [p for _, p, _ in jobs]


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


def _grid(df: pd.DataFrame, facet: str | None, facet_cols: int, *, panel_h: int = 290, gap_px: int = 0,
          hspace: float = 0.07) -> tuple[Any, list[tuple[int, int, pd.DataFrame]], int, int]:
    """:func:`_facet_grid` with the row gap given in pixels (room for per-panel axis titles and the panel titles
    of the next row). Returns (figure, panels, rows, plot height in px)."""
    facets = 1 if facet is None or facet not in df.columns else df[facet].nunique(dropna=False)
    ncols = max(1, min(facet_cols, facets))
    nrows = math.ceil(facets / ncols)
    gap = gap_px or 75
    height = nrows * panel_h + (nrows - 1) * gap
    vs = gap / height if nrows > 1 else 0.0
    fig, panels, nrows = _facet_grid(df, facet, facet_cols, horizontal_spacing=hspace if ncols > 1 else 0.0,
                                     vertical_spacing=vs)
    return fig, panels, nrows, height


def _scaled(values: Any, factor: float) -> Any:
    return pd.to_numeric(pd.Series(list(values)), errors="coerce") / factor


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
    caption: str = "",
    x_unit: str | None = None,
    color_title: str | None = None,
) -> Any:
    """Scatter of configurations (dominated points faded, front points solid) with the front as a step line,
    one panel per ``facet`` value (e.g. accelerator). ``x_err``/``y_err`` name std columns (seed spread).

    ``x_unit`` (a key of :data:`UNIT_SCALES`, e.g. 'examples/s') scales each panel's x values to a readable
    unit and names it in that panel's x-axis title. The legend has one entry per colour, one per marker shape
    (``symbol`` column) and the front/dominated styles."""
    import plotly.graph_objects as go

    per_panel_x = x_unit is not None and facet is not None and facet in agg.columns
    fig, panels, nrows, height = _grid(agg, facet, facet_cols, gap_px=95 if per_panel_x else 75)
    symbols = MARKER_SYMBOLS
    sym_values = list(dict.fromkeys(agg[symbol].astype(str))) if symbol and symbol in agg.columns else []
    shown: set[str] = set()
    x_titles: dict[tuple[int, int], str] = {}
    for r, c, sub in panels:
        factor, unit = scale_unit(sub[x], x_unit) if x_unit else (1.0, "")
        x_titles[(r, c)] = f"{x_title or x} ({unit})" if x_unit else (x_title or x)
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
                ex = _err(x_err, gg)
                if ex is not None and factor != 1.0:
                    ex["array"] = [v / factor for v in ex["array"]]
                fig.add_trace(
                    go.Scatter(
                        x=_scaled(gg[x], factor),
                        y=gg[y],
                        mode="markers",
                        name=name,
                        legendgroup=name,
                        showlegend=name not in shown,
                        marker=marker,
                        error_x=ex,
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
                        x=_scaled(fr[x], factor), y=fr[y], mode="lines",
                        line={"color": "black", "width": 1, "dash": "dot", "shape": "hv"},
                        name="Pareto front (outlined markers)", legendgroup="front",
                        showlegend="front" not in shown, hoverinfo="skip",
                    ),
                    row=r,
                    col=c,
                )
                shown.add("front")
    # Legend entries for what the colours do not say: marker shapes and the dominated style.
    if len(sym_values) > 0:
        for i, v in enumerate(sym_values):
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=f"{symbol} = {v}", legendgroup="shape",
                legendgrouptitle={"text": f"marker shape: {symbol}"} if i == 0 else None,
                marker={"symbol": symbols[i % len(symbols)], "color": "#555", "size": 10}, hoverinfo="skip"))
    if front_col in agg.columns and not agg[front_col].all():
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="markers", name="dominated (faded)", legendgroup="style",
            marker={"symbol": "circle", "color": "#555", "size": 8, "opacity": 0.35}, hoverinfo="skip"))
    ncols = max(c for _, c, _ in panels)
    _axis_titles(fig, panels, x_title=x_titles if per_panel_x else next(iter(x_titles.values())),
                 y_title=y_title or y, ncols=ncols)
    finish_layout(fig, title=title, caption=caption, height=height, subplot_titles=facet is not None,
                  legend_title=color_title or color)
    fig.update_layout(legend={"tracegroupgap": 12})
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
    caption: str = "",
    distinct: bool = False,
) -> Any:
    """Lines of ``y`` vs ``x`` per ``color`` group (optional ``error`` std band as error bars, facets).

    ``distinct=True`` gives every series its own dash style and marker shape (besides its colour), so series
    that coincide (e.g. the same epsilon curve) stay distinguishable; otherwise variants of one schedule kind
    share its colour and differ by dash."""
    import plotly.graph_objects as go

    fig, panels, nrows, height = _grid(df, facet, facet_cols)
    shown: set[str] = set()
    all_names = sorted({str(k) for k in df[color].unique()}) if color is not None and color in df.columns else []
    for r, c, sub in panels:
        groups = [(y, sub)] if color is None else list(sub.groupby(color, sort=True, dropna=False))
        for key, g in groups:
            name = str(key)
            g = g.sort_values(x)
            marker: dict[str, Any] = {}
            if distinct and name in all_names:
                i = all_names.index(name)
                dash = _DASHES[i % len(_DASHES)]
                # Earlier series drawn larger and wider: where series coincide, the later (smaller) markers sit
                # inside the earlier ones and every one stays visible.
                marker = {"symbol": _LINE_SYMBOLS[i % len(_LINE_SYMBOLS)], "size": 12 - 2 * (i % 4)}
            else:
                # Variants of one schedule kind share its colour and differ by dash.
                head = name.split(" ", 1)[0]
                variants = sorted({str(k) for k, _ in groups if str(k).split(" ", 1)[0] == head})
                dash = _DASHES[variants.index(name) % len(_DASHES)] if name in variants else "solid"
            fig.add_trace(
                go.Scatter(
                    x=g[x], y=g[y], mode="lines+markers", name=name, legendgroup=name,
                    showlegend=name not in shown, line={"color": color_for(name), "dash": dash,
                                                        "width": 3.0 - 0.5 * (all_names.index(name) % 4)
                                                        if distinct and name in all_names else 2},
                    marker=marker, error_y=_err(error, g),
                ),
                row=r,
                col=c,
            )
            shown.add(name)
    fig.update_xaxes(type="log" if log_x else None)
    fig.update_yaxes(type="log" if log_y else None)
    _axis_titles(fig, panels, x_title=x_title or x, y_title=y_title or y, ncols=max(c for _, c, _ in panels))
    finish_layout(fig, title=title, caption=caption, height=height, subplot_titles=facet is not None)
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
    caption: str = "",
    error: str | None = None,
    y_units: dict[Any, tuple[str, str]] | None = None,
    missing: Any = None,
) -> Any:
    """Grouped (or stacked, ``barmode='stack'``) bars of ``y`` per ``x``, coloured by ``color``.

    ``error`` names a std column (error bars). ``y_units`` maps a facet value to (axis title, unit): that
    panel's values are scaled to a readable unit (:func:`scale_unit`) named in its own y-axis title.
    ``missing(facet_value, x_value) -> str`` gives the reason a bar is absent (NaN): the panel then shows
    'n/a: <reason>' at that x instead of an empty slot."""
    import plotly.graph_objects as go

    per_panel_y = bool(y_units) and facet is not None
    fig, panels, nrows, height = _grid(df, facet, facet_cols, hspace=0.12 if per_panel_y else 0.07)
    shown: set[str] = set()
    y_titles: dict[tuple[int, int], str] = {}
    for r, c, sub in panels:
        fv = sub[facet].iloc[0] if facet is not None and facet in sub.columns and len(sub) else None
        factor = 1.0
        if per_panel_y and fv in y_units:
            ttl, unit = y_units[fv]
            factor, label = scale_unit(sub[y], unit)
            y_titles[(r, c)] = f"{ttl} ({label})"
        groups = [(y, sub)] if color is None else list(sub.groupby(color, sort=False, dropna=False))
        for key, g in groups:
            name = str(key)
            ey = _err(error, g)
            if ey is not None and factor != 1.0:
                ey["array"] = [v / factor for v in ey["array"]]
            fig.add_trace(
                go.Bar(x=g[x].astype(str), y=_scaled(g[y], factor), name=name, legendgroup=name,
                       showlegend=name not in shown, marker_color=color_for(name), error_y=ey),
                row=r,
                col=c,
            )
            shown.add(name)
        if missing is not None:
            vals = pd.to_numeric(sub[y], errors="coerce")
            for xv in dict.fromkeys(sub.loc[vals.isna(), x].tolist()):
                fig.add_annotation(x=str(xv), y=0, yanchor="bottom", text=f"n/a: {missing(fv, xv)}",
                                   textangle=-90, showarrow=False, font={"size": 10, "color": "#a33"},
                                   row=r, col=c)
    _axis_titles(fig, panels, x_title=x_title or x, y_title=y_titles if per_panel_y else (y_title or y),
                 ncols=max(c for _, c, _ in panels))
    finish_layout(fig, title=title, caption=caption, height=height, subplot_titles=facet is not None)
    fig.update_layout(barmode=barmode)
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
    caption: str = "",
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
            colorbar={"title": {"text": colorbar_title, "side": "right"}},
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title, yaxis={"autorange": "reversed"})
    finish_layout(fig, title=title, caption=caption, height=max(240, 40 + 26 * len(matrix.index)))
    return fig
