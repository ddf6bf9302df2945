"""HTML report: expected sections and figures, plotly.js embedded once, no network, data CSVs; headless
Chromium (where installed) loads it without console errors."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from dpquant_sim.analysis.figures import line_figure, write_figure
from dpquant_sim.analysis.report import build_report, plan_matrix, run_summary
from dpquant_sim.errors import ConfigError


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    from dpquant_sim.sweep.runner import run_sweep
    from tests.test_sweep_runner import _cfg, fake_point

    out = tmp_path_factory.mktemp("sweep")
    cfg = _cfg(grid={"schedule": [{"kind": "fp32"}, {"kind": "static-all"}, {"kind": "random"}],
                     "budget": [0.5], "seed": [0, 1]})
    res = run_sweep(cfg, out, workers=1, point_fn=fake_point, progress=False)
    assert res.ok
    return out


@pytest.fixture(scope="module")
def report_html(sweep_dir):
    path = build_report(sweep_dir)
    return path, path.read_text(encoding="utf-8")


def test_report_has_expected_figures(report_html):
    path, html = report_html
    assert path.name == "report.html"
    for slug in ("pareto_theoretical_digits", "pareto_roofline_digits", "test_acc_vs_epoch", "epsilon_vs_epoch",
                 "plan_0", "cost_breakdown"):
        assert f'id="fig-{slug}"' in html, slug
    for title in ("Pareto frontier per accelerator (theoretical, digits)", "Test accuracy vs epoch per schedule",
                  "Privacy spent (epsilon) vs epoch per schedule", "Per-epoch layer plan", "Cost breakdown",
                  "Headline comparison"):
        assert title in html, title
    # Both accelerators are facets of the Pareto figure.
    assert "h100_sxm" in html and "b200" in html


def test_report_is_self_contained(report_html):
    _, html = report_html
    # plotly.js is embedded exactly once and nothing is fetched from the network.
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    assert html.count(bundle[:300]) == 1 and html.count(bundle[-300:]) == 1
    assert not re.search(r"<script[^>]+src=", html)
    assert "cdn.plot.ly" not in html.split("</script>", 1)[1]  # no CDN after the embedded bundle
    assert html.count("Plotly.newPlot") >= 6


def test_report_writes_figure_data(report_html, sweep_dir):
    data = sweep_dir / "report_data"
    for name in ("headline.csv", "pareto_theoretical_digits.csv", "test_acc_vs_epoch.csv", "cost_breakdown.csv"):
        assert (data / name).is_file(), name
    fr = pd.read_csv(data / "pareto_theoretical_digits.csv")
    assert {"accelerator", "on_front", "test_acc_mean", "n_seeds"} <= set(fr.columns)
    assert fr["n_seeds"].eq(2).all()
    # Each accelerator has a non-empty front.
    assert fr.groupby("accelerator")["on_front"].any().all()


def test_run_summary_speedup_is_time_weighted():
    # Two epochs: times 1 s and 3 s at speedups 2x and 1x -> baseline 2 + 3 = 5 s, run speedup 5/4.
    t = pd.DataFrame({"point_id": ["a", "a"], "accelerator": ["x", "x"], "epoch": [0, 1], "test_acc": [0.5, 0.6],
                      "schedule_kind": ["random"] * 2, "budget": [0.5] * 2, "recipe": ["fp4"] * 2,
                      "time_theoretical_s": [1.0, 3.0], "speedup_vs_bf16_theoretical": [2.0, 1.0],
                      "examples": [100, 100]})
    s = run_summary(t)
    assert s["run_speedup_theoretical"].iloc[0] == pytest.approx(5 / 4)
    assert s["throughput_theoretical"].iloc[0] == pytest.approx(200 / 4)
    assert s["test_acc"].iloc[0] == 0.6 and s["schedule"].iloc[0] == "random b=0.5 fp4"


def test_plan_matrix_counts_share_of_seeds():
    plans = [({"a": "fp4"}, 0), ({"a": "fp4", "b": "fp4"}, 1)]
    rows = []
    for pid, (q0, _) in zip(("s0", "s1"), plans):
        rows.append({"point_id": pid, "epoch": 0, "plan": json.dumps({"quantized": q0, "scores": {"a": 0, "b": 0}})})
    m = plan_matrix(pd.DataFrame(rows), ["s0", "s1"])
    assert m.loc["a", 0] == 1.0 and m.loc["b", 0] == 0.5


def test_report_on_empty_dir_is_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="runs/"):
        build_report(tmp_path)


def _report_cli(args, capsys):
    from dpquant_sim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", *args])
    return e.value.code, capsys.readouterr()


def test_report_out_dir_and_other_accelerators_leave_the_sweep_table_alone(sweep_dir, tmp_path, capsys):
    """Reproducers: `report --out DIR` raised IsADirectoryError; `report --accelerators X` rewrote the sweep's
    results.csv with X's costs."""
    code, out = _report_cli([str(sweep_dir), "--out", str(tmp_path)], capsys)
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out.err
    assert f"report --out='{tmp_path}' is not allowed; expected an HTML file path, not a folder" in lines[0]
    assert os.listdir(tmp_path) == []
    table = {n: (sweep_dir / n).read_bytes() for n in ("results.csv", "results.parquet")}
    html = tmp_path / "mi.html"
    code, out = _report_cli([str(sweep_dir), "--accelerators", "mi355x", "--out", str(html)], capsys)
    assert code == 0, out.err
    assert {n: (sweep_dir / n).read_bytes() for n in table} == table
    derived = pd.read_csv(tmp_path / "mi_results.csv")
    assert set(derived["accelerator"]) == {"mi355x"} and (tmp_path / "mi_results.parquet").is_file()
    assert set(pd.read_csv(sweep_dir / "results.csv")["accelerator"]) == {"h100_sxm", "b200"}


