"""Shipped accelerator profiles load and validate; broken profiles give one clear ProfileError."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dpquant_sim.cost.profiles import PRECISIONS, Peak, get_profile, load_profile_file, load_profiles, shipped_dir
from dpquant_sim.errors import ConfigError, ProfileError

REQUIRED = ["a100_sxm", "h100_sxm", "h200", "b200", "gb200", "b300", "l4", "rtx4090", "rtx5090", "jetson_agx_orin",
            "mi300x", "mi325x", "mi355x", "gaudi3", "tpu_v5e", "tpu_v5p", "tpu_v6e", "tpu7x"]


def test_every_required_profile_ships_and_validates():
    profs = load_profiles()
    assert set(REQUIRED) <= set(profs)
    for f in sorted(shipped_dir().glob("*.yaml")):
        p = load_profile_file(f)
        assert p.name == f.stem
        for prec in PRECISIONS:
            assert p.peak_flops(prec) > 0  # every precision resolves to a supported rate
            e = getattr(p.peaks, prec)
            if isinstance(e, Peak):
                assert e.source.startswith("https://"), (f, prec)


def test_installed_package_finds_the_profiles():
    import importlib.resources

    names = {p.name for p in importlib.resources.files("dpquant_sim.hw_profiles").iterdir()}
    assert "h100_sxm.yaml" in names


@pytest.mark.parametrize("name,prec,runs_as,tflops", [
    ("a100_sxm", "fp8", "bf16", 312), ("h100_sxm", "fp4", "fp8", 1979), ("h100_sxm", "fp6", "fp8", 1979),
    ("h100_sxm", "int4", "int8", 1979), ("gaudi3", "fp8", "fp8", 1835), ("b200", "fp6", "fp6", 4500),
    ("b200", "fp4", "fp4", 9000), ("mi355x", "fp6", "fp6", 10000), ("tpu_v5p", "fp8", "fp8", 459),
    ("tpu7x", "fp8", "fp8", 4614), ("tpu_v5e", "fp8", "bf16", 197),
])
def test_pitfalls_from_hw_specs(name, prec, runs_as, tflops):
    p = get_profile(name)
    assert p.resolve(prec) == runs_as
    assert p.peak_flops(prec) == pytest.approx(tflops * 1e12)


def test_gaudi3_fp8_equals_bf16_and_b300_int8_is_declared_slow():
    g = get_profile("gaudi3")
    assert g.peak_flops("fp8") == g.peak_flops("bf16")
    b = get_profile("b300")
    assert b.peak_flops("int8") < b.peak_flops("bf16") and b.peaks.int8.slower_than_fallback
    assert "peaks.int8" in b.uncertain_keys


def test_get_profile_unknown_lists_names():
    with pytest.raises(ConfigError) as ei:
        get_profile("h9000")
    assert "h9000" in str(ei.value) and "'h100_sxm'" in str(ei.value)


# ----------------------------------------------------------------------------------- broken profiles
def _h100() -> dict:
    return yaml.safe_load((shipped_dir() / "h100_sxm.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "my_chip") -> Path:
    data = copy.deepcopy(data)
    data["name"] = name
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _err(tmp_path, data) -> str:
    f = _write(tmp_path, data)
    with pytest.raises(ProfileError) as ei:
        load_profile_file(f)
    msg = str(ei.value)
    assert str(f) in msg  # names the file
    return msg


def test_user_profile_dir_adds_a_profile(tmp_path):
    _write(tmp_path, _h100(), "my_chip")
    profs = load_profiles([tmp_path])
    assert "my_chip" in profs and "h100_sxm" in profs
    assert get_profile("my_chip", [tmp_path]).peak_flops("fp8") == pytest.approx(1979e12)


def test_unknown_key(tmp_path):
    d = _h100()
    d["peaks"]["fp8"]["speed"] = 3
    msg = _err(tmp_path, d)
    assert "peaks.fp8.speed: unknown key" in msg and all(k in msg for k in ("value", "vendor_sparse", "provenance"))


def test_unknown_top_level_key(tmp_path):
    d = _h100()
    d["colour"] = "green"
    assert "colour: unknown key; allowed keys here: name, display_name" in _err(tmp_path, d)


def test_missing_key(tmp_path):
    d = _h100()
    del d["memory"]["bandwidth"]
    assert "memory.bandwidth: missing required key" in _err(tmp_path, d)


def test_wrong_unit(tmp_path):
    d = _h100()
    d["peaks"]["bf16"]["unit"] = "GFLOP/s"
    msg = _err(tmp_path, d)
    assert "peaks.bf16.unit: 'GFLOP/s' is not allowed" in msg and "'TFLOP/s'" in msg


def test_integer_precision_needs_tops(tmp_path):
    d = _h100()
    d["peaks"]["int8"]["unit"] = "TFLOP/s"
    assert "peaks.int8.unit: 'TFLOP/s' is not allowed for int8; expected 'TOP/s'" in _err(tmp_path, d)


def test_negative_value(tmp_path):
    d = _h100()
    d["tdp"]["value"] = -700
    assert "tdp.value: -700 is not allowed; expected a number > 0" in _err(tmp_path, d)


def test_bandwidth_off_by_1000x(tmp_path):
    d = _h100()
    d["memory"]["bandwidth"]["value"] = 3350  # GB/s figure written with a TB/s unit
    msg = _err(tmp_path, d)
    assert "memory.bandwidth.value" in msg and "plausible range" in msg


def test_bandwidth_too_low_for_the_compute(tmp_path):
    d = _h100()
    d["memory"]["bandwidth"] = {**d["memory"]["bandwidth"], "value": 0.0335, "unit": "TB/s"}  # 100x too low
    msg = _err(tmp_path, d)
    assert "memory.bandwidth.value" in msg and "ridge point" in msg


def test_fp8_slower_than_bf16_needs_a_declaration(tmp_path):
    d = _h100()
    d["peaks"]["fp8"] = {k: v for k, v in d["peaks"]["fp8"].items() if not k.startswith("vendor_")}
    d["peaks"]["fp8"]["value"] = 500
    msg = _err(tmp_path, d)
    assert "peaks.fp8.value: 500" in msg and "slower than bf16" in msg and "slower_than_fallback: true" in msg
    d["peaks"]["fp8"]["slower_than_fallback"] = True
    assert load_profile_file(_write(tmp_path, d)).peak_flops("fp8") == pytest.approx(500e12)


def test_fallback_cycle(tmp_path):
    d = _h100()
    d["peaks"]["fp8"] = {"supported": False, "fallback": "fp4"}
    assert "cycle" in _err(tmp_path, d)


def test_fallback_to_unknown_precision(tmp_path):
    d = _h100()
    d["peaks"]["fp4"]["fallback"] = "fp2"
    assert "peaks.fp4.fallback: 'fp2' is not allowed" in _err(tmp_path, d)


def test_name_must_match_file(tmp_path):
    d = _h100()
    f = tmp_path / "other.yaml"
    d["name"] = "my_chip"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(ProfileError, match="must equal the file name stem 'other'"):
        load_profile_file(f)


def test_bad_yaml_and_duplicate_names(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profiles([tmp_path])
    (tmp_path / "bad.yaml").unlink()
    _write(tmp_path, _h100(), "h100_sxm")
    with pytest.raises(ProfileError, match="already defined"):
        load_profiles([tmp_path])


def test_several_problems_in_one_error(tmp_path):
    d = _h100()
    d["peaks"]["bf16"]["unit"] = "GFLOP/s"
    d["tdp"]["value"] = 0
    msg = _err(tmp_path, d)
    assert "peaks.bf16.unit" in msg and "tdp.value" in msg


# ------------------------------------------------------------------------------ sourcing and the sparse rule
COMMON = ["a100_sxm", "h100_sxm", "h200", "b200", "l4", "mi300x", "tpu_v5e", "tpu_v5p", "tpu_v6e"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_figure_says_where_it_comes_from(name):
    p = get_profile(name)
    figs = p.figures()
    assert len(figs) >= 12
    for key, q in figs:
        assert q.provenance, (name, key)
        if q.provenance in ("vendor", "vendor_copy"):
            assert getattr(q, "page", ""), (name, key)  # vendor figures name the page or table
        if q.provenance in ("derived", "assumption", "third_party", "transferred"):
            assert q.note or key.endswith("latency") or q.provenance == "third_party", (name, key)
    for prec in PRECISIONS:
        e = getattr(p.peaks, prec)
        if isinstance(e, Peak) and e.vendor_sparse:
            assert e.value == pytest.approx(e.vendor_value / 2, rel=0.01)


@pytest.mark.parametrize("name", COMMON)
def test_common_accelerators_have_dated_prices(name):
    pr = get_profile(name).price_per_hour
    assert pr is not None and pr.value > 0 and pr.as_of and pr.offer and pr.source.startswith("https://")


def test_sparse_figure_stored_as_dense_is_caught(tmp_path):
    d = _h100()
    d["peaks"]["fp8"]["value"] = d["peaks"]["fp8"]["vendor_value"]  # 3958 written as the dense figure
    msg = _err(tmp_path, d)
    assert "peaks.fp8" in msg and "sparse figure stored as dense" in msg
    d = _h100()  # without the vendor figure, the 2x rule still catches it (fp8 = 4x bf16)
    d["peaks"]["fp8"] = {k: v for k, v in d["peaks"]["fp8"].items() if not k.startswith("vendor_")}
    d["peaks"]["fp8"]["value"] = 3958
    msg = _err(tmp_path, d)
    assert "peaks.fp8.value" in msg and "looks like a sparse figure stored as dense" in msg
    d["peaks"]["fp8"]["faster_than_2x"] = True  # a declared exception loads
    assert load_profile_file(_write(tmp_path, d)).peak_flops("fp8") == pytest.approx(3958e12)


def test_old_dense_key_gets_a_migration_message(tmp_path):
    d = _h100()
    d["peaks"]["bf16"]["dense"] = False
    msg = _err(tmp_path, d)
    assert "peaks.bf16: dense: this key was renamed" in msg and "vendor_sparse" in msg


def test_vendor_figures_need_a_page(tmp_path):
    d = _h100()
    d["peaks"]["bf16"].pop("page")
    assert "page: required with provenance 'vendor_copy'" in _err(tmp_path, d)


def test_fixed_figures():
    g = get_profile("gaudi3")  # fp32 no longer at the BF16 matrix rate
    assert g.peak_flops("fp32") < g.peak_flops("bf16") / 50 and g.peaks.fp32.uncertain
    assert g.resolve("tf32") == "fp32"
    r = get_profile("rtx5090")  # INT8 is not halved by FP32 accumulation: 2x the FP8 (FP32-acc) rate
    assert r.peak_flops("int8") == pytest.approx(2 * r.peak_flops("fp8"))
    for tpu in ("tpu_v5e", "tpu_v5p", "tpu_v6e", "tpu7x"):  # no VPU figure: vector work is memory-bound
        assert get_profile(tpu).vector_flops is None


def test_vector_work_never_runs_at_the_matrix_rate():
    import torch.nn as tnn

    from dpquant_sim.cost.flops import step_ops
    from dpquant_sim.cost.model import op_time
    from dpquant_sim.nn.shapes import trace_layers

    shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 64), tnn.ReLU(), tnn.Linear(64, 10)), (64,))
    p = get_profile("tpu_v5e")
    for o in step_ops(shapes, None, batch=32):
        if o.kind == "vector" and o.theo:
            assert op_time(o, p, "theoretical") == pytest.approx(o.bytes / p.bandwidth)


def test_h100_kernel_fit_is_the_h200_fit():
    h100, h200 = get_profile("h100_sxm"), get_profile("h200")
    assert h100.kernel.efficiency == {k: v.model_copy(update={"provenance": "transferred", "note": v.note})
                                      for k, v in h100.kernel.efficiency.items()}
    for prec in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4"):
        assert h100.gemm_efficiency(prec) == h200.gemm_efficiency(prec)
    assert h100.kernel_constants == h200.kernel_constants
    assert h100.error_band[:2] == h200.error_band[:2] and h100.error_band[2] == "transferred"
    assert h200.error_band[2] == "measured"


def test_precision_fallbacks_in_the_cost_output():
    import torch.nn as tnn

    from dpquant_sim.cost.model import estimate
    from dpquant_sim.nn.shapes import trace_layers

    shapes = trace_layers(tnn.Sequential(tnn.Linear(64, 64), tnn.ReLU(), tnn.Linear(64, 10)), (64,))
    plan = {"0": "fp4", "2": "fp8"}
    assert estimate(shapes, plan, get_profile("h100_sxm"), batch=8).summary()["fallbacks"] == {"fp4": "fp8"}
    assert estimate(shapes, plan, get_profile("a100_sxm"), batch=8).summary()["fallbacks"] == {"fp4": "bf16",
                                                                                               "fp8": "bf16"}
    assert estimate(shapes, plan, get_profile("b200"), batch=8).summary()["fallbacks"] == {}
