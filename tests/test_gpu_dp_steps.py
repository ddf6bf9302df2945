"""The prepared GPU script for DP steps runs end to end on the CPU (figures meaningless; the GPU run is manual)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 20 s: a few DP steps of every variant plus the quantizer section
def test_whole_script_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_dp_steps.py"), "--out", str(tmp_path),
                        "--device", "cpu", "--quick"], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DPQUANT_QUANT_BACKEND": "torch"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "dp_steps.csv")))
    from dpquant_sim.clipping_rules import CLIPPING_ALGORITHMS

    assert {row["variant"].split("_")[0] for row in rows} == {"np", *CLIPPING_ALGORITHMS}
    assert not any(row.get("error") for row in rows), [row["error"] for row in rows if row.get("error")]
    assert all(float(row["predicted_roofline_ms"]) > 0 for row in rows if row["variant"] != "np_fp32")
    assert list(csv.DictReader(open(tmp_path / "quantizer.csv")))
