"""One writer per folder: an exclusive lock on ``<folder>/.lock`` while a run or a sweep writes there.

``fcntl.flock`` on an open lock file: the kernel releases it when the holder exits, however it exits (SIGKILL
included), so a lock left by a dead process never blocks anyone; the file itself only tells a second writer
which pid holds the folder. A clean release deletes the file. Locks on the same file taken through two
separate ``open`` calls conflict even within one process, so a second writer in the same process is refused too.

On network file systems ``flock`` is as good as the file system's locking (Linux NFS emulates it with
byte-range locks, which the server arbitrates). Without ``fcntl`` (Windows) folders are not locked.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
>>> with folder_lock(d) as f:
...     (f / ".lock").is_file()
True
>>> (d / ".lock").exists()
False
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dpquant_sim.errors import ConfigError, RunFolderError
from dpquant_sim.io import make_output_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The pid written in ``folder``'s lock file (None when there is none or it is unreadable)."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _acquire(lock: Path, what: str, folder: Path) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ConfigError("out", str(folder), f"a folder this user can write ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = None
            for _ in range(20):  # the holder writes its pid right after locking
                holder = lock_holder(folder)
                if holder is not None:
                    break
                time.sleep(0.01)
            who = f"process {holder}" if holder is not None else "another process"
            raise RunFolderError(
                f"{what} {str(folder)!r} is in use by {who} (lock file {LOCK_NAME} in it); wait for that process "
                "to finish or stop it, then rerun (a lock whose holder has died is released by the system)"
            ) from None
        # A releasing holder unlinks the file before unlocking: if we locked an unlinked file, start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


@contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "run folder", field: str = "out") -> Iterator[Path]:
    """Hold ``folder`` (created if needed) for this process; yield it.

    Raises ConfigError (naming ``field``) when ``folder`` cannot be a writable folder, and RunFolderError naming
    the holder's pid when another writer holds it. A folder this call created is removed again on exit if
    nothing was written into it (a refused config leaves no empty run folder behind).
    """
    folder = Path(folder)
    created = make_output_dir(folder, field)
    if fcntl is None:  # pragma: no cover
        yield folder
        return
    lock = folder / LOCK_NAME
    try:
        fd = _acquire(lock, what, folder)
    except BaseException:
        if created:
            _remove_if_empty(folder)
        raise
    try:
        yield folder
    finally:
        try:
            lock.unlink(missing_ok=True)  # while still holding it (see _acquire)
        finally:
            os.close(fd)
        if created:
            _remove_if_empty(folder)


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether a live process holds ``folder``'s lock now (a lock file left by a dead process does not count).

    The probe holds a shared lock for the microseconds between two system calls; a writer taking the folder in
    exactly that window is refused as if it were in use (and can simply rerun)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # no lock file: free
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder's LOCK_EX only
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


def wait_until_free(folder: str | os.PathLike, timeout_s: float, poll_s: float = 0.2) -> bool:
    """Wait until no live process holds ``folder``'s lock, at most ``timeout_s`` seconds; return whether it is
    free. Takes nothing: the caller still locks the folder itself (``folder_lock``), which stays the guarantee.
    A sweep task uses it so that a retry of a point waits for a dying earlier attempt to let go of the folder."""
    deadline = time.monotonic() + timeout_s
    while is_locked(folder):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
