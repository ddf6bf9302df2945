"""Roofline/theoretical times against hand computations, fallbacks, monotonicity, the paper's formula,
and the vectorized sweep against the scalar model."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from dpquant_sim.cost.flops import gemm_layer_ops, step_ops
from dpquant_sim.cost.model import estimate, op_time, paper_formula, share_for_speedup, step_cost
from dpquant_sim.cost.profiles import get_profile, load_profiles, parse_profile
from dpquant_sim.cost.sweep import sweep
from dpquant_sim.nn.shapes import trace_layers

SRC = "https://example.org/datasheet"


def _peak(v, unit="TFLOP/s"):
    return {"value": v, "unit": unit, "source": SRC, "provenance": "assumption"}


def _q(v, unit=None):
    d = {"value": v, "source": SRC, "provenance": "assumption"}
    if unit:
        d["unit"] = unit
    return d


def toy_profile(**over) -> "object":
    """Round numbers: bf16 100 TFLOP/s, fp8 400 (4x), fp32 10, vector 10, 1 TB/s, gemm eff 0.5, bw eff 0.8, 2 us."""
    d = {
        "name": "toy", "display_name": "Toy", "vendor": "test", "kind": "gpu",
        "peaks": {"fp32": _peak(10), "tf32": _peak(50), "bf16": _peak(100), "fp16": _peak(100),
                  "fp8": {**_peak(400), "faster_than_2x": True},
                  "fp6": {"supported": False, "fallback": "fp8"}, "fp4": {"supported": False, "fallback": "fp8"},
                  "int8": {**_peak(400, "TOP/s"), "faster_than_2x": True},
                  "int4": {"supported": False, "fallback": "int8"}},
        "vector": _q(10, "TFLOP/s"),
        "memory": {"bandwidth": _q(1, "TB/s"), "capacity": _q(80, "GB")},
        "onchip": _q(50, "MB"),
        "tdp": _q(500, "W"),
        "efficiency": {"gemm": _q(0.5), "bandwidth": _q(0.8)},
        "launch_floor": _q(2, "us"),
        "price_per_hour": {**_q(3.6, "USD/h"), "as_of": "2026-01", "offer": "toy offer"},
    }
    d.update(over)
    return parse_profile(d)


def _linear_shape(k, n):
    (s,) = trace_layers(nn.Sequential(nn.Linear(k, n, bias=False)), (k,))
    return s


def test_compute_bound_gemm_by_hand():
    p = toy_profile()
    fwd = [o for o in gemm_layer_ops(_linear_shape(4096, 4096), 4096, None, base="bf16") if o.op == "fwd"][0]
    flops = 2 * 4096**3
    assert fwd.flops == flops
    compute = flops / (100e12 * 0.5)  # 2.749 ms
    memory = 3 * 4096 * 4096 * 2 / (1e12 * 0.8)  # x, W, y in bf16: 0.126 ms
    assert compute > memory
    assert op_time(fwd, p, "roofline") == pytest.approx(compute + 2e-6, rel=1e-12)
    assert op_time(fwd, p, "theoretical") == pytest.approx(flops / 100e12, rel=1e-12)


def test_memory_bound_gemm_by_hand():
    p = toy_profile()
    fwd = [o for o in gemm_layer_ops(_linear_shape(4096, 16), 4096, None, base="bf16") if o.op == "fwd"][0]
    flops = 2 * 4096 * 4096 * 16
    nbytes = 4096 * 4096 * 2 + 4096 * 16 * 2 + 4096 * 16 * 2
    assert fwd.bytes == nbytes
    compute, memory = flops / 50e12, nbytes / 0.8e12
    assert memory > compute
    assert op_time(fwd, p, "roofline") == pytest.approx(memory + 2e-6, rel=1e-12)


def test_energy_and_dollars_from_roofline_time():
    shapes = trace_layers(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)), (256,))
    sc = step_cost(shapes, None, toy_profile(), batch=64)
    assert sc.energy_j == pytest.approx(sc.roofline_s * 500)
    assert sc.dollars == pytest.approx(sc.roofline_s * 3.6 / 3600)
    assert sc.roofline_s == pytest.approx(sc.breakdown["roofline_s"].sum())
    assert set(sc.by("op").index) >= {"fwd", "dgrad", "wgrad", "psg_norm", "clip_sum", "noise", "optimizer"}


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


SHAPES = trace_layers(_net(), (3, 8, 8))
GEMM = [s.name for s in SHAPES if s.is_gemm]  # ['0', '3', '7']


def _gemm_time(profile, plan, batch):
    return sum(op_time(o, profile, "theoretical") for o in step_ops(SHAPES, plan, batch=batch) if o.kind == "gemm")


def test_a100_fp8_runs_at_bf16_rate_and_h100_fp4_at_fp8_rate():
    a100, h100 = get_profile("a100_sxm"), get_profile("h100_sxm")
    allq = lambda r: {n: r for n in GEMM}  # noqa: E731
    assert _gemm_time(a100, allq("fp8"), 32) == pytest.approx(_gemm_time(a100, None, 32), rel=1e-12)
    assert _gemm_time(h100, allq("fp4"), 32) == pytest.approx(_gemm_time(h100, allq("fp8"), 32), rel=1e-12)
    assert _gemm_time(h100, allq("fp8"), 32) == pytest.approx(_gemm_time(h100, None, 32) / 2, rel=1e-3)  # 1979 vs 989
    # the breakdown says what actually ran
    df = step_cost(SHAPES, allq("fp8"), a100, batch=32).breakdown
    assert set(df.loc[df["kind"] == "gemm", "runs_as"]) == {"bf16"}


def test_paper_formula_reproduced_exactly():
    """Quantized GEMMs 4x faster (toy fp8 = 400 vs bf16 = 100), everything else unchanged:
    T = T_est + (1 - p + p/4)(T_train - T_other) + T_other with p the quantized share of GEMM FLOPs."""
    p = toy_profile()
    B = 16
    # hand-counted GEMM FLOPs per example: conv0 2*64*27*8, conv3 2*64*72*8, fc 2*8*10
    f0, f3, f7 = 2 * 64 * 27 * 8, 2 * 64 * 72 * 8, 2 * 8 * 10
    # conv0 is the first parametric layer: no dgrad; the others run 3 GEMMs
    gemm_flops = {"0": 2 * B * f0, "3": 3 * B * f3, "7": 3 * B * f7}
    t_gemm = sum(gemm_flops.values()) / 100e12
    t_train = step_cost(SHAPES, None, p, batch=B).theoretical_s
    t_other = t_train - t_gemm
    assert 0 < t_other < t_train
    t_est = 1.5e-6
    for plan in ({"3": "fp8"}, {"0": "fp8", "7": "fp8"}, {n: "fp8" for n in GEMM}):
        share = sum(gemm_flops[n] for n in plan) / sum(gemm_flops.values())
        got = step_cost(SHAPES, plan, p, batch=B, overhead_s=t_est).theoretical_s
        assert got == pytest.approx(paper_formula(t_train, t_other, share, t_est), rel=1e-12)
        assert step_cost(SHAPES, plan, p, batch=B).quantized_flop_share == pytest.approx(share, rel=1e-12)
    # the inverse: 2.21x with no other work needs 73% of the GEMM time quantized
    assert share_for_speedup(2.21, 1.0, 0.0) == pytest.approx((1 - 1 / 2.21) / 0.75)


FAST_FORMATS = [("h100_sxm", "fp8"), ("b200", "fp4"), ("b200", "fp8"), ("mi355x", "fp4"), ("gaudi3", "fp8"),
                ("a100_sxm", "int8"), ("tpu7x", "fp8")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=3, max_size=3), st.lists(st.booleans(), min_size=3, max_size=3),
       st.sampled_from(FAST_FORMATS), st.sampled_from([1, 7, 64, 512]))
def test_more_quantized_layers_never_slower_theoretical(a, b, hw_fmt, batch):
    hw, fmt = hw_fmt
    prof = get_profile(hw)
    small = {n for n, x in zip(GEMM, a) if x}
    big = small | {n for n, x in zip(GEMM, b) if x}
    t_small = step_cost(SHAPES, {n: fmt for n in small}, prof, batch=batch).theoretical_s
    t_big = step_cost(SHAPES, {n: fmt for n in big}, prof, batch=batch).theoretical_s
    assert t_big <= t_small * (1 + 1e-12)


def test_speedups_against_both_baselines():
    e = estimate(SHAPES, {n: "fp8" for n in GEMM}, get_profile("h100_sxm"), batch=128)
    assert e.fp32.base == "fp32" and e.bf16.base == "bf16"
    assert e.speedup_vs_fp32.theoretical > e.speedup_vs_bf16.theoretical > 1
    assert e.speedup_vs_bf16.theoretical == pytest.approx(e.bf16.theoretical_s / e.step.theoretical_s)
    s = e.summary()
    assert s["fits"] is True and s["hw"] == "h100_sxm"


def test_memory_feasibility_flags_per_sample_gradients():
    from dpquant_sim.training.models import build_model

    shapes = trace_layers(build_model("resnet18", in_channels=3, num_classes=10, image_size=32), (3, 32, 32))
    l4 = get_profile("l4")  # 24 GB
    assert step_cost(shapes, None, l4, batch=64).memory.fits
    big = step_cost(shapes, None, l4, batch=1024)  # 1024 x 11.2M x 4 B = 46 GB of per-sample gradients
    assert not big.memory.fits and big.memory.per_sample_grads > 24e9
    assert step_cost(shapes, None, l4, batch=1024, dp=False).memory.fits


def test_bad_plan_layer_is_one_error():
    from dpquant_sim.errors import ConfigError

    with pytest.raises(ConfigError, match="plan layer='nope'"):
        estimate(SHAPES, {"nope": "fp8"}, get_profile("h100_sxm"), batch=8)
    with pytest.raises(ConfigError, match="recipe='fp3'"):
        estimate(SHAPES, {"0": "fp3"}, get_profile("h100_sxm"), batch=8)


@pytest.mark.parametrize("dp,base,opt", [(True, "bf16", "sgd"), (False, "fp32", "adam"), (True, "fp16", "momentum")])
def test_vectorized_sweep_equals_scalar_model(dp, base, opt):
    rng = np.random.default_rng(0)
    recipes = ["fp8", "fp4", "mxfp8", "nvfp4", "int8", "fp6"]
    plans = [{n: str(rng.choice(recipes)) for n in GEMM if rng.random() < 0.6} for _ in range(12)]
    profs = list(load_profiles().values())
    batches = [1, 37, 256]
    res = sweep(SHAPES, plans, profs, batches, base=base, dp=dp, optimizer=opt)
    for _ in range(25):
        i, h, b = rng.integers(len(plans)), rng.integers(len(profs)), rng.integers(len(batches))
        sc = step_cost(SHAPES, plans[i], profs[h], batch=batches[b], base=base, dp=dp, optimizer=opt)
        assert res.roofline_s[i, h, b] == pytest.approx(sc.roofline_s, rel=1e-10)
        assert res.theoretical_s[i, h, b] == pytest.approx(sc.theoretical_s, rel=1e-10)
        assert res.memory_bytes[i, b] == pytest.approx(sc.memory.total, rel=1e-12)
        assert res.fits[i, h, b] == sc.memory.fits
        assert res.quantized_flop_share[i, b] == pytest.approx(sc.quantized_flop_share, rel=1e-12, abs=1e-15)
        if sc.energy_j is not None:
            assert res.energy_j[i, h, b] == pytest.approx(sc.energy_j, rel=1e-10)
    df = res.to_frame()
    assert len(df) == len(plans) * len(profs) * len(batches)
