"""Machine-readable output and logs: plans.jsonl beside metrics.csv, --json documents, progress lines on
stderr off a terminal, TensorBoard event files, and tables at 80 columns."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pandas as pd
import pytest
import yaml

from dpquant_sim.plan import EpochPlan, read_metrics, read_plans
from dpquant_sim.training.engine import train
from tests.test_cost_cli import _cli

TINY = dict(dataset="digits", model="mlp", n_train=200, n_test=100, batch_size=50, epochs=2, lr=0.5,
            schedule={"kind": "random", "budget": 0.5}, recipe="fp8", noise_multiplier=1.0)
LINE = re.compile(r"^epoch (\d+)/(\d+) acc=(\d\.\d{3}) eps=(\S+) quantized=(\d+)/(\d+) (\d+\.\d)s$")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- plans.jsonl

def test_plans_go_to_jsonl_not_into_the_csv(tmp_path):
    res = train(TINY, tmp_path, progress=False)
    text = (tmp_path / "metrics.csv").read_text()
    assert "{" not in text and "plan" not in text.splitlines()[0].split(",")
    m = pd.read_csv(tmp_path / "metrics.csv")
    lines = (tmp_path / "plans.jsonl").read_text().splitlines()
    assert len(lines) == len(m) == 2
    for e, line in enumerate(lines):
        d = json.loads(line)  # one self-contained JSON object per line
        assert d["epoch"] == e and set(d) >= {"quantized", "probs", "info", "quantized_flop_share"}
        assert len(d["quantized"]) == m["quantized_layers"].iloc[e]  # the plain column agrees with the plan
        assert d["quantized_flop_share"] == pytest.approx(m["quantized_flop_share"].iloc[e])
    assert [p.to_json() for p in read_plans(tmp_path)] == list(res.metrics["plan"])
    assert list(read_metrics(tmp_path)["plan"]) == list(res.metrics["plan"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plans_sha256"] == _sha(tmp_path / "plans.jsonl")


def test_resume_realigns_plans_with_metrics(tmp_path):
    full = train(TINY, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train(TINY, part, progress=False, stop_after=1)
    assert len((part / "plans.jsonl").read_text().splitlines()) == 1
    # a process killed after writing epoch 1's files but before its checkpoint leaves them one epoch ahead
    with open(part / "plans.jsonl", "a") as f:
        f.write(EpochPlan(1, {"fc1": "fp4"}).to_json() + "\n")
    train(TINY, part, progress=False)
    assert (part / "plans.jsonl").read_bytes() == (tmp_path / "full" / "plans.jsonl").read_bytes()
    assert len(pd.read_csv(part / "metrics.csv")) == len(full.metrics) == 2


def test_collect_refuses_edited_plans(tmp_path):
    from dpquant_sim.errors import RunFolderError
    from dpquant_sim.sweep.collect import check_run_consistent

    train(TINY, tmp_path, progress=False)
    check_run_consistent(tmp_path)
    p = tmp_path / "plans.jsonl"
    p.write_text(p.read_text().replace('"fp8"', '"fp4"'))
    with pytest.raises(RunFolderError, match="plans.jsonl is not the file the run wrote"):
        check_run_consistent(tmp_path)


def test_older_run_folders_still_read(tmp_path):
    """A run written before plans.jsonl: its metrics.csv holds the plan JSON column."""
    plans = [EpochPlan(0, {}), EpochPlan(1, {"fc1": "fp8"})]
    pd.DataFrame({"epoch": [0, 1], "plan": [p.to_json() for p in plans]}).to_csv(tmp_path / "metrics.csv",
                                                                                  index=False)
    assert read_plans(tmp_path) == plans
    assert list(read_metrics(tmp_path)["plan"]) == [p.to_json() for p in plans]


def test_sweep_table_keeps_plans_out_of_csv_and_load_table_joins_them(tmp_path):
    from dpquant_sim.sweep import SweepConfig, load_table, run_sweep

    cfg = SweepConfig.from_dict({"name": "t", "base": {k: v for k, v in TINY.items() if k != "schedule"} | {"epochs": 1},
                                 "grid": {"schedule": [{"kind": "random", "budget": 0.5}]},
                                 "accelerators": ["h100_sxm"], "executor": {"kind": "local", "workers": 1}})
    res = run_sweep(cfg, tmp_path, progress=False)
    pid = res.points[0].id
    assert "plan" not in pd.read_csv(tmp_path / "results.csv").columns
    assert "plan" not in pd.read_parquet(tmp_path / "results.parquet").columns
    lines = [json.loads(x) for x in (tmp_path / "results.plans.jsonl").read_text().splitlines()]
    run_plans = [json.loads(x) for x in (tmp_path / "runs" / pid / "plans.jsonl").read_text().splitlines()]
    assert lines == [{"point_id": pid, **p} for p in run_plans]
    t = load_table(tmp_path)
    assert [json.loads(p) for p in t["plan"]] == run_plans * (len(t) // len(run_plans))


# ---------------------------------------------------------------------------------------------- --json

def test_train_json_is_one_document_and_progress_lines_go_to_stderr(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, stderr = _cli(capsys, "train", "--model", "mlp", "--n-train", "200", "--n-test", "100",
                                "--batch-size", "50", "--epochs", "2", "--schedule", "random", "--budget", "0.5",
                                "--recipe", "fp8", "--noise-multiplier", "1", "--epsilon", "50", "--out", str(out),
                                "--json")
    assert code == 0, stderr
    doc = _strict(stdout)  # the whole of stdout is one JSON document
    assert doc["summary"] == json.loads((out / "summary.json").read_text())
    m = pd.read_csv(out / "metrics.csv")
    assert [r["test_acc"] for r in doc["metrics"]] == m["test_acc"].tolist()
    assert doc["files"]["plans"] == str(out / "plans.jsonl")
    # pytest's capture is not a terminal: one progress line per epoch on stderr, numbers as in metrics.csv
    lines = [ln for ln in stderr.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2, stderr
    for e, ln in enumerate(lines):
        g = LINE.match(ln)
        assert g, ln
        assert (int(g[1]), int(g[2])) == (e + 1, 2) and float(g[3]) == pytest.approx(m["test_acc"].iloc[e], abs=5e-4)
        assert float(g[4]) == pytest.approx(m["epsilon"].iloc[e], abs=5e-3)
        assert int(g[5]) == m["quantized_layers"].iloc[e] and int(g[6]) == 3  # fc1, fc2, head


def test_quiet_prints_no_progress(tmp_path, capsys):
    code, stdout, stderr = _cli(capsys, "train", "--model", "mlp", "--n-train", "200", "--n-test", "100",
                                "--batch-size", "50", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and stderr.strip() == "" and "test_acc=" in stdout


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_non_finite_numbers_are_null(tmp_path, capsys):
    """A non-private run's epsilon is inf: written as null, never as the non-JSON token Infinity."""
    code, stdout, stderr = _cli(capsys, "train", "--model", "mlp", "--n-train", "200", "--n-test", "100",
                                "--batch-size", "50", "--epochs", "1", "--non-private", "--out", str(tmp_path / "r"),
                                "--json", "--quiet")
    assert code == 0, stderr
    doc = _strict(stdout)
    assert doc["summary"]["epsilon"] is None and doc["metrics"][0]["epsilon"] is None
    assert doc["summary"]["train_loss"] == pytest.approx(doc["metrics"][0]["train_loss"])  # released: non-private
    code, stdout, _ = _cli(capsys, "hw", "list", "--json")
    assert any(p["tdp_w"] is None or p["price_per_hour"] is None for p in _strict(stdout)["profiles"])


