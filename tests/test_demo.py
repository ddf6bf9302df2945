"""Demo smoke test with tiny settings (mlp, 1 epoch, a digits subset), then the CLI resuming it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.mark.slow  # 4 DP training runs + costing + report: ~20-40 s on 2 busy cores
def test_demo_tiny_end_to_end_and_resume(tmp_path):
    from dpquant_sim.cli import _register, app
    from dpquant_sim.cli.demo_cmd import run_demo

    out = tmp_path / "demo"
    args = dict(epochs=1, model="mlp", n_train=400, workers=1, accelerators=["h100_sxm", "b200"])
    report, head = run_demo(out, progress=False, **args)
    assert report.is_file() and report.stat().st_size > 1_000_000  # plotly.js embedded
    assert list(head["schedule"]) == ["fp32", "static-all luq_fp4", "random b=0.5 luq_fp4", "dpquant b=0.5 luq_fp4"]
    assert {"accuracy", "epsilon", "h100_sxm", "b200"} <= set(head.columns)
    assert all(float(e) <= 8.0 + 1e-6 for e in head["epsilon"])
    assert head.loc[head["schedule"] == "fp32", "b200"].item() == "1.00x"
    assert "Pareto frontier per accelerator (theoretical, digits)" in report.read_text()
    # Rerun through the CLI with the same settings: every run is skipped (resume), the headline is printed.
    summaries = sorted(out.glob("runs/*/summary.json"))
    assert len(summaries) == 4
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    _register()
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--epochs", "1", "--model", "mlp", "--quiet",
                                 "--workers", "1", "--n-train", "400", "--accelerators", "h100_sxm,b200"])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and "dpquant" in r.output
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/summary.json"))] == mtimes
