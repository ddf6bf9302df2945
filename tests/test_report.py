"""HTML report: expected sections and figures, plotly.js embedded once, no network, data CSVs; headless
Chromium (where installed) loads it without console errors."""

from __future__ import annotations

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


def test_write_figure_html_and_csv(tmp_path, capsys):
    df = pd.DataFrame({"x": np.arange(3), "y": [1.0, 2.0, 4.0]})
    out = write_figure(line_figure(df, x="x", y="y", title="t"), df, tmp_path / "fig", png=True)
    html = out["html"].read_text()
    assert "<html" in html and "Plotly.newPlot" in html and not re.search(r"<script[^>]+src=", html)
    pd.testing.assert_frame_equal(pd.read_csv(out["csv"]), df)
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert out["png"] is None and "install kaleido" in capsys.readouterr().out


def _chromium() -> str | None:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "google-chrome-stable",
                 "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


# Records console.error calls and uncaught errors into an attribute that --dump-dom prints.
_PROBE = (
    "<script>window.__errs=[];var _ce=console.error;console.error=function(){"
    "__errs.push(Array.prototype.join.call(arguments,' '));_ce.apply(console,arguments)};"
    "window.addEventListener('error',function(e){__errs.push('uncaught: '+e.message)});"
    "window.addEventListener('load',function(){setTimeout(function(){document.documentElement.setAttribute("
    "'data-console-errors',JSON.stringify(__errs))},500)});</script>"
)


def _load_in_chromium(html_path, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'data-console-errors="([^"]*)"', proc.stdout)
    assert m, "the page never finished loading"
    errors = json.loads(m.group(1).replace("&quot;", '"'))
    errors += [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]
    return proc.stdout, errors


@pytest.mark.skipif(_chromium() is None, reason="no Chromium/Chrome on PATH (headless console check skipped)")
def test_chromium_probe_detects_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><head></head><body><script>console.error('boom'); undefinedFn();</script></body></html>")
    _, errors = _load_in_chromium(bad, tmp_path)
    assert any("boom" in e for e in errors) and any("undefinedFn" in e for e in errors)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium/Chrome on PATH (headless console check skipped)")
def test_report_opens_in_headless_chromium(report_html, tmp_path):
    path, _ = report_html
    dom, errors = _load_in_chromium(path, tmp_path)
    assert errors == []
    # Plotly rendered every figure into the DOM (one main svg per figure at least).
    assert dom.count('class="main-svg"') >= 6
