"""`dpquant-sim hw ...` / `dpquant-sim cost ...` and cost_run on a fabricated run directory."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from dpquant_sim.cli import main
from dpquant_sim.cost.model import step_cost
from dpquant_sim.cost.profiles import get_profile
from dpquant_sim.cost.run import build_shapes, cost_run, estimator_forward_s
from dpquant_sim.plan import EpochPlan


def _cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_hw_list_show_validate(capsys, tmp_path):
    code, out, _ = _cli(capsys, "hw", "list")
    assert code == 0 and "h100_sxm" in out and "tpu7x" in out and "-> bf16" in out
    code, out, _ = _cli(capsys, "hw", "show", "a100_sxm")
    assert code == 0 and "fallback" in out and "https://" in out
    code, out, _ = _cli(capsys, "hw", "show", "b300", "--json")
    assert code == 0 and json.loads(out)["peaks"]["int8"]["slower_than_fallback"] is True
    assert "-> fp8" in _cli(capsys, "hw", "list")[1]  # precision fallbacks are shown (H100 fp4 runs as fp8)
    code, _, err = _cli(capsys, "hw", "show", "nope")
    assert code == 2 and "hw='nope'" in err
    bad = tmp_path / "bad_chip.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad_chip"}))
    code, _, err = _cli(capsys, "hw", "validate", str(tmp_path))
    assert code == 2 and str(bad) in err and "missing required key" in err


def test_cost_json_static_all(capsys):
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "1x8x8", "--batch-size", "64", "--accelerators",
                        "h100_sxm,a100_sxm", "--schedule", "static-all", "--recipe", "fp8", "--json")
    assert code == 0
    res = json.loads(out)
    assert [r["hw"] for r in res["results"]] == ["h100_sxm", "a100_sxm"]
    assert all(r["quantized_flop_share"] == 1.0 for r in res["results"])
    h100, a100 = res["results"]
    assert h100["speedup_vs_bf16_theoretical"] > 1.0
    assert a100["speedup_vs_bf16_theoretical"] == pytest.approx(1.0)  # A100 fp8 runs as bf16


def test_cost_table_budget_and_all(capsys):
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "1x8x8", "--accelerators", "all", "--schedule",
                        "static-subset", "--budget", "0.5")
    assert code == 0 and "tpu_v5e" in out and "jetson_agx_orin" in out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "mlp", "--input", "1xAx8"], "--input='1xAx8'"),
    (["--model", "mlp", "--input", "1x8x8", "--accelerators", "h900"], "--accelerators='h900'"),
    (["--model", "mlp", "--input", "1x8x8", "--schedule", "dpquant"], "--run RUN_DIR"),
    (["--model", "mlp", "--input", "1x8x8", "--recipe", "fp3"], "--recipe='fp3'"),
    (["--model", "mlp", "--input", "1x8x8", "--budget", "2"], "--budget=2.0"),
    (["--model", "mlp", "--input", "1x8x8", "--base", "fp8"], "--base='fp8'"),
    (["--model", "mlp"], "--model/--input"),
])
def test_cost_bad_flags_one_error(capsys, argv, needle):
    code, out, err = _cli(capsys, "cost", *argv)
    assert code == 2 and needle in err and "Traceback" not in err


def _fake_run(tmp_path, kind="dpquant"):
    shapes = build_shapes("mlp", (1, 8, 8), 10)
    layers = [s.name for s in shapes if s.is_gemm]
    plans = [EpochPlan(0, {}), EpochPlan(1, {layers[0]: "fp8"}), EpochPlan(2, {n: "fp4" for n in layers})]
    info = {"model": "mlp", "dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10, "n_train": 1000,
            "batch_size": 100, "sample_rate": 0.1, "steps_per_epoch": 10, "quantizable_layers": layers}
    (tmp_path / "run_info.json").write_text(json.dumps(info))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"model": "mlp", "private": True, "optimizer": "sgd", "momentum": 0.9,
         "schedule": {"kind": kind, "interval": 2, "sample_rate": 0.05}}))
    pd.DataFrame({"epoch": [0, 1, 2], "plan": [p.to_json() for p in plans], "steps": [10, 20, 30]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    return shapes, plans, layers


def test_cost_run_matches_scalar_model(tmp_path):
    shapes, plans, layers = _fake_run(tmp_path)
    df = cost_run(tmp_path, ["h100_sxm", "gaudi3"])
    assert len(df) == 6 and list(df["epoch"].unique()) == [0, 1, 2]
    h100 = get_profile("h100_sxm")
    # estimator: every 2 epochs, (L + 1) forwards over 0.05 * 1000 = 50 examples
    t_f, r_f = estimator_forward_s(shapes, h100, 50.0)
    est = (len(layers) + 1) * t_f / 2
    for e, plan in enumerate(plans):
        row = df[(df["epoch"] == e) & (df["hw"] == "h100_sxm")].iloc[0]
        sc = step_cost(shapes, plan, h100, batch=100.0, optimizer="momentum", clipping="hooks")  # an older run
        assert row["time_theoretical_s"] == pytest.approx(10 * sc.theoretical_s + est, rel=1e-9)
        assert row["throughput_theoretical"] == pytest.approx(1000 / row["time_theoretical_s"])
        assert row["energy_j"] == pytest.approx(row["time_roofline_s"] * 700)
        assert row["quantized_flop_share"] == pytest.approx(sc.quantized_flop_share)
    fp32_epoch = 10 * step_cost(shapes, None, h100, batch=100.0, base="fp32", optimizer="momentum",
                                clipping="hooks").theoretical_s
    r0 = df[(df["epoch"] == 0) & (df["hw"] == "h100_sxm")].iloc[0]
    assert r0["speedup_vs_fp32_theoretical"] == pytest.approx(fp32_epoch / r0["time_theoretical_s"], rel=1e-9)


def test_cost_cli_run(capsys, tmp_path):
    _fake_run(tmp_path, kind="random")
    code, out, _ = _cli(capsys, "cost", "--run", str(tmp_path), "--accelerators", "b200", "--json")
    assert code == 0
    res = json.loads(out)  # the same shape as `cost --json`: plan(s) and results
    rows = res["results"]
    assert len(rows) == 3 and rows[0]["estimator_theoretical_s"] == 0.0
    assert len(res["plans"]) == 3 and res["plans"][2]["quantized"]
    code, _, err = _cli(capsys, "cost", "--run", str(tmp_path / "missing"))
    assert code == 2 and "run=" in err


# ------------------------------------------------------------------------------------- start-up import graph
_PROBE = """
import sys
from dpquant_sim.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
print("LOADED", *sorted(m for m in ("torch", "opacus", "pandas", "scipy", "plotly") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["hw", "list"], ["hw", "show", "h200"], ["cost", "--help"],
                                  ["hw", "validate", "hw_profiles"]])