def test_report_recollect_refuses_an_edited_run(sweep_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_dir, sweep)
    rd = next(p.parent for p in sorted(sweep.glob("runs/*/summary.json")))
    m = pd.read_csv(rd / "metrics.csv")
    m.loc[len(m) - 1, "test_acc"] = 0.99
    m.to_csv(rd / "metrics.csv", index=False)
    table = (sweep / "results.csv").read_bytes()
    code, out = _report_cli([str(sweep), "--recollect"], capsys)
    assert code == 2 and "metrics.csv disagrees with summary.json (test_acc=" in out.err and "Traceback" not in out.err
    assert (sweep / "results.csv").read_bytes() == table


def test_write_figure_html_and_csv(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kaleido", None)  # the message path (rendering is tested in a slow test)
    df = pd.DataFrame({"x": np.arange(3), "y": [1.0, 2.0, 4.0]})
    out = write_figure(line_figure(df, x="x", y="y", title="t"), df, tmp_path / "fig", png=True)
    html = out["html"].read_text()
    assert "<html" in html and "Plotly.newPlot" in html and not re.search(r"<script[^>]+src=", html)
    pd.testing.assert_frame_equal(pd.read_csv(out["csv"]), df)
    assert out["png"] is None and "install kaleido" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "google-chrome-stable",
                 "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


# Records console.error calls and uncaught errors, and after load describes every plotly graph div (traces
# drawn, tick labels, bounding boxes of the titles, axis titles, annotations and legend) into attributes that
# --dump-dom prints.
_PROBE = (
    "<script>window.__errs=[];var _ce=console.error;console.error=function(){"
    "__errs.push(Array.prototype.join.call(arguments,' '));_ce.apply(console,arguments)};"
    "window.addEventListener('error',function(e){__errs.push('uncaught: '+e.message)});"
    "function __box(el,kind){var r=el.getBoundingClientRect();return {kind:kind,text:(el.textContent||'').slice(0,60),"
    "x0:r.left,y0:r.top,x1:r.right,y1:r.bottom}}"
    "function __plots(){return Array.prototype.map.call(document.querySelectorAll('.js-plotly-plot'),function(gd){"
    "var boxes=[];gd.querySelectorAll('.gtitle').forEach(function(e){boxes.push(__box(e,'title'))});"
    "gd.querySelectorAll('g[class^=\"g-x\"],g[class^=\"g-y\"]').forEach(function(g){"
    "if(/title$/.test(g.getAttribute('class'))){var t=g.querySelector('text');"
    "if(t)boxes.push(__box(t,'axis title'))}});"
    "gd.querySelectorAll('g.annotation').forEach(function(e){boxes.push(__box(e,'annotation'))});"
    "gd.querySelectorAll('g.legend').forEach(function(e){boxes.push(__box(e,'legend'))});"
    "return {id:gd.id,traces:(gd._fullData||[]).length,svg:gd.querySelectorAll('.main-svg').length,"
    "drawn:gd.querySelectorAll('.cartesianlayer g.trace, .heatmaplayer g.hm').length,"
    "marks:gd.querySelectorAll('.cartesianlayer .point, .heatmaplayer image').length,"
    "width:gd.getBoundingClientRect().width,left:gd.getBoundingClientRect().left,"
    "right:gd.getBoundingClientRect().right,"
    "ticks:Array.prototype.map.call(gd.querySelectorAll('.xtick text, .ytick text'),function(t){return t.textContent}),"
    "boxes:boxes}})}"
    "window.addEventListener('load',function(){setTimeout(function(){var d=document.documentElement;"
    "d.setAttribute('data-plots',JSON.stringify(__plots()));"
    "d.setAttribute('data-console-errors',JSON.stringify(__errs))},1500)});</script>"
)

_CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-extensions", "--window-size=1280,1000", "--virtual-time-budget=15000")


def _attr(dom: str, name: str):
    import html as _html

    m = re.search(rf'{name}="([^"]*)"', dom)
    return None if m is None else json.loads(_html.unescape(m.group(1)))


def _load_in_chromium(html_path, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    profile = tmp_path / "chromium-profile"  # fresh profile: nothing cached, no first-run state
    proc = subprocess.run(
        [_chromium(), *_CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
         "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = _attr(proc.stdout, "data-console-errors")
    assert errors is not None, "the page never finished loading"
    errors += [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]
    return proc.stdout, errors


_NO_CHROMIUM = ("no Chromium/Chrome on PATH: install it (apt-get install chromium; .ci/run tries) to run the headless "
                "report test")


@pytest.mark.skipif(_chromium() is None, reason=_NO_CHROMIUM)
def test_chromium_probe_detects_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><head></head><body><script>console.error('boom'); undefinedFn();</script></body></html>")
    _, errors = _load_in_chromium(bad, tmp_path)
    assert any("boom" in e for e in errors) and any("undefinedFn" in e for e in errors)


def _overlaps(boxes):
    """Pairs of boxes (non-empty) that intersect by more than 1 px in both directions."""
    real = [b for b in boxes if b["x1"] - b["x0"] > 0.5 and b["y1"] - b["y0"] > 0.5]
    out = []
    for i, a in enumerate(real):
        for b in real[i + 1:]:
            if min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) > 1 and min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) > 1:
                out.append((a["kind"], a["text"], b["kind"], b["text"]))
    return out


@pytest.mark.slow  # starts a real headless Chromium: 5-30 s on 2 busy cores
@pytest.mark.skipif(_chromium() is None, reason=_NO_CHROMIUM)
def test_report_renders_every_plot_in_headless_chromium(report_html, sweep_dir, tmp_path):
    """The report opened in a real headless Chromium (no network: plotly.js is embedded): no console error;
    one rendered plotly graph per figure, each with its traces drawn; no SI-suffixed tick label ('60µ'); no
    title, axis title, annotation or legend overlapping another."""
    from dpquant_sim.analysis.report import build_sections
    from dpquant_sim.sweep.collect import load_table

    path, html = report_html
    dom, errors = _load_in_chromium(path, tmp_path)
    assert errors == []
    plots = _attr(dom, "data-plots")
    expected = {f"fig-{s.slug}": len(s.figure.data) for s in build_sections(load_table(sweep_dir))
                if s.figure is not None}
    assert len(expected) >= 7 and html.count('class="plotly-graph-div"') == len(expected)
    assert sorted(p["id"] for p in plots) == sorted(expected)
    for p in plots:
        assert p["svg"] >= 1 and p["width"] >= 900, p["id"]
        assert p["traces"] == expected[p["id"]], p["id"]
        assert p["drawn"] >= 1 and p["marks"] >= 1, p  # traces drawn with visible points / bars / heatmap image
        si = [t for t in p["ticks"] if re.search(r"\d\s*[µumkMGTnp]$", t)]
        assert si == [], (p["id"], si)
        assert _overlaps(p["boxes"]) == [], p["id"]
        cut = [b["text"] for b in p["boxes"] if b["x1"] > p["right"] + 1 or b["x0"] < p["left"] - 1]
        assert cut == [], (p["id"], cut)  # no title, caption or legend runs off the figure


def test_overlap_check_can_fail():
    a = {"kind": "title", "text": "a", "x0": 0, "y0": 0, "x1": 100, "y1": 20}
    b = {"kind": "axis title", "text": "b", "x0": 50, "y0": 10, "x1": 150, "y1": 30}
    c = {"kind": "legend", "text": "c", "x0": 200, "y0": 0, "x1": 300, "y1": 20}
    assert _overlaps([a, b, c]) == [("title", "a", "axis title", "b")]


# ------------------------------------------------------------------------------ labelling for papers
def _figures(sweep_dir, accelerators=None):
    return _figures_cached(str(sweep_dir), tuple(accelerators) if accelerators else None)


@functools.lru_cache(maxsize=4)
def _figures_cached(sweep_dir, accelerators):
    from dpquant_sim.analysis.report import build_sections
    from dpquant_sim.sweep.collect import collect_sweep, load_table

    table = load_table(sweep_dir) if accelerators is None else collect_sweep(
        sweep_dir, accelerators=list(accelerators), write=False)
    table["delta"] = 1e-5  # what the engine writes; the fake points' metrics.csv lack it (build_report fills it)
    return build_sections(table)


def _axis_titles(fig):
    lay = fig.layout.to_plotly_json()
    return {k: (v.get("title") or {}).get("text", "") for k, v in lay.items()
            if re.fullmatch(r"[xy]axis\d*", k)}


def test_every_figure_caption_states_epsilon_delta_and_what_is_compared(report_html, sweep_dir):
    # The sweep (tests/test_sweep_runner.RAW) trains at epsilon 8 with the TrainConfig default delta 1e-5.
    path, html = report_html
    figs = [s for s in _figures(sweep_dir) if s.figure is not None]
    for s in figs:
        cap = s.figure.layout.meta["caption"]
        assert "ε = 8" in cap and "δ = 1e-05" in cap, (s.slug, cap)
        if not s.slug.startswith("plan_"):  # the fixture has 2 seeds per configuration
            assert "error bars: std over 2 seeds" in cap, (s.slug, cap)
        assert cap.startswith("Compared: "), (s.slug, cap)
        if s.slug.startswith("pareto"):
            kind = s.slug.split("_")[1]
            assert f"vs {kind} (" in cap and "unquantized layers costed in bf16" in cap, cap
        if s.slug in ("speedup_by_clipping", "cost_breakdown"):
            assert "theoretical" in cap and "roofline" in cap and "bf16" in cap, cap
    # the HTML written by build_report carries delta too (filled from each run's config.yaml)
    assert "δ = 1e-05" in html and "ε = 8" in html
    # the headline table says what its columns are
    assert "<p class=\"caption\">Columns. schedule:" in html
    for words in ("final test accuracy", "ε spent (δ = 1e-05)", "h100_sxm: speedup × bf16"):
        assert words in html, words


def test_axis_titles_have_units_and_none_is_value(sweep_dir):
    unitless = {"accelerator", "layer (module name)", "epoch"}
    for s in _figures(sweep_dir):
        if s.figure is None:
            continue
        titles = _axis_titles(s.figure)
        shown = [t for t in titles.values() if t]
        assert any(k.startswith("x") and t for k, t in titles.items()), s.slug
        assert any(k.startswith("y") and t for k, t in titles.items()), s.slug
        for t in shown:
            assert t.strip().lower() != "value", s.slug
            assert re.search(r"\([^)]+\)$", t) or t in unitless, (s.slug, t)
        lay = s.figure.layout.to_plotly_json()
        assert all(v.get("exponentformat") == "power" for k, v in lay.items() if re.fullmatch(r"[xy]axis\d*", k))


def _si(v: float, unit: str) -> str:
    """Hand-written reference: the SI prefix a human would pick for the largest bar."""
    for f, p in ((1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")):
        if v >= f:
            return p + unit
    return "n" + unit


def test_cost_panels_scale_to_readable_units_and_mark_missing_bars(sweep_dir):
    secs = {s.slug: s for s in _figures(sweep_dir, accelerators=["h100_sxm", "tpu_v6e", "gaudi3"])}
    cost = secs["cost_breakdown"]
    d = cost.data
    titles = [t for t in _axis_titles(cost.figure).values() if t]
    for metric, unit in (("time, theoretical", "s"), ("time, roofline", "s")):
        want = _si(float(d.loc[d["metric"] == metric, "value"].max()), unit)
        assert any(t == f"whole-run time ({want})" for t in titles), (want, titles)
    # tpu_v6e.yaml has tdp: null (no per-chip TDP published) -> its energy bar is missing, with the reason;
    # gaudi3.yaml has no price_per_hour -> its cost bar is missing, with the reason.
    energy = d[d["metric"].str.startswith("energy")]
    assert energy.loc[energy["accelerator"] == "tpu_v6e", "value"].isna().all()
    notes = [(a.x, a.text) for a in cost.figure.layout.annotations if str(a.text).startswith("n/a")]
    assert ("tpu_v6e", "n/a: no TDP in profile") in notes, notes
    assert ("gaudi3", "n/a: no price_per_hour in profile") in notes, notes
    assert not any(x == "h100_sxm" for x, _ in notes)  # h100_sxm has every figure
    assert notes.count(("tpu_v6e", "n/a: no TDP in profile")) == 1


def test_baseline_label_matches_the_tables_baseline(report_html, sweep_dir):
    from dpquant_sim.analysis.report import speedup_baseline
    from dpquant_sim.sweep.collect import load_table

    _, html = report_html
    t = load_table(sweep_dir)
    assert "speedup_vs_bf16_theoretical" in t.columns  # the cost model's bf16 baseline column
    assert speedup_baseline(t) == "bf16"
    assert speedup_baseline(pd.DataFrame(columns=["speedup_theoretical"])) == "the baseline"  # never a guess
    assert "over fp32" not in html and "x fp32" not in html
    assert "over bf16" in html or "over the same run in bf16" in html
    # the speedup bars: y axis names the baseline; every bar is a ratio over bf16 (fp32 schedule excluded)
    s = {x.slug: x for x in _figures(sweep_dir)}["speedup_by_clipping"]
    assert set(_axis_titles(s.figure).values()) >= {"speedup (× over bf16)"}


def test_privacy_lines_stay_distinguishable_when_they_coincide(sweep_dir):
    # fake runs spend the same epsilon every epoch whatever the schedule: the lines coincide exactly
    s = {x.slug: x for x in _figures(sweep_dir)}["epsilon_vs_epoch"]
    styles = [(t.line.dash, t.marker.symbol, t.marker.size) for t in s.figure.data]
    assert len(styles) == 3 and len(set(styles)) == 3
    assert len({d for d, _, _ in styles}) == 3 and len({m for _, m, _ in styles}) == 3
    assert "agree within 0.5%" in s.figure.layout.meta["caption"]


def test_pareto_has_marker_shape_legend_and_seed_error_bars(sweep_dir):
    s = {x.slug: x for x in _figures(sweep_dir)}["pareto_theoretical_digits"]
    names = [t.name for t in s.figure.data if t.showlegend is not False]
    assert "recipe = fp4" in names and "recipe = none" in names  # fp32 runs have recipe 'none'
    shape = [t for t in s.figure.data if t.legendgroup == "shape"]
    assert shape[0].legendgrouptitle.text == "marker shape: recipe"
    assert len({t.marker.symbol for t in shape}) == len(shape)
    # Seeds 0 and 1 made to differ by 0.02 in accuracy -> every point's y error bar is the sample std of
    # (a, a + 0.02) = 0.02 / sqrt(2).
    from dpquant_sim.analysis.report import build_sections
    from dpquant_sim.sweep.collect import load_table

    t = load_table(sweep_dir)
    t.loc[t["seed"] == 1, "test_acc"] += 0.02
    t["delta"] = 1e-5
    s = {x.slug: x for x in build_sections(t)}["pareto_theoretical_digits"]
    bars = [v for tr in s.figure.data if tr.error_y is not None and tr.error_y.array is not None
            for v in tr.error_y.array]
    n_points = sum(len(tr.x) for tr in s.figure.data
                   if tr.mode == "markers" and tr.x is not None and tr.x[0] is not None)
    assert len(bars) == n_points > 0 and np.allclose(bars, 0.02 / np.sqrt(2))
    assert "error bars: std over 2 seeds" in s.figure.layout.meta["caption"]


def test_static_export_message_without_kaleido(tmp_path, capsys, monkeypatch):
    import sys

    from dpquant_sim.analysis.figures import export_static

    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    df = pd.DataFrame({"x": [1, 2], "y": [3, 4]})
    assert export_static({tmp_path / "f": line_figure(df, x="x", y="y")}, ["svg", "pdf"]) is None
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("static export (svg, pdf) skipped: kaleido is not installed")
    assert list(tmp_path.iterdir()) == []


def test_static_export_renderer_failure_is_one_line(tmp_path, capsys, monkeypatch):
    import plotly.io as pio

    from dpquant_sim.analysis import figures
    from dpquant_sim.analysis.figures import export_static

    # as if kaleido imported but found no browser (no fake kaleido module: plotly would cache it)
    monkeypatch.setattr(figures, "static_export_unavailable", lambda: None)

    def broken(*a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nsecond line")

    monkeypatch.setattr(pio, "write_images", broken)
    df = pd.DataFrame({"x": [1, 2], "y": [3, 4]})
    assert export_static({tmp_path / "f": line_figure(df, x="x", y="y")}, ["pdf"]) is None
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and "RuntimeError: Kaleido requires Google Chrome" in out[0] and "Traceback" not in out[0]
    assert list(tmp_path.iterdir()) == []  # no temporaries left


def test_report_static_flag_rejects_unknown_format(sweep_dir, tmp_path, capsys):
    code, out = _report_cli([str(sweep_dir), "--out", str(tmp_path / "r.html"), "--static", "svg,bmp"], capsys)
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--static='bmp' is not allowed" in lines[0]
    assert not (tmp_path / "r.html").exists()


def test_report_out_names_its_data_folder(sweep_dir, tmp_path, capsys):
    """`--out tiny.html` writes tiny_data/ (data named after the report, so reports in one folder never share
    it); docs/usage.md says so."""
    from pathlib import Path

    code, out = _report_cli([str(sweep_dir), "--out", str(tmp_path / "tiny.html")], capsys)
    assert code == 0, out.err
    assert (tmp_path / "tiny_data" / "headline.csv").is_file() and not (tmp_path / "report_data").exists()
    assert "tiny_data/" in (tmp_path / "tiny.html").read_text(encoding="utf-8")
    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    assert "tiny_data/" in usage and "<report stem>_data/" in usage


def _static_ok() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return _chromium() is not None


@pytest.mark.slow  # kaleido starts a browser: 5-30 s
@pytest.mark.skipif(not _static_ok(), reason="static export needs kaleido and a Chrome/Chromium")
def test_static_export_writes_svg_and_pdf(tmp_path):
    from dpquant_sim.analysis.figures import export_static

    df = pd.DataFrame({"x": [1, 2, 3], "y": [3.0, 4.0, 2.0]})
    fig = line_figure(df, x="x", y="y", title="static", x_title="x (s)", y_title="y (J)", caption="ε = 1, δ = 1e-05")
    out = export_static({tmp_path / "f": fig}, ["svg", "pdf", "png"])
    assert [p.name for p in out] == ["f.svg", "f.pdf", "f.png"]
    svg = (tmp_path / "f.svg").read_text(encoding="utf-8")
    assert "<svg" in svg[:500] and "static" in svg and "δ = 1e-05" in svg
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pdf", "f.png", "f.svg"]
