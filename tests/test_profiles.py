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
    assert "peaks.fp8.speed: unknown key" in msg and "value, unit, vendor_value, vendor_sparse, source, provenance" in msg


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
