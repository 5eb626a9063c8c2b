"""Writing HPC config files (for ``node-agent wizard``): a small TOML writer for the schema's
value types, with each option's help as a comment above it.

Only what the config uses is supported: booleans, integers, strings, lists of those and inline
tables of strings. Strings are always written as basic strings with escapes, so any value
reads back unchanged.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from .hpc_schema import OPTIONS, SECTIONS


def toml_value(v: Any) -> str:
    """``v`` as a TOML value; raises TypeError for a type the config does not use."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        out = ['"']
        for ch in v:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


def dump_toml(data: dict[str, dict[str, Any]], header: str = "", comments: bool = True) -> str:
    """Write a two-level {section: {option: value}} dict as TOML, with the option help as comments.

    Sections come in schema order; a section that is missing or empty is left out.
    """
    lines = [header.rstrip()] if header else []
    for sec in SECTIONS:
        body = data.get(sec)
        if not body:
            continue
        if lines:
            lines.append("")
        lines.append(f"[{sec}]")
        for name, v in body.items():
            opt = OPTIONS.get(f"{sec}.{name}")
            if comments and opt is not None:
                lines += ["# " + t for t in textwrap.wrap(_plain(opt.help), 96)]
            lines.append(f"{_toml_key(name)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    return text.replace("`", "")


__all__ = ["dump_toml", "toml_value"]
