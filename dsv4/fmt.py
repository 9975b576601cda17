"""Output for people and for logs: one byte formatter, and rich tables that become plain lines off a terminal.

Byte counts are shown in decimal units, as labelled (1 kB = 1000 B, 1 MB = 10^6 B, as disks and `ls --si` count):
docs/usability.md. A table printed to a pipe or a file is one line per row, tab separated and never wrapped, so a log
can be grepped for a full tensor name; on a terminal it is a rich table.
"""

from __future__ import annotations

import sys

_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def nbytes(n: float) -> str:
    """``1234567 -> '1.23 MB'``: decimal units, 3 significant digits; below 1 kB the exact count (``'512 B'``)."""
    n = float(n)
    for unit, k in _UNITS:
        if abs(n) >= k:
            v = n / k
            return f"{v:.3g} {unit}" if abs(v) < 1000 else f"{v:,.0f} {unit}"
    return f"{n:.0f} B"


def is_terminal(stream=None) -> bool:
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def plain(cell) -> str:
    """A table cell as plain text (rich markup removed, newlines kept out of the line)."""
    from rich.text import Text

    text = cell.plain if isinstance(cell, Text) else Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
    return text.replace("\n", " ").replace("\t", " ")


def table_lines(table) -> list[str]:
    """A rich Table as plain lines: ``# title``, ``# header\\t...``, then one tab-separated line per row."""
    out = [f"# {plain(table.title)}"] if table.title else []
    if table.show_header:
        out.append("# " + "\t".join(plain(c.header) for c in table.columns))
    for row in zip(*(list(c.cells) for c in table.columns)):
        out.append("\t".join(plain(x) for x in row))
    return out


def print_table(table, console=None) -> None:
    """`table` (a rich Table, or a Group of tables and strings) as rich output on a terminal, else as plain lines on
    stdout (never wrapped or cut)."""
    if is_terminal():
        from rich.console import Console

        (console or Console()).print(table)
        return
    for part in getattr(table, "renderables", [table]):
        print("\n".join(table_lines(part)) if hasattr(part, "columns") else plain(part), flush=True)