def test_sweep_json(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "t", "base": {"dataset": "digits", "model": "mlp", "n_train": 120,
                                                           "n_test": 60, "batch_size": 40, "epochs": 1},
                                     "grid": {"schedule": [{"kind": "fp32"}, {"kind": "static-all"}]},
                                     "accelerators": ["h100_sxm"], "executor": {"kind": "local", "workers": 1}}))
    out = tmp_path / "out"
    code, stdout, stderr = _cli(capsys, "sweep", str(sweep), "--out", str(out), "--dry-run", "--json")
    dry = json.loads(stdout)
    assert code == 0 and [p["state"] for p in dry["points"]] == ["todo", "todo"]
    assert dry["accelerators"] == ["h100_sxm"]
    code, stdout, stderr = _cli(capsys, "sweep", str(sweep), "--out", str(out), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert sorted(doc["finished"]) == sorted(p["id"] for p in dry["points"]) and doc["failed"] == {}
    assert doc["table"]["rows"] == len(pd.read_csv(out / "results.csv"))
    # not a terminal: one line per finished point on stderr
    assert len(re.findall(r"^point \d/2 done \d+\.\ds: ", stderr, re.M)) == 2, stderr
    code, stdout, _ = _cli(capsys, "sweep", str(sweep), "--out", str(out), "--json")
    assert json.loads(stdout)["skipped"] and json.loads(stdout)["finished"] == []


def test_hw_list_json_matches_the_profile_files(capsys):
    from pathlib import Path

    code, stdout, _ = _cli(capsys, "hw", "list", "--json")
    assert code == 0
    profs = {p["name"]: p for p in json.loads(stdout)["profiles"]}
    files = sorted((Path(__file__).resolve().parents[1] / "hw_profiles").glob("*.yaml"))
    assert set(profs) == {f.stem for f in files}
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "hw_profiles" / "h100_sxm.yaml").read_text())
    h = profs["h100_sxm"]
    assert h["peak_tflops"]["bf16"] == raw["peaks"]["bf16"]["value"] == 989
    assert h["peak_tflops"]["fp4"] is None and h["runs_as"]["fp4"] != "fp4"  # H100 has no native fp4


