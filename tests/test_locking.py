"""One writer per folder: a second writer (another process, or the same one) is refused with the holder's pid;
a lock whose holder was SIGKILLed blocks no one; a clean release leaves no lock file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dpquant_sim.errors import ConfigError, RunFolderError
from dpquant_sim.locking import LOCK_NAME, folder_lock, lock_holder

HOLD = textwrap.dedent(
    """
    import sys, time
    from dpquant_sim.locking import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


def _hold(folder):
    """A child process that takes the lock and sleeps; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_gets_the_holders_pid_and_a_dead_holder_blocks_no_one(tmp_path):
    run = tmp_path / "run"
    proc = _hold(run)
    try:
        assert lock_holder(run) == proc.pid
        with pytest.raises(RunFolderError, match=rf"run folder '.*run' is in use by process {proc.pid} "):
            with folder_lock(run):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs: the lock file stays, naming a dead pid
        proc.wait(timeout=30)
    assert (run / LOCK_NAME).is_file() and lock_holder(run) == proc.pid
    with folder_lock(run):  # the kernel released the dead holder's lock
        assert lock_holder(run) == os.getpid()
    assert not (run / LOCK_NAME).exists()


def test_same_process_second_writer_is_refused(tmp_path):
    with folder_lock(tmp_path / "r"):
        with pytest.raises(RunFolderError, match=f"sweep folder .* in use by process {os.getpid()}"):
            with folder_lock(tmp_path / "r", what="sweep folder"):
                pass
    assert not (tmp_path / "r").exists()  # created by the outer lock, still empty: removed


def test_created_folder_is_removed_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError):
        with folder_lock(tmp_path / "a" / "new"):
            raise ValueError("refused before writing")
    assert not (tmp_path / "a" / "new").exists()
    with folder_lock(tmp_path / "kept") as d:
        (d / "config.yaml").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["config.yaml"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with folder_lock(existing):
        pass
    assert existing.is_dir()  # a folder the caller gave, empty or not, is never removed


def test_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError, match="out="):
            with folder_lock(bad):
                pass


def test_wait_until_free_waits_for_a_live_holder_only(tmp_path):
    import time

    from dpquant_sim.locking import is_locked, wait_until_free

    run = tmp_path / "run"
    assert not is_locked(run) and wait_until_free(run, 0)  # no folder, no lock file: free
    proc = _hold(run)
    try:
        assert is_locked(run)
        t0 = time.monotonic()
        assert wait_until_free(run, 0.5, poll_s=0.05) is False  # held: gives up after the timeout
        assert time.monotonic() - t0 >= 0.5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (run / LOCK_NAME).is_file()  # left by the dead holder, but nobody holds it
    assert not is_locked(run) and wait_until_free(run, 0)
    with folder_lock(run):  # the probe took nothing: a writer still gets the folder
        pass
