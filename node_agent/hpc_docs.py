"""The option table of ``docs/hpc-config.md``, rendered from the schema.

``python -m node_agent.hpc_docs`` prints it; the table in the docs must be exactly this text
(``tests/test_hpc_config.py`` checks it).
"""

from __future__ import annotations

from .hpc_schema import SCHEMA, Option
from .hpc_toml import toml_value

_LIST_KINDS = ("list", "argv", "binds")


def _md_default(opt: Option) -> str:
    d = opt.default
    if d == "" or d == [] or d == {}:
        return "`[]`" if opt.kind in _LIST_KINDS else "(empty)"
    return "`" + toml_value(d).replace("|", "\\|") + "`"


def render_docs_table() -> str:
    """A Markdown table with one row per option: key, type, default and meaning."""
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for o in SCHEMA:
        rows.append(f"| `{o.key}` | {o.type_name} | {_md_default(o)} | {o.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


__all__ = ["render_docs_table"]

if __name__ == "__main__":  # pragma: no cover
    print(render_docs_table(), end="")