# ---------------------------------------------------------------------------------------------- TensorBoard

def test_tensorboard_missing_package_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, stderr = _cli(capsys, "train", "--model", "mlp", "--n-train", "200", "--batch-size", "50", "--epochs",
                           "1", "--quiet", "--out", str(tmp_path / "r"), "--tensorboard")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "pip install 'dpquant-sim[tensorboard]'" in lines[0], stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), purge_orphaned_data=True)
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_scalars_per_epoch_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = dict(TINY, epochs=3)
    train(cfg, tmp_path, progress=False, stop_after=2, tensorboard=True)
    # a process killed after logging epoch 1 but before its checkpoint: put back the checkpoint of epoch 0
    # (the same config's, from a run stopped there); the resume trains and logs epoch 1 again
    import shutil

    train(cfg, tmp_path / "one", progress=False, stop_after=1)
    shutil.copy(tmp_path / "one" / "checkpoint.pt", tmp_path / "checkpoint.pt")
    train(cfg, tmp_path, progress=False, tensorboard=True)
    m = pd.read_csv(tmp_path / "metrics.csv")
    s = _scalars(tmp_path / "tensorboard")
    assert "train/loss" not in s  # a private run's training loss is not released
    for tag, col in (("test/accuracy", "test_acc"), ("test/loss", "test_loss"), ("privacy/epsilon", "epsilon"),
                     ("quantization/flop_share", "quantized_flop_share"), ("quantization/layers", "quantized_layers")):
        assert [st for st, _ in s[tag]] == [0, 1, 2], (tag, s[tag])  # every epoch once, re-logged epoch purged
        assert [v for _, v in s[tag]] == pytest.approx(m[col].tolist(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- 80 columns

def test_demo_table_fits_80_columns(monkeypatch):
    from typer.testing import CliRunner

    from dpquant_sim.cli import _register, app
    from dpquant_sim.cli import demo_cmd

    head = pd.DataFrame({"schedule": ["fp32", "static-all fp4", "random b=0.5 fp4", "dpquant b=0.5 fp4"],
                         "accuracy": ["0.912 +- 0.012", "0.871 +- 0.031", "0.893 +- 0.004", "0.902 +- 0.015"],
                         "epsilon": ["8.00"] * 4, **{a: ["1.00x", "1.87x", "1.41x", "1.52x"]
                                                      for a in demo_cmd.DEMO_ACCELERATORS}})
    monkeypatch.setattr(demo_cmd, "run_demo", lambda out, **kw: (out / "report.html", head))
    _register()
    r = CliRunner().invoke(app, ["demo", "--seeds", "2", "--quiet"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in r.output
    for col in head.columns:
        for v in head[col]:
            assert v in r.output, v
    for a in demo_cmd.DEMO_ACCELERATORS:
        assert re.search(rf"\b{a}\b", r.output), a


@pytest.mark.parametrize("argv", [
    ["hw", "list"],
    ["cost", "--model", "resnet18", "--input", "3x32x32", "--accelerators", "h100_sxm,b200", "--clipping", "hooks,bk"],
])
def test_cost_and_hw_tables_fit_80_columns(argv):
    """Every cell in full at 80 columns: the JSON output's values appear in the text tables."""
    from typer.testing import CliRunner

    from dpquant_sim.cli import _register, app

    _register()
    r = CliRunner().invoke(app, argv, env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    table_lines = [ln for ln in r.output.splitlines() if not ln.startswith(("x fp32", "$/h:", "! ="))]  # prose wraps
    assert max(map(len, table_lines)) <= 80 and "…" not in r.output
    doc = json.loads(CliRunner().invoke(app, [*argv, "--json"]).stdout)
    if argv[0] == "hw":
        for p in doc["profiles"]:
            assert p["name"] in r.output and f"{p['max_devices']}" in r.output
    else:
        for row in doc["results"]:
            assert f"{row['speedup_vs_bf16_theoretical']:.3g}" in r.output, row
