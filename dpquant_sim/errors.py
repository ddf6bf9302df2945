"""Error hierarchy. Every message says what was wrong, the value, and what is allowed or what to do.

All are ValueError subclasses where they report bad input, so callers that only know ValueError still work.
"""

from __future__ import annotations

from typing import Iterable


class DPQuantError(Exception):
    """Base of every error raised on purpose by dpquant-sim."""


class ConfigError(DPQuantError, ValueError):
    """A config field, CLI flag or argument has a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str | Iterable[object], source: str | None = None):
        if not isinstance(allowed, str):
            allowed = "one of " + ", ".join(repr(a) for a in allowed)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}={value!r} is not allowed; expected {allowed}")
        self.field, self.value, self.allowed, self.source = field, value, allowed, source


class DPSafetyError(DPQuantError, ValueError):
    """A setting would let information flow between examples before clipping, breaking the DP guarantee."""


class PrivacyBudgetExceeded(DPQuantError):
    """Running (further) would spend more than the target epsilon."""


class ProfileError(DPQuantError, ValueError):
    """A hardware profile YAML file is invalid (names the file, the key and what is allowed)."""


class DatasetError(DPQuantError, ValueError):
    """A dataset folder is missing or malformed (says what was expected where)."""


class RunFolderError(DPQuantError):
    """A run or sweep folder cannot be used as asked: another process is writing it, it holds another config,
    or its files disagree with each other (hand-edited or damaged)."""


class OutputError(DPQuantError, OSError):
    """A result cannot be written (a read-only folder, a full disk, a file where a folder should be). Names the
    path and the OS reason; still an OSError (``errno`` is kept) for callers that catch those."""

    def __init__(self, path: object, reason: str, errno: int | None = None):
        super().__init__(errno, reason, str(path))
        self.message = f"cannot write {str(path)!r}: {reason}"

    def __str__(self) -> str:
        return self.message


def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``.

    >>> check_choice("rounding", "nearest", ("nearest", "stochastic"))
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(field, value, allowed)
