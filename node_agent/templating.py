"""``{name}`` templates in the HPC config (paths, binds, argv templates).

Only bare ``{name}`` placeholders are allowed (no format spec, no conversion, no attribute or
index access); ``{{`` and ``}}`` stand for literal braces. Substituted values are inserted
literally and never parsed again, so a value holding braces cannot inject a placeholder.
"""

from __future__ import annotations

import string


def template_fields(template: str) -> list[str]:
    """Names used in a ``{name}`` template; raises ValueError on malformed braces."""
    names = []
    for _lit, fname, spec, conv in string.Formatter().parse(template):
        if fname is None:
            continue
        if fname == "" or not fname.isidentifier():
            raise ValueError(f"bad placeholder {{{fname}}} (use {{name}}; write {{{{ for a brace)")
        if spec or conv:
            raise ValueError(f"placeholder {{{fname}}} must not have a format spec or conversion")
        names.append(fname)
    return names


def render_template(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders. Values are inserted literally (never re-parsed)."""
    out = []
    for lit, fname, _spec, _conv in string.Formatter().parse(template):
        out.append(lit)
        if fname is not None:
            out.append(str(values[fname]))
    return "".join(out)


__all__ = ["render_template", "template_fields"]
