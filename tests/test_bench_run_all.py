"""``make bench`` (benchmarks/run_all.py): every benchmark script is listed, and a run writes logs and a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402


def test_every_benchmark_script_is_run():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"run_all"}
    assert {b.name for b in run_all.BENCHES} == scripts
    cmd = run_all.command(run_all.BENCHES[2], Path("/o"), full=False)
    assert cmd[1].endswith("bench_dp_step.py") and cmd[-2:] == ["--json", "/o/bench_dp_step.json"]


@pytest.mark.slow  # one quick benchmark: ~10 s on 2 idle cores
def test_run_all_quick_writes_logs_and_summary(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--out", str(tmp_path),
                        "--only", "bench_cost", "gpu_dp_steps"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "quick" and set(summary["benchmarks"]) == {"bench_cost", "gpu_dp_steps"}
    assert summary["benchmarks"]["bench_cost"]["returncode"] == 0
    assert "points/s" in (tmp_path / "bench_cost.log").read_text()
    import torch

    if not torch.cuda.is_available():
        assert summary["benchmarks"]["gpu_dp_steps"] == {"skipped": "no CUDA device"}
