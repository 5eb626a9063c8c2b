"""Validation of the HPC config: every error names the option and the reason.

:func:`config_from_dict` checks a parsed TOML document against
:data:`node_agent.hpc_schema.SCHEMA` (unknown sections and options, each value's type, the rules
between options), fills in the schema's defaults, expands ``~`` and ``$VAR`` in paths, and
builds the model (:mod:`node_agent.hpc_model`). It reports all errors at once, for example::

    hpc config error: overlay.size: must be like '2G' or '512M', got 'big'

Only the standard library is used.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .hpc_model import HpcConfig, build_config
from .hpc_schema import OPTIONS, SCHEMA, SECTIONS, Option
from .templating import template_fields

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_OVERLAY_BYTES = 4 << 20
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HpcConfigError(Exception):
    """One or more configuration errors; ``errors`` holds (option, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return "\n".join(f"hpc config error{where}: {opt}: {why}" for opt, why in self.errors)


def parse_size(value: str) -> int:
    """Bytes of a size like ``2G`` or ``512M`` (at least 4M); raises ValueError(reason)."""
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"must be like '2G' or '512M', got {value!r}")
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if n < MIN_OVERLAY_BYTES:
        raise ValueError(f"must be at least 4M, got {value!r}")
    return n


def _describe(v: Any) -> str:
    t = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(v), type(v).__name__
    )
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{r} ({t})"


def _expand_path(value: str) -> str:
    value = os.path.expanduser(value)

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in os.environ:
            raise ValueError(f"environment variable ${name} is not set")
        return os.environ[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", repl, value)


def _check_abs_template(value: str, allowed: tuple[str, ...]) -> None:
    used = template_fields(value)
    bad = [n for n in used if n not in allowed]
    if bad:
        raise ValueError(f"unknown placeholder {{{bad[0]}}}; allowed: " + ", ".join("{" + a + "}" for a in allowed))
    if not (value.startswith("/") or value.startswith("{")):
        raise ValueError(f"must be an absolute path, got {value!r}")


_BIND_OPTS = {"ro", "rw"}


def _check_bind(spec: str, allowed: tuple[str, ...]) -> None:
    if not spec or "," in spec:
        raise ValueError(f"bind {spec!r}: must be SRC[:DEST[:ro|rw]], one bind per list item")
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"bind {spec!r}: too many ':' (SRC[:DEST[:ro|rw]])")
    if len(parts) == 3 and parts[2] not in _BIND_OPTS:
        raise ValueError(f"bind {spec!r}: option must be 'ro' or 'rw', got {parts[2]!r}")
    for p in parts[:2]:
        try:
            _check_abs_template(p, allowed)
        except ValueError as e:
            raise ValueError(f"bind {spec!r}: {e}") from None


def _coerce(opt: Option, value: Any) -> Any:
    """Type-check one value; return the normalised value or raise ValueError(reason)."""
    k = opt.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_describe(value)}")
        return value
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_describe(value)}")
        if opt.minimum is not None and value < opt.minimum:
            raise ValueError(f"must be >= {opt.minimum}, got {value}")
        return value
    if k in ("str", "size", "path", "template", "choice"):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        if k == "size":
            parse_size(value)
        elif k == "choice" and value not in opt.choices:
            close = difflib.get_close_matches(value, opt.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(map(repr, opt.choices))}, got {value!r}{hint}")
        elif k == "path" and value:
            value = os.path.normpath(_expand_path(value))
            if not os.path.isabs(value):
                raise ValueError(f"must be an absolute path (or start with ~), got {value!r}")
        elif k == "template" and value:
            value = _expand_path(value)
            _check_abs_template(value, opt.placeholders)
        return value
    if k in ("list", "argv", "binds"):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"must be a list of strings, got {_describe(value)}")
        for i, x in enumerate(value):
            if "\x00" in x:
                raise ValueError(f"item {i} must not contain a NUL character")
        if k == "argv":
            for i, x in enumerate(value):
                try:
                    used = template_fields(x)
                except ValueError as e:
                    raise ValueError(f"item {i} ({x!r}): {e}") from None
                bad = [n for n in used if n not in opt.placeholders]
                if bad:
                    allowed = ", ".join("{" + a + "}" for a in opt.placeholders) or "none"
                    raise ValueError(f"item {i} ({x!r}): unknown placeholder {{{bad[0]}}}; allowed: {allowed}")
        if k == "binds":
            value = [_expand_path(x) for x in value]
            for x in value:
                _check_bind(x, opt.placeholders)
        return list(value)
    if k == "envmap":
        if not isinstance(value, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in value.items()):
            raise ValueError(f"must be a table of strings, got {_describe(value)}")
        for a, b in value.items():
            for n in (a, b):
                if not _ENV_NAME.fullmatch(n):
                    raise ValueError(f"{n!r} is not a valid environment variable name")
        return dict(value)
    raise AssertionError(k)  # pragma: no cover


