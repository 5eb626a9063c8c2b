"""Plain-text tables for the admin commands (``broker status``, ``broker accounting``).

:func:`render_rows` aligns columns (two spaces apart, no trailing blanks); :func:`printable` and
:func:`format_bytes` make the cells. A cell is always printable text: anything with a control or
format character (a hostile user or node name) is shown escaped, so it cannot break the table or
the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def printable(text: str) -> str:
    """*text*, or its ``unicode_escape`` form if it holds a character that is not printable."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def format_bytes(n: float) -> str:
    """``512B``, ``1.5KiB`` ... ``2.0TiB`` (binary units, one decimal above bytes)."""
    x = float(n)
    for unit in BYTE_UNITS:
        if x < 1024 or unit == BYTE_UNITS[-1]:
            return f"{x:.0f}{unit}" if unit == "B" else f"{x:.1f}{unit}"
        x /= 1024
    raise AssertionError("unreachable")


def render_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table whose first row is the header: columns left-aligned, two spaces apart."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