def test_startup_commands_do_not_import_torch(argv):
    """`dpquant-sim --help` and `hw list` read profiles and print help without torch or opacus (seconds of
    start-up): checked on the import graph in a fresh interpreter, not with a timer."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = r.stdout.strip().splitlines()[-1].split()[1:]
    assert "torch" not in loaded and "opacus" not in loaded, loaded


def test_train_help_still_lists_the_registries(capsys):
    from dpquant_sim.nn.config import RECIPES

    code, out, _ = _cli(capsys, "train", "--help")
    assert code == 0 and "{recipes}" not in out and "{kinds}" not in out
    assert all(r in out.replace("\n", " ").replace("│", " ") for r in list(RECIPES)[:3])


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet18", "--input", "3x32"], "--input=(3, 32) is not allowed; expected CxHxW with H == W"),
    (["--model", "cnn", "--input", "64"], "--input=(64,) is not allowed"),
    (["--model", "resnet18", "--input", "3x32x16"], "H == W"),
    (["--model", "nope", "--input", "3x32x32"], "model='nope'"),
    (["--model", "mlp", "--input", "64", "--devices", "2", "--accelerators", "jetson_agx_orin"],
     "at most 1 on jetson_agx_orin"),
    (["--model", "mlp", "--input", "64", "--devices", "0"], "--devices='0'"),
    (["--model", "mlp", "--input", "64", "--allreduce", "star"], "--allreduce='star'"),
])
def test_cost_shape_and_device_errors_are_one_line(capsys, argv, needle):
    code, out, err = _cli(capsys, "cost", *argv)
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cost_mlp_with_a_feature_count_works_as_advertised(capsys):
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "64", "--accelerators", "h100_sxm", "--json")
    assert code == 0
    res = json.loads(out)["results"][0]
    # the engine's default clipping (mixed; T = 1 everywhere: ghost norms) runs fwd, dgrad (the first layer's
    # too) and one weighted wgrad per layer
    assert res["clipping"] == "mixed"
    assert res["gemm_flops"] == pytest.approx(2 * 256 * (64 * 256 + 256 * 128 + 128 * 10) * 3)
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "64", "--accelerators", "h100_sxm", "--json",
                        "--clipping", "hooks")
    res = json.loads(out)["results"][0]  # Opacus hooks: no first-layer dgrad; per-sample outer products no GEMM
    assert res["clipping"] == "hooks"
    assert res["gemm_flops"] == pytest.approx(2 * 256 * (64 * 256 + 256 * 128 + 128 * 10) * 3 - 2 * 256 * 64 * 256)


def test_cost_devices_table_has_bands_fallbacks_and_dollars(capsys):
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "64", "--accelerators", "h100_sxm,a100_sxm,jetson_agx_orin",
                        "--devices", "1,8", "--recipe", "fp4", "--clipping", "hooks", "--json")
    assert code == 0
    res = json.loads(out)
    rows = {(r["hw"], r["devices"]): r for r in res["results"]}
    assert set(rows) == {("h100_sxm", 1), ("h100_sxm", 8), ("a100_sxm", 1), ("a100_sxm", 8), ("jetson_agx_orin", 1)}
    assert res["skipped"] == ["jetson_agx_orin x8"]
    h = rows[("h100_sxm", 8)]
    assert h["fallbacks"] == {"fp4": "fp8"} and h["dollars"] > 0 and h["allreduce_s"] > 0
    assert h["roofline_low_s"] < h["roofline_s"] < h["roofline_high_s"] and h["band_basis"] == "transferred"
    assert rows[("a100_sxm", 1)]["fallbacks"] == {"fp4": "bf16"}
    code, out, _ = _cli(capsys, "cost", "--model", "mlp", "--input", "64", "--accelerators", "h100_sxm", "--devices", "1,8",
                        "--recipe", "fp8")
    assert code == 0 and "roof band" in out and "runs as" in out and "fp4" not in out  # fp8 runs natively


def test_sweep_device_axis_collect_and_report_notes(tmp_path):
    from dpquant_sim.analysis.report import accelerator_notes
    from dpquant_sim.errors import ConfigError
    from dpquant_sim.sweep.collect import run_table
    from dpquant_sim.sweep.config import SweepConfig

    assert SweepConfig.model_validate({"devices": [1, 8, 8]}).devices == [1, 8]
    with pytest.raises(ConfigError, match="devices"):
        SweepConfig.from_dict({"devices": [0]})
    _fake_run(tmp_path, kind="random")
    t = run_table(tmp_path, [get_profile("h100_sxm"), get_profile("jetson_agx_orin")], devices=(1, 8))
    # 3 epochs x (h100 x1, h100 x8, jetson x1): jetson has no interconnect, so no x8 row
    assert sorted(t["accelerator"].unique()) == ["h100_sxm", "h100_sxm x8", "jetson_agx_orin"]
    assert len(t) == 9 and set(t["devices"]) == {1, 8}
    notes = accelerator_notes(t).set_index("accelerator")
    assert notes.loc["h100_sxm", "runs as"] == "fp4->fp8" and notes.loc["h100_sxm", "band from"] == "transferred"
    assert notes.loc["jetson_agx_orin", "runs as"] == "fp4->fp16, fp8->fp16"
    assert notes.loc["jetson_agx_orin", "band from"] == "generic"
