"""A run folder is never lost, overwritten or mislabelled: one writer at a time, a resume only continues the
run its files describe, a damaged checkpoint or a full disk is one error line (exit 2) with the finished epochs
kept, Ctrl-C exits 130 saying how to resume, and a killed writer's temporaries are cleaned on resume."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from dpquant_sim.cli import main
from dpquant_sim.errors import ConfigError, OutputError, RunFolderError
from dpquant_sim.io import is_temp_file
from dpquant_sim.training.engine import RESULT_NEUTRAL_FIELDS, load_checkpoint, train

TINY = dict(dataset="digits", model="mlp", n_train=200, n_test=100, batch_size=50, epochs=2, lr=0.5,
            noise_multiplier=1.0)


def one_line_error(argv, capsys, code=2) -> str:
    """Run the CLI; assert it exits with ``code`` printing exactly one line on stderr, and return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A run of TINY stopped after 1 of 2 epochs (copy it before changing it)."""
    d = tmp_path_factory.mktemp("partial") / "run"
    train(TINY, d, progress=False, stop_after=1)
    return d


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(TINY, tmp_path_factory.mktemp("full") / "run", progress=False)


def copy_of(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def same_run(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns="wall_s").reset_index(drop=True),
                                  b.drop(columns="wall_s").reset_index(drop=True), check_exact=True)


# ------------------------------------------------------------------------------------------ resume checks
def test_hand_edited_config_is_refused_naming_the_field(partial, tmp_path, capsys):
    """Reproducer: edit lr in a partial run's config.yaml and rerun with the edited value. It used to resume,
    train at the checkpoint's lr and label the run with the new one."""
    run = copy_of(partial, tmp_path)
    y = run / "config.yaml"
    label = y.read_text()
    y.write_text(label.replace("lr: 0.5", "lr: 0.1"))
    before = files(run)
    with pytest.raises(RunFolderError, match=r"checkpoint.pt' was written with other settings than requested "
                                             r"\(config.yaml was edited.*\): lr: 0.5 stored, 0.1 requested"):
        train(dict(TINY, lr=0.1), run, progress=False)
    assert files(run) == before
    line = one_line_error(["train", "--config", str(y), "--out", str(run), "--quiet"], capsys)
    assert line.startswith("error: ") and "lr: 0.5 stored, 0.1 requested" in line
    # without config.yaml the checkpoint alone still refuses a different request, listing every field
    y.unlink()
    with pytest.raises(RunFolderError, match=r"epochs: 2 stored, 4 requested; lr: 0.5 stored, 0.1 requested"):
        train(dict(TINY, lr=0.1, epochs=4), run, progress=False)
    # and config.yaml refuses another config before the checkpoint is read
    y.write_text(label)
    with pytest.raises(ConfigError, match=r"another run's config.yaml; lr: 0.5 stored, 0.1 requested"):
        train(dict(TINY, lr=0.1), run, progress=False)


def test_result_neutral_fields_do_not_block_a_resume(partial, uninterrupted, tmp_path):
    assert RESULT_NEUTRAL_FIELDS == ("threads",)
    run = copy_of(partial, tmp_path)
    label = (run / "config.yaml").read_text()
    res = train(dict(TINY, threads=torch_threads()), run, progress=False)
    assert res.summary["epochs_completed"] == 2 and (run / "config.yaml").read_text() == label
    same_run(res.metrics, uninterrupted.metrics)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_auto_estimator_noise_is_resolved_not_a_difference(tmp_path):
    """dpquant fills in its estimator noise (None = auto) and the checkpoint stores the filled-in value."""
    cfg = dict(TINY, recipe="fp8", schedule={"kind": "dpquant", "budget": 0.5, "interval": 1})
    train(cfg, tmp_path / "r", progress=False, stop_after=1)
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config_json"].count('"noise_multiplier":') == 2
    assert train(cfg, tmp_path / "r", progress=False).summary["epochs_completed"] == 2


# ------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_checkpoint_is_one_line(partial, tmp_path, capsys, damage):
    run = copy_of(partial, tmp_path)
    ck = run / "checkpoint.pt"
    raw = ck.read_bytes()
    ck.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "random": os.urandom(4096)}[damage])
    before = files(run)
    line = one_line_error(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--quiet"],
                          capsys)
    assert f"'{ck}' is not a readable checkpoint (" in line and "restore it, or delete it" in line
    assert ("an empty file" in line) == (damage == "empty")
    assert files(run) == before
    with pytest.raises(RunFolderError):
        load_checkpoint(ck)


def test_stale_temporaries_are_removed_when_a_run_resumes(partial, uninterrupted, tmp_path):
    """What SIGKILL during a write leaves (see tests/test_io.py for the real kill) is gone after the resume."""
    run = copy_of(partial, tmp_path)
    for n in (".metrics.csv.999999-0a1b2c3d.tmp", ".checkpoint.pt.abcd_123.tmp"):
        (run / n).write_bytes(b"half")
    res = train(TINY, run, progress=False)
    assert not [p for p in os.listdir(run) if is_temp_file(p)]
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.yaml", "metrics.csv", "plans.jsonl", "run_info.json",
                                       "summary.json"]
    same_run(res.metrics, uninterrupted.metrics)


