"""Tables that fit the terminal: no cell is ever cut off.

A rich Table wider than the console truncates its cells ("0.91…"). ``print_fitting`` instead splits the
columns over as many tables as needed, each repeating the first ``fixed`` columns (e.g. the schedule), so
every cell is shown in full at 80 columns.

>>> import io
>>> from rich.console import Console
>>> c = Console(width=30, file=io.StringIO(), color_system=None)
>>> print_fitting(c, "t", ["name", "a", "b"], [["x" * 10, "1" * 14, "2" * 14]], fixed=1)
>>> text = c.file.getvalue()
>>> "1" * 14 in text and "2" * 14 in text and "…" not in text and max(map(len, text.splitlines())) <= 30
True
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]], idx: Sequence[int],
           left: Sequence[str]) -> Table:
    t = Table(title=title, box=None, padding=(0, 1), pad_edge=False, collapse_padding=True, header_style="bold")
    for i in idx:
        t.add_column(columns[i], justify="left" if columns[i] in left else "right", no_wrap=True)
    for r in rows:
        t.add_row(*(str(r[i]) for i in idx))
    return t


def fitting_tables(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                   fixed: int = 1, left: Sequence[str] = ()) -> list[Table]:
    """The tables ``print_fitting`` prints: columns after the first ``fixed`` are added to a table while it
    still fits ``console.width``; a column that fits nowhere gets a table of its own (the terminal wraps it)."""
    from rich.measure import Measurement

    width = console.width
    wide = console.options.update_width(1 << 16)  # measure the natural width, not one clamped to the console
    first = list(range(min(fixed, len(columns))))
    groups: list[list[int]] = []
    cur = list(first)
    for i in range(len(first), len(columns)):
        trial = _table(None, columns, rows, cur + [i], left)
        if len(cur) > len(first) and Measurement.get(console, wide, trial).maximum > width:
            groups.append(cur)
            cur = first + [i]
        else:
            cur = cur + [i]
    groups.append(cur)
    n = len(groups)
    return [_table(title if k == 0 else f"{title} (continued, {k + 1}/{n})" if n > 1 else title, columns, rows, g,
                   left) for k, g in enumerate(groups)]


def print_fitting(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                  fixed: int = 1, left: Sequence[str] = ()) -> None:
    """Print ``rows`` under ``columns`` as one table, or several when one would be wider than the console."""
    for t in fitting_tables(console, title, columns, rows, fixed=fixed, left=left):
        console.print(t)
