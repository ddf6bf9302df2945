"""Fitting and cross-validating the GEMM kernel model (cost/calibrate.py): harness bytes by hand, recovery of
known parameters from synthetic measurements, and (slow) the stored H200 fit and generic constants reproduce
from benchmarks/results/gpu_gemm_h200.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpquant_sim.cost.calibrate import Device, Params, _rows, fit, predict, validate
from dpquant_sim.cost.gemm import GENERIC, TILE_FAMILIES
from dpquant_sim.cost.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
H200_CSV = ROOT / "benchmarks" / "results" / "gpu_gemm_h200.csv"
TC, SIMT = TILE_FAMILIES["nvidia-tensor-core"], TILE_FAMILIES["nvidia-simt"]


def _device() -> Device:
    peaks = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "int8": 1978.9e12}
    return Device("toy-h200", peaks, 132, {p: (SIMT if p == "fp32" else TC) for p in peaks}, 4.0e12)


def test_harness_bytes_by_hand():
    df = _rows(pd.DataFrame({"m": [64, 64], "k": [32, 32], "n": [16, 16], "precision": ["fp8", "int8"],
                             "seconds": [1e-5, 1e-5], "shape": ["a", "a"]}))
    # fp8: e4m3 operands (1 byte), bf16 output; int8: int8 operands, int32 output
    assert df["bytes"].tolist() == [64 * 32 + 32 * 16 + 64 * 16 * 2, 64 * 32 + 32 * 16 + 64 * 16 * 4]
    assert df["api"].tolist() == ["scaled_mm", "int_mm"]


def test_predict_one_full_wave_by_hand():
    dev = _device()
    prm = Params({"bf16": 0.5}, k_fill=0.0, overlap=np.inf, tile_gamma=0.0, floor_s={"matmul": 10e-6})
    df = _rows(pd.DataFrame({"m": [128 * 12], "k": [4096], "n": [256 * 11], "precision": ["bf16"],
                             "seconds": [1.0], "shape": ["wave"]}))
    flops = 2 * 128 * 12 * 4096 * 256 * 11
    assert predict(df, dev, prm)[0] == pytest.approx(flops / (989.4e12 * 0.5) + 10e-6)  # one full wave
    assert predict(df, dev, prm, with_floor=False)[0] == pytest.approx(flops / (989.4e12 * 0.5))


def test_fit_recovers_known_parameters_and_loso_is_exact_on_model_data():
    dev = _device()
    true = Params({"bf16": 0.74, "fp8": 0.66}, k_fill=40.0, overlap=1.5, tile_gamma=0.0,
                  floor_s={"matmul": 9e-6, "scaled_mm": 15e-6})
    shapes = [("s2k", 2048, 2048, 2048), ("s4k", 4096, 4096, 4096), ("conv1", 262144, 576, 64),
              ("conv4", 4096, 4608, 512), ("lin", 256, 4096, 4096), ("s8k", 8192, 8192, 8192)]
    rows = [{"shape": s, "m": m, "k": k, "n": n, "precision": p, "seconds": 1.0}
            for s, m, k, n in shapes for p in ("bf16", "fp8")]
    df = _rows(pd.DataFrame(rows))
    df["seconds"] = predict(df, dev, true)
    got = fit(df, dev)
    assert got.eff["bf16"] == pytest.approx(0.74, rel=0.02) and got.eff["fp8"] == pytest.approx(0.66, rel=0.02)
    assert got.floor_s["matmul"] == pytest.approx(9e-6, rel=0.1)
    v = validate(df[["shape", "m", "k", "n", "precision", "seconds"]], dev)
    assert v.max_abs_error < 0.02 and v.max_ratio_error < 0.02


@pytest.mark.slow
def test_stored_h200_fit_and_generic_constants_reproduce():
    """Refit on the measured CSV: the profile's kernel figures, the error bands and the generic constants are
    what the command in docs/cost_model.md prints, and the cross-validated targets hold."""
    h200 = get_profile("h200")
    dev = Device.from_profile(h200, 4.097e12)
    measured = pd.read_csv(H200_CSV)
    v = validate(measured, dev)
    s = v.summary()
    assert s["loso_mean_abs_error"] <= 0.10 and s["loso_max_abs_error"] <= 0.25
    assert s["loso_max_fp8_bf16_ratio_error"] <= 0.15
    for prec, eff in v.full_fit.eff.items():
        assert h200.kernel.efficiency[prec].value == pytest.approx(eff, abs=1e-3)
    assert h200.kernel.k_fill.value == pytest.approx(v.full_fit.k_fill, abs=0.1)
    assert h200.kernel.overlap.value == pytest.approx(v.full_fit.overlap, abs=1e-3)
    assert h200.error_band[:2] == pytest.approx(v.band, abs=1e-3)
    g = validate(measured, dev, per_precision=False)
    assert GENERIC.overlap == pytest.approx(g.full_fit.overlap, abs=1e-3)
    assert GENERIC.k_fill == pytest.approx(g.full_fit.k_fill, abs=0.1)
    assert (GENERIC.band_low, GENERIC.band_high) == pytest.approx(g.band, abs=1e-3)


def test_measured_table_overrides_the_model_for_exactly_those_gemms():
    import torch.nn as tnn

    from dpquant_sim.cost.flops import gemm_layer_ops
    from dpquant_sim.cost.model import gemm_kernel_s
    from dpquant_sim.cost.sweep import sweep
    from dpquant_sim.nn.shapes import trace_layers

    h200 = get_profile("h200")
    meas = pd.read_csv(H200_CSV).set_index(["shape", "precision"])["seconds"]
    floor = h200.kernel.measured.call_floor_us["matmul"] * 1e-6
    (s,) = trace_layers(tnn.Sequential(tnn.Linear(4096, 4096, bias=False)), (4096,))
    fwd = [o for o in gemm_layer_ops(s, 256, None, base="bf16") if o.op == "fwd"][0]
    assert fwd.dims == (256.0, 4096.0, 4096.0, 1.0)  # the measured "linear-b256" shape
    assert gemm_kernel_s(fwd, h200) == pytest.approx(meas[("linear-b256", "bf16")] - floor)
    other = [o for o in gemm_layer_ops(s, 128, None, base="bf16") if o.op == "fwd"][0]
    assert h200.measured_gemm_s(*other.dims, "bf16") is None  # any other shape: the model
    res = sweep([s], [{}], [h200], [256])
    from dpquant_sim.cost.model import step_cost

    assert res.roofline_s[0, 0, 0, 0] == pytest.approx(step_cost([s], None, h200, batch=256).roofline_s, rel=1e-12)
