"""Help texts that name registry contents without importing them at start-up.

``dpquant-sim --help`` and ``dpquant-sim hw list`` must not import torch or opacus (seconds of start-up), yet
``train --help`` should list the recipes, which live next to the quantized layers. A command built with
:func:`lazy_help_command` keeps ``{placeholders}`` in its help texts and fills them in only when its own
help is printed.

>>> cls = lazy_help_command({"{n}": lambda: "3"})
>>> cls.__name__
'LazyHelpCommand'
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from typer.core import TyperCommand


def lazy_help_command(fill: Mapping[str, Callable[[], str]]) -> type[TyperCommand]:
    """A TyperCommand class (for ``app.command(cls=...)``) that replaces each key of ``fill`` in its help
    and in its options' help with the value of the callable, the first time help is shown."""

    class LazyHelpCommand(TyperCommand):
        _filled = False

        def _fill(self) -> None:
            if self._filled:
                return
            values = {k: f() for k, f in fill.items()}

            def sub(text: str | None) -> str | None:
                if text:
                    for k, v in values.items():
                        text = text.replace(k, v)
                return text

            self.help = sub(self.help)
            for p in self.params:
                if getattr(p, "help", None):
                    p.help = sub(p.help)  # type: ignore[attr-defined]
            self._filled = True

        def format_help(self, ctx: Any, formatter: Any) -> None:
            self._fill()
            return super().format_help(ctx, formatter)

    return LazyHelpCommand
