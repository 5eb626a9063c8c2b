"""JupyterHub user names on the compute node: which are refused, and how one becomes a path.

A user name comes from the job environment (``JUPYTERHUB_USER``) and ends up in file names
(home, overlay, log). :func:`validate_username` refuses names that can never be used safely
(empty, NUL, path separators, ``..``, control characters, too long); :func:`safe_username`
maps every other name one-to-one onto a single safe path component.
"""

from __future__ import annotations

import string


class UserNameError(ValueError):
    """The user name cannot be used; the message says why."""


_SAFE_CHARS = set(string.ascii_letters + string.digits + ".-")
MAX_USER_LEN = 128


def validate_username(name: str | None) -> str:
    """Reject user names that can never be used safely; return the name unchanged otherwise."""
    if name is None or name == "":
        raise UserNameError("user name is empty (is JUPYTERHUB_USER set?)")
    if "\x00" in name:
        raise UserNameError("user name contains a NUL byte")
    if "/" in name or "\\" in name:
        raise UserNameError("user name contains a path separator")
    if name in (".", "..") or ".." in name:
        raise UserNameError("user name contains '..'")
    if len(name) > MAX_USER_LEN:
        raise UserNameError(f"user name is longer than {MAX_USER_LEN} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UserNameError("user name contains control characters")
    return name


def safe_username(name: str) -> str:
    """Map a validated user name to a string usable as one path component.

    Letters, digits, '.' and '-' are kept; every other character (including '_' itself, so the
    mapping is one-to-one) becomes '_' plus the hex of its UTF-8 bytes. A leading '.' or '-' is
    escaped too (no hidden files, nothing that looks like an option).
    """
    validate_username(name)
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE_CHARS and not (i == 0 and ch in ".-"):
            out.append(ch)
        else:
            out.append("".join(f"_{b:02x}" for b in ch.encode("utf-8")))
    return "".join(out)


__all__ = ["MAX_USER_LEN", "UserNameError", "safe_username", "validate_username"]