def test_full_disk_mid_run_keeps_finished_epochs_and_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    """ENOSPC (simulated: the CSV writer fails) while writing epoch 2's metrics: one line, exit 2, epoch 1 kept
    whole, no temporary, and a rerun completes exactly as an uninterrupted run."""
    run = tmp_path / "run"
    real = pd.DataFrame.to_csv

    def to_csv(self, path, *a, **k):
        if len(self) == 2 and str(path).startswith(str(run / ".metrics.csv.")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    with pytest.raises(OutputError) as e:
        train(TINY, run, progress=False)
    assert e.value.errno == errno.ENOSPC and str(e.value).startswith(f"cannot write '{run / 'metrics.csv'}': No space")
    assert len(pd.read_csv(run / "metrics.csv")) == 1 and load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    # plans.jsonl (written first) is one epoch ahead of metrics.csv until the resume realigns both
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.yaml", "metrics.csv", "plans.jsonl", "run_info.json"]
    monkeypatch.undo()
    same_run(train(TINY, run, progress=False).metrics, uninterrupted.metrics)
    assert (run / "plans.jsonl").read_bytes() == (uninterrupted.out_dir / "plans.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------ one writer
HOLD = textwrap.dedent(
    """
    import sys, time
    from dpquant_sim.locking import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def test_a_second_writer_is_refused_with_the_holders_pid(partial, tmp_path, capsys):
    run = copy_of(partial, tmp_path)
    before = files(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"run folder '{run}' is in use by process {holder.pid} "):
            train(TINY, run, progress=False)
        line = one_line_error(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--quiet"],
                              capsys)
        assert f"in use by process {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert {k: v for k, v in files(run).items() if k != ".lock"} == before
    assert train(TINY, run, progress=False).summary["epochs_completed"] == 2  # the dead holder blocks no one
    assert ".lock" not in os.listdir(run)


# ------------------------------------------------------------------------------------------ CLI outputs
def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    cmd = ["train", "--epochs", "1", "--model", "mlp", "--quiet"]
    line = one_line_error([*cmd, "--out", str(f)], capsys)
    assert line == f"error: --out='{f}' is not allowed; expected a folder (it is a file)"
    line = one_line_error([*cmd, "--out", str(f / "run")], capsys)
    assert line == f"error: --out='{f / 'run'}' is not allowed; expected a folder path ('{f}' is a file, not a folder)"
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {dataset: digits, model: mlp, epochs: 1}\naccelerators: [b200]\n")
    assert "expected a folder (it is a file)" in one_line_error(["sweep", str(sweep), "--out", str(f)], capsys)
    assert sorted(os.listdir(tmp_path)) == ["afile", "s.yaml"]  # nothing was created


def test_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    """Simulated (root may write anywhere): the folder is not writable."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(tmp_path)) else real(p, m))
    line = one_line_error(["train", "--epochs", "1", "--model", "mlp", "--quiet", "--out", str(tmp_path / "r")],
                          capsys)
    assert "expected a folder this user can write (it is read-only)" in line
    assert not (tmp_path / "r").exists()


def test_output_error_is_one_line(tmp_path, capsys, monkeypatch):
    import dpquant_sim.training.engine as engine

    def full_disk(*a, **k):
        raise OutputError(tmp_path / "r" / "metrics.csv", "No space left on device (nothing was half-written; any "
                          "previous version is kept)", errno.ENOSPC)

    monkeypatch.setattr(engine, "train", full_disk)
    line = one_line_error(["train", "--epochs", "1", "--model", "mlp", "--quiet", "--out", str(tmp_path / "r")],
                          capsys)
    assert line == f"error: cannot write '{tmp_path / 'r' / 'metrics.csv'}': No space left on device (nothing was " \
                   "half-written; any previous version is kept)"


def test_ctrl_c_exits_130_saying_how_to_resume(tmp_path, capsys, monkeypatch):
    import dpquant_sim.training.engine as engine

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    line = one_line_error(["train", "--epochs", "1", "--model", "mlp", "--quiet", "--out", str(tmp_path / "r")],
                          capsys, code=130)
    assert "interrupted" in line and "rerun the same command to resume" in line


@pytest.mark.slow
def test_real_ctrl_c_of_train(tmp_path):
    """SIGINT to the process group, as a terminal sends it: exit 130, one line, the run resumes."""
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpquant_sim", "train", "--model", "mlp", "--epochs", "200", "--n-train", "200",
         "--batch-size", "50", "--quiet", "--out", str(out)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").is_file():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert proc.returncode == 130 and lines == [
        "interrupted; finished epochs and points are kept: rerun the same command to resume"], err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1 and not (out / ".lock").exists()


def test_a_finished_run_is_returned_from_a_read_only_folder(tmp_path, monkeypatch):
    """Reading a finished run takes no lock, so it works where the folder cannot be written."""
    from dpquant_sim import locking
    from dpquant_sim.training.engine import train

    cfg = dict(dataset="digits", model="mlp", n_train=64, n_test=32, batch_size=32, epochs=1, noise_multiplier=1.0)
    first = train(cfg, tmp_path / "r", progress=False)

    def no_lock(*a, **kw):
        raise AssertionError("a finished run must not take the lock")

    monkeypatch.setattr(locking, "folder_lock", no_lock)
    import dpquant_sim.training.engine as eng

    monkeypatch.setattr(eng, "folder_lock", no_lock)
    assert train(cfg, tmp_path / "r", progress=False).summary == first.summary