def _unknown(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_values(data: dict, errors: list[tuple[str, str]]) -> dict[str, Any]:
    """The checked values given in the document, by key; errors are appended to ``errors``."""
    values: dict[str, Any] = {}
    for sec, body in data.items():
        if sec not in SECTIONS:
            if sec in {o.name for o in SCHEMA}:
                owners = [o.key for o in SCHEMA if o.name == sec]
                errors.append((sec, f"unknown option at top level (did you mean {owners[0]!r}?)"))
            else:
                errors.append((sec, "unknown section" + _unknown(sec, list(SECTIONS))))
            continue
        if not isinstance(body, dict):
            errors.append((sec, f"must be a table ([{sec}]), got {_describe(body)}"))
            continue
        for name, v in body.items():
            key = f"{sec}.{name}"
            opt = OPTIONS.get(key)
            if opt is None:
                errors.append((key, "unknown option" + _unknown(key, list(OPTIONS))))
                continue
            try:
                values[key] = _coerce(opt, v)
            except ValueError as e:
                errors.append((key, str(e)))
    return values


def _default(opt: Option) -> Any:
    """The option's default as a checked value would be (paths expanded, containers copied)."""
    d = opt.default
    if opt.kind == "path" and d:
        return os.path.normpath(_expand_path(d))
    if opt.kind == "template" and d:
        return _expand_path(d)
    return list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d


def _home_mode(get: Callable[[str], Any], errors: list[tuple[str, str]]) -> int:
    mode = get("storage.home_mode")
    try:
        home_mode = int(mode, 8)
        if not 0 <= home_mode <= 0o7777:
            raise ValueError
    except ValueError:
        errors.append(("storage.home_mode", f"must be an octal mode like '0700', got {mode!r}"))
        home_mode = 0o700
    return home_mode


def _check_container(get: Callable[[str], Any], errors: list[tuple[str, str]]) -> None:
    if get("container.enabled"):
        if not get("container.image") and "container.image" not in {o for o, _ in errors}:
            errors.append(
                (
                    "container.image",
                    "required when container.enabled is true (or set container.enabled = false for no-container mode)",
                )
            )
        rt = get("container.runtime")
        if not rt or (os.sep in rt and not os.path.isabs(rt)) or any(c.isspace() for c in rt):
            errors.append(
                (
                    "container.runtime",
                    f"must be a program name (apptainer, singularity) or an absolute path without spaces, got {rt!r}",
                )
            )
        if get("container.load_command") and not get("container.load_shell"):
            errors.append(("container.load_shell", "must not be empty when load_command is set"))
    ch = get("container.home")
    if not ch.startswith("/") or ":" in ch or "," in ch:
        errors.append(("container.home", f"must be an absolute path without ':' or ',', got {ch!r}"))
    wd = get("container.workdir")
    if wd and not wd.startswith("/"):
        errors.append(("container.workdir", f"must be an absolute path, got {wd!r}"))
    for key in ("nbgrader.exchange_mount", "nbgrader.config_mount"):
        v = get(key)
        if not v.startswith("/") or ":" in v:
            errors.append((key, f"must be an absolute path without ':', got {v!r}"))
    flag = get("container.gpu_flag")
    if flag and not flag.startswith("-"):
        errors.append(("container.gpu_flag", f"must be a runtime flag like '--nv', got {flag!r}"))
    for pat in get("container.no_mount"):
        if not pat or "," in pat:
            errors.append(("container.no_mount", f"items must be non-empty, without ',', got {pat!r}"))
    for u in get("maintenance.allowed_users"):
        if not u:
            errors.append(("maintenance.allowed_users", "items must not be empty"))


def _check_webdav(get: Callable[[str], Any], errors: list[tuple[str, str]]) -> None:
    cmp = get("webdav.container_mount_point")
    if cmp and (not cmp.startswith("/") or ":" in cmp):
        errors.append(("webdav.container_mount_point", f"must be an absolute path without ':', got {cmp!r}"))
    if not get("webdav.enabled"):
        return
    argv = get("webdav.mount_command")
    if not argv:
        errors.append(("webdav.mount_command", "required when webdav.enabled is true"))
    else:
        if template_fields(argv[0]):
            errors.append(("webdav.mount_command", "item 0 (the program) must not contain a placeholder"))
        if not any("mount_point" in template_fields(a) for a in argv):
            errors.append(("webdav.mount_command", "must use the {mount_point} placeholder"))
    uargv = get("webdav.unmount_command")
    if uargv and template_fields(uargv[0]):
        errors.append(("webdav.unmount_command", "item 0 (the program) must not contain a placeholder"))
    if get("webdav.url"):
        try:
            validate_webdav_url(get("webdav.url"))
        except ValueError as e:
            errors.append(("webdav.url", str(e)))
    if not _ENV_NAME.fullmatch(get("webdav.url_env")):
        errors.append(("webdav.url_env", "must be an environment variable name"))


def config_from_dict(data: dict, source: str | None = None) -> HpcConfig:
    """Validate a parsed TOML document and build the model. Raises HpcConfigError."""
    errors: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise HpcConfigError([("(file)", "must be a TOML table")], source)
    values = _read_values(data, errors)

    def get(key: str) -> Any:
        return values[key] if key in values else _default(OPTIONS[key])

    # rules between options
    home_mode = _home_mode(get, errors)
    _check_container(get, errors)
    _check_webdav(get, errors)
    if errors:
        raise HpcConfigError(errors, source)
    final = {o.key: get(o.key) for o in SCHEMA}
    final["storage.home_mode"] = home_mode
    final["overlay.size_bytes"] = parse_size(final["overlay.size"])
    return build_config(final, source)


def validate_webdav_url(url: str) -> str:
    """Accept only http(s)://host[:port]/path URLs; raise ValueError(reason) otherwise."""
    if not isinstance(url, str) or not url:
        raise ValueError("URL is empty")
    if len(url) > 2048:
        raise ValueError("URL is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # reading it raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"URL is malformed ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL scheme must be https or http, got {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not contain credentials (use webdav.credential_env)")
    host = parts.hostname or ""
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+", host):
        raise ValueError("URL must have a valid host name")
    if host.startswith("-") or host.startswith("."):
        raise ValueError("URL must have a valid host name")
    return url


__all__ = ["HpcConfigError", "MIN_OVERLAY_BYTES", "config_from_dict", "parse_size", "validate_webdav_url"]
