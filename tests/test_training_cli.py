"""`dpquant-sim train`: flags, YAML, and one clear error line per bad value (through the real entry point)."""

from __future__ import annotations

import json

import pytest

from dpquant_sim.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("args,needle", [
    (["--epsilon", "-1"], "error: --epsilon=-1.0 is not allowed; expected a value greater than 0"),
    (["--delta", "1"], "error: --delta=1.0 is not allowed; expected a value less than 1"),
    (["--model", "vgg"], "error: --model='vgg' is not allowed"),
    (["--dataset", "mnist"], "error: --dataset='mnist' is not allowed"),
    (["--recipe", "fp3"], "error: --recipe='fp3' is not allowed; expected one of 'fp8'"),
    (["--epochs", "0"], "error: --epochs=0 is not allowed"),
    (["--batch-size", "5000"], "error: --batch-size=5000 is not allowed; expected at most the training set size 1438"),
    (["--schedule", "fp32", "--budget", "0.5"], "error: --budget=0.5 is not allowed"),
    (["--schedule", "random", "--budget", "1.5"], "error: --budget=1.5 is not allowed"),
    (["--dataset", "cifar10"], "error: --data-dir=None is not allowed"),
    (["--schedule-opt", "novalue"], "KEY=VALUE"),
])
def test_bad_values_one_line(tmp_path, capsys, args, needle):
    code, out, err = run_cli(["--out", str(tmp_path / "r"), "--quiet", *args], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_help_explains_flags(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for flag in ("--epsilon", "--delta", "--recipe", "--schedule", "--budget", "--batch-size", "--out",
                 "--noise-multiplier", "--accountant"):
        assert flag in out


def test_train_from_flags_and_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\nmodel: mlp\nn_train: 120\nn_test: 60\nbatch_size: 40\nepochs: 3\n"
                   "schedule: {kind: random, budget: 0.5}\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--config", str(cfg), "--epochs", "1", "--epsilon", "8", "--recipe", "fp8",
                                 "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "test_acc=" in stdout and "epsilon=" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["epsilon"] <= 8.0
    saved = (out / "config.yaml").read_text()
    assert "epochs: 1" in saved and "kind: random" in saved and "recipe: fp8" in saved
