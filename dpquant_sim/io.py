"""Atomic file writes: a result file is either complete or absent, never half-written.

A write goes to a hidden temporary file ``.<name>.<pid>-<random>.tmp`` beside the target and is renamed onto
it. A process killed mid-write (SIGKILL, power loss) can leave such a temporary behind; it never carries a
result's name, and ``clean_stale_temps`` removes them (the engine and the sweep runner call it when they take
a folder over). Write failures (read-only folder, full disk, a file where a folder should be) raise
``OutputError``: one line naming the target and the reason, the previous version of the target kept.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

from dpquant_sim.errors import ConfigError, OutputError

# ".<target name>.<pid>-<8 hex>.tmp"; also the older mkstemp form ".<target name>.<8 of [a-z0-9_]>.tmp"
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?:(?P<pid>\d+)-[0-9a-f]{8}|[a-z0-9_]{8})\.tmp$")
# Errors after which the target is untouched but the disk or the device is the problem.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS)


def _new_temp(path: Path) -> Path:
    """Create an empty temporary file beside ``path`` and return its name.

    ``os.open(..., 0o666)`` lets the kernel apply the process umask, exactly as ``open()`` would for the target:
    no umask round trip (``os.umask`` is process-wide, so reading it by setting it races with other threads).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(path.parent))


def _output_error(path: Path, e: OSError) -> OutputError:
    if isinstance(e, OutputError):
        return e
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and not path.parent.is_dir():
        anc = path.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        reason = f"{str(anc)!r} is a file, not a folder"
    elif e.errno == errno.EISDIR or path.is_dir():
        reason = "it is a folder; give a file name"
    else:
        reason = e.strerror or str(e)
        if e.errno in _WRITE_ERRNOS:
            reason += " (nothing was half-written; any previous version is kept)"
    return OutputError(path, reason, e.errno)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the temporary file onto ``path`` (atomic on POSIX).

    The file gets the mode ``open()`` would give it (0o666 minus the umask). Raises ``OutputError`` (an
    OSError) naming ``path`` when it cannot be written; the temporary file is removed and ``path`` keeps its
    previous content.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write(d / "a.txt", lambda p: p.write_text("hi"))
    >>> (d / "a.txt").read_text()
    'hi'
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_temp(path)
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _output_error(path, e) from e
        raise
    return path


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like one of ``atomic_write``'s temporary files.

    >>> is_temp_file(".metrics.csv.4242-0a1b2c3d.tmp"), is_temp_file("metrics.csv")
    (True, False)
    """
    return _TEMP_RE.match(Path(path).name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed writer whose parent died too stays a zombie until something reaps it (a container's pid 1 may
    # never do): it signals fine but writes nothing any more.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust the signal
    return state not in ("Z", "X")


def clean_stale_temps(folder: str | os.PathLike, *, owned: bool = True) -> list[Path]:
    """Remove ``atomic_write`` temporaries left in ``folder`` by killed writers; return what was removed.

    ``owned=True``: the caller holds the folder's lock (``dpquant_sim.locking.folder_lock``), so no other
    process writes there and every temporary is stale. ``owned=False``: remove only those whose writer pid
    (in the name) is no longer alive on this machine.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TEMP_RE.match(f.name)
        if m is None or not f.is_file():
            continue
        if not owned and (m["pid"] is None or _pid_alive(int(m["pid"]))):
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (summary.json records metrics.csv's, so edits to it are detected)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_output_dir(path: str | os.PathLike, field: str = "out") -> bool:
    """Create the output folder ``path`` (and its parents) unless it exists; return whether it was created.

    Raises ConfigError naming ``field`` when ``path`` is a file, lies under a file, or cannot be created or
    written (read-only, permission denied), before any work is done.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, str(path), "a folder (it is a file)")
    anc = path
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ConfigError(field, str(path), f"a folder path ({str(anc)!r} is a file, not a folder)")
    created = False
    if not path.is_dir():
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            if not path.is_dir():
                raise ConfigError(field, str(path), "a folder (it is a file)") from None
        except OSError as e:
            raise ConfigError(field, str(path), f"a folder that can be created ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        if created:
            path.rmdir()
        raise ConfigError(field, str(path), "a folder this user can write (it is read-only)")
    return created


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_df(path: str | os.PathLike, df: "Any") -> Path:
    """Write a pandas DataFrame atomically; the suffix picks the format (.csv or .parquet)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda p: df.to_parquet(p, index=False))
    return atomic_write(path, lambda p: df.to_csv(p, index=False))
