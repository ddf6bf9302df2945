"""One vocabulary across commands: deprecated flag names, and errors that name the flag the user typed.

Every concept has one flag name in every command (the table in docs/usage.md, checked by
tests/test_cli_vocabulary.py). A name a command used before is kept for one release as a *hidden* option
(``typer.Option(None, "--old", hidden=True)``) next to the new one; ``merge_alias`` folds it into the new
option's value and prints one deprecation line on stderr.

Config errors name the config field (``recipe='fp5'``); a command turns them into the flag the user typed
with ``FlagNames.rename``:

>>> names = FlagNames({"recipe": "--recipe"})
>>> names.typed("recipe", "--quantize")
>>> from dpquant_sim.errors import ConfigError
>>> str(names.rename(ConfigError("recipe", "fp5", ("fp8", "fp4"))))
"--quantize='fp5' is not allowed; expected one of 'fp8', 'fp4'"
"""

from __future__ import annotations

from typing import Any, Mapping

import typer

from dpquant_sim.errors import ConfigError

DEPRECATION = "note: {old} is deprecated and will be removed in the next release; use {new}"


def deprecated(old: str, new: str) -> None:
    """Print the one-line deprecation note for ``old`` on stderr."""
    typer.echo(DEPRECATION.format(old=old, new=new), err=True)


def merge_alias(new_value: Any, old_value: Any, *, new: str, old: str, default: Any = None) -> Any:
    """The value of an option that also has a deprecated name.

    ``old_value`` is the hidden old option's value (None when not given). When it was given, print the
    deprecation note; when both were given with different values, raise ConfigError naming both. List-valued
    options (repeatable) are concatenated when both names were used.
    """
    if old_value is None or (isinstance(old_value, (list, tuple)) and not old_value):
        return new_value
    deprecated(old, new)
    if new_value is None or new_value == default or (isinstance(new_value, (list, tuple)) and not new_value):
        return old_value
    if isinstance(new_value, (list, tuple)):
        return [*new_value, *old_value]
    if new_value != old_value:
        raise ConfigError(old, old_value, f"no {old} together with {new} (give {new} only; {old} is its old name)")
    return new_value


class FlagNames:
    """Maps config fields (``recipe``, ``schedule.budget``, ``base.epochs``) to the flags that set them.

    ``typed(field, flag)`` records that the user set ``field`` through a deprecated name, so errors name what
    was typed. ``rename(err)`` returns a ConfigError whose field is the flag (the original when the field has
    no flag, or when ``keep_source`` names the YAML file the value came from).
    """

    def __init__(self, fields: Mapping[str, str]):
        self.fields = dict(fields)

    def typed(self, field: str, flag: str | None) -> None:
        if flag is not None:
            self.fields[field] = flag

    def flag(self, field: str) -> str | None:
        return self.fields.get(field)

    def rename(self, err: ConfigError, *, keep_source: str | None = None) -> ConfigError:
        flag = self.fields.get(err.field)
        if flag is None or (keep_source is not None and err.source == keep_source):
            return err
        return ConfigError(flag, err.value, err.allowed)


def rename_config_errors(names: FlagNames, fn, *args: Any, keep_source: str | None = None, **kw: Any) -> Any:
    """Call ``fn``; a ConfigError about a field that has a flag is re-raised naming the flag."""
    try:
        return fn(*args, **kw)
    except ConfigError as e:
        new = names.rename(e, keep_source=keep_source)
        if new is e:
            raise
        raise new from None
