"""What an agent says about itself, made safe to store and show.

The agent runs as the user, in the user's job: whatever it reports (its node's name) is the
user's claim, not a fact. Such text is stored under a name that says so (``node_reported``)
and reduced here to hostname characters. Every other character is written as a visible
escape (``\\u202e`` for U+202E RIGHT-TO-LEFT OVERRIDE, ``\\x1b`` for ESC, ``\\x0a`` for a
newline, ``\\x5c`` for a backslash itself), so the stored text is plain ASCII that cannot
reorder, recolour or split the lines of a terminal, a log or a web page, and no two different
claims are stored alike.
"""

from __future__ import annotations

import string
from typing import Any

#: Characters a reported host name keeps as they are (RFC 952/1123 plus ``_``, seen in practice).
HOSTNAME_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
#: Longest stored reported name, escapes included (a DNS name is at most 253 characters).
MAX_REPORTED = 253


def escape_char(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def reported_name(value: Any, limit: int = MAX_REPORTED) -> str:
    """*value* as stored text: hostname characters kept, all else escaped, at most *limit* long.

    A non-string (a hostile agent may send a number, a list, null) counts as no name (``""``).
    The cut never splits an escape.
    """
    if not isinstance(value, str):
        return ""
    out: list[str] = []
    size = 0
    for c in value[:limit]:
        piece = c if c in HOSTNAME_CHARS else escape_char(c)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)
