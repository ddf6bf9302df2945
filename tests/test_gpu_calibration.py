"""benchmarks/gpu_calibration.py without a GPU: the model-derived shape plan, and (slow) the whole prepared
script end to end on the CPU (figures meaningless; the GPU run is what produces calibration data)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_calibration", ROOT / "benchmarks" / "gpu_calibration.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_calibration"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_model_shapes_cover_every_gemm_of_the_cost_model_once():
    from dpquant_sim.cost.flops import step_ops
    from dpquant_sim.cost.run import build_shapes

    mod = _module()
    plan = mod.model_shapes(models=("resnet18",), batches=(64,))
    keys = [(r["m"], r["k"], r["n"], r["batch"]) for r in plan]
    assert len(keys) == len(set(keys))  # distinct
    shapes = build_shapes("resnet18", (3, 32, 32), 10)
    want = set()
    for dp in (False, True):
        for o in step_ops(shapes, None, batch=64, dp=dp):
            if o.kind == "gemm" and (not dp or o.op == "wgrad"):
                want.add(tuple(int(v) for v in o.dims))
    assert set(keys) == want
    ops = {r["shape"].rsplit("-", 1)[-1] for r in plan} | {r["shape"].rsplit("-", 2)[-2] for r in plan}
    assert {"fwd", "dgrad", "wgrad"} <= ops and any(r["batch"] == 64 for r in plan)  # per-sample wgrad batched
    n_gemms = sum(1 for dp in (False, True) for o in step_ops(shapes, None, batch=64, dp=dp)
                  if o.kind == "gemm" and (not dp or o.op == "wgrad"))
    assert sum(r["uses"] for r in plan) == n_gemms


def test_dry_run_writes_the_plan_without_a_gpu(tmp_path):
    mod = _module()
    assert mod.main(["--out", str(tmp_path), "--dry-run", "--limit", "5"]) == 0
    plan = pd.read_csv(tmp_path / "shapes.csv")
    assert len(plan) == 5 and {"m", "k", "n", "batch", "shape"} <= set(plan.columns)


@pytest.mark.slow
def test_whole_script_on_cpu(tmp_path):
    mod = _module()
    rc = mod.main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--limit", "2", "--skip-legacy",
                   "--precisions", "fp32,bf16"])
    assert rc == 0
    rows = pd.read_csv(tmp_path / "gemm_models.csv")
    assert len(rows) == 4 and rows["seconds"].gt(0).all() and rows["seconds_queued"].gt(0).all()
    info = json.loads((tmp_path / "checks.json").read_text())
    assert info["model_error_before_refit"]["points"] == 4
    err = pd.read_csv(tmp_path / "model_error.csv")
    assert {"predicted_s", "error"} <= set(err.columns)
