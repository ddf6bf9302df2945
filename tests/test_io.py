"""Atomic writes: a result file is complete or absent, never half-written; write failures are one line;
what a killed writer leaves is recognisable and cleaned."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dpquant_sim.errors import ConfigError, OutputError
from dpquant_sim.io import (atomic_write, atomic_write_df, atomic_write_json, atomic_write_text, clean_stale_temps,
                            is_temp_file, make_output_dir)


def test_failed_writer_leaves_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "result.txt"
    atomic_write_text(target, "finished")

    def broken(p):
        p.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "finished"
    assert sorted(os.listdir(tmp_path)) == ["result.txt"]


def test_mode_follows_umask_and_formats_roundtrip(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    for name in ("t.csv", "t.parquet"):
        atomic_write_df(tmp_path / name, df)
        back = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        pd.testing.assert_frame_equal(back, df)


def test_mode_without_touching_the_umask(tmp_path, monkeypatch):
    """os.umask is process-wide: reading it by setting it races with other threads. atomic_write never calls
    it; the kernel applies the umask to the temporary file as it would for open()."""
    old = os.umask(0o027)
    try:
        def no_umask(*a):
            raise AssertionError("atomic_write changed the process umask")

        monkeypatch.setattr(os, "umask", no_umask)
        p = atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_failure_is_one_output_error_and_leaves_nothing(tmp_path, err):
    """A full disk (simulated: the writer fails with ENOSPC), a read-only file system or a denied write: the
    target keeps its previous content, no temporary is left, the error names the target and the reason."""
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "epoch\n0\n")

    def failing(p):
        p.write_text("epoch\n0\n1")
        raise OSError(err, os.strerror(err))

    with pytest.raises(OutputError) as e:
        atomic_write(target, failing)
    assert isinstance(e.value, OSError) and e.value.errno == err
    assert str(e.value).startswith(f"cannot write {str(target)!r}: {os.strerror(err)}")
    assert "\n" not in str(e.value)
    assert target.read_text() == "epoch\n0\n" and sorted(os.listdir(tmp_path)) == ["metrics.csv"]


def test_target_under_a_file_or_a_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="'.*afile' is a file, not a folder"):
        atomic_write_text(tmp_path / "afile" / "sub" / "r.txt", "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="it is a folder"):
        atomic_write_text(tmp_path / "d", "x")
    assert sorted(os.listdir(tmp_path)) == ["afile", "d"] and not os.listdir(tmp_path / "d")


def test_stale_temporaries_are_recognised_and_cleaned(tmp_path):
    """What a SIGKILLed writer leaves: hidden, never a result's name, removed by clean_stale_temps."""
    dead = _dead_pid()
    stale = [f".metrics.csv.{dead}-0a1b2c3d.tmp", ".summary.json.k2_x9abc.tmp"]  # new and old (mkstemp) forms
    live = f".checkpoint.pt.{os.getpid()}-00ff00ff.tmp"
    keep = ["metrics.csv", ".lock", "notes.tmp", ".x.tmp"]
    for n in stale + [live] + keep:
        (tmp_path / n).write_text("x")
    assert all(is_temp_file(n) for n in stale + [live]) and not any(is_temp_file(n) for n in keep)
    # not owned: only temporaries whose writer is dead (the old form carries no pid, so it stays)
    assert {p.name for p in clean_stale_temps(tmp_path, owned=False)} == {stale[0]}
    # owned (the caller holds the folder's lock): every temporary is stale
    assert {p.name for p in clean_stale_temps(tmp_path)} == {stale[1], live}
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_a_sigkilled_writer_leaves_only_a_hidden_temporary(tmp_path):
    """Reproduces the leftover: SIGKILL during atomic_write leaves '.<name>.<pid>-<hex>.tmp' and no target."""
    code = ("import sys, time; from dpquant_sim.io import atomic_write\n"
            "def w(p):\n    p.write_text('half'); print('writing', flush=True); time.sleep(60)\n"
            f"atomic_write({str(tmp_path / 'metrics.csv')!r}, w)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    left = os.listdir(tmp_path)
    assert len(left) == 1 and is_temp_file(left[0]) and left[0].startswith(".metrics.csv.")
    assert [p.name for p in clean_stale_temps(tmp_path, owned=False)] == left and not os.listdir(tmp_path)


def test_make_output_dir(tmp_path, monkeypatch):
    assert make_output_dir(tmp_path / "a" / "b") is True and (tmp_path / "a" / "b").is_dir()
    assert make_output_dir(tmp_path / "a" / "b") is False
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"out='.*f' is not allowed; expected a folder \(it is a file\)"):
        make_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"expected a folder path \('.*f' is a file, not a folder\)"):
        make_output_dir(tmp_path / "f" / "g" / "h")
    # read-only: simulated, since root may write anywhere
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="expected a folder this user can write"):
        make_output_dir(tmp_path / "a")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_make_output_dir_read_only_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="expected a folder that can be created"):
        make_output_dir(ro / "x")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_writer_counts_as_dead(tmp_path):
    """A killed writer nobody reaps (its parent died too) is a zombie: its temporaries are stale."""
    import subprocess

    from dpquant_sim.io import _pid_alive, clean_stale_temps

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline:  # exited but not reaped: a zombie
        if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    try:
        assert not _pid_alive(child.pid)
        stale = tmp_path / f".metrics.csv.{child.pid}-abcd1234.tmp"
        stale.write_text("half")
        assert clean_stale_temps(tmp_path, owned=False) == [stale]
        assert _pid_alive(os.getpid())
    finally:
        child.wait()
