"""The HPC-side configuration of the node agent: one TOML file, validated at start.

Everything the batch job does on the compute node before the agent's tunnel starts (maintenance
check, user home and overlay, container command, WebDAV mount, logging) is driven by this file.
This module finds and reads it (:func:`find_config`, :func:`load_config`) and is the one import
for everything about it; the pieces live in

* :mod:`node_agent.hpc_schema` — every option with its type, default and help (the single
  source of truth);
* :mod:`node_agent.hpc_validate` — checking a document against the schema;
* :mod:`node_agent.hpc_model` — the validated config as typed objects, and per-user paths;
* :mod:`node_agent.hpc_toml` and :mod:`node_agent.hpc_docs` — writing TOML (the wizard) and
  the option table of ``docs/hpc-config.md``;
* :mod:`node_agent.usernames` and :mod:`node_agent.templating` — user names as path
  components, ``{name}`` templates.

Every error names the option and the reason, for example::

    hpc config error: overlay.size: must be like '2G' or '512M', got 'big'

Only the Python standard library is used (``tomllib``; ``tomli`` on Python 3.10).
"""

from __future__ import annotations

import os
import sys

from .hpc_docs import render_docs_table
from .hpc_model import HpcConfig, UserPaths
from .hpc_schema import (
    CLEANENV_MODES,
    CONTAIN_MODES,
    ISOLATING_MODES,
    OPTIONS,
    SCHEMA,
    SECTIONS,
    Option,
    defaults_as_dict,
)
from .hpc_toml import dump_toml
from .hpc_validate import HpcConfigError, config_from_dict, parse_size, validate_webdav_url
from .templating import render_template, template_fields
from .usernames import UserNameError, safe_username, validate_username

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - Python 3.10 with the tomli backport (a dependency there)
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

CONFIG_ENV = "NODE_AGENT_HPC_CONFIG"
DEFAULT_CONFIG_PATHS = (
    "~/.config/node-agent/hpc-config.toml",
    "/etc/node-agent/hpc-config.toml",
)


def load_config(path: str | os.PathLike) -> HpcConfig:
    """Read and validate the TOML file at ``path``. Raises HpcConfigError."""
    p = str(path)
    if _toml is None:  # pragma: no cover
        raise HpcConfigError([("(file)", "reading TOML needs Python >= 3.11 (or tomli)")], p)
    try:
        with open(p, "rb") as f:
            data = _toml.load(f)
    except FileNotFoundError:
        raise HpcConfigError([("(file)", "file not found")], p) from None
    except PermissionError:
        raise HpcConfigError([("(file)", "permission denied")], p) from None
    except _toml.TOMLDecodeError as e:
        raise HpcConfigError([("(file)", f"not valid TOML: {e}")], p) from None
    return config_from_dict(data, p)


def find_config(explicit: str | None = None) -> str | None:
    """The config path to use: --config, then $NODE_AGENT_HPC_CONFIG, then the default paths."""
    if explicit:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env
    for cand in DEFAULT_CONFIG_PATHS:
        p = os.path.expanduser(cand)
        if os.path.exists(p):
            return p
    return None


__all__ = [
    "CLEANENV_MODES",
    "CONFIG_ENV",
    "CONTAIN_MODES",
    "DEFAULT_CONFIG_PATHS",
    "ISOLATING_MODES",
    "OPTIONS",
    "SCHEMA",
    "SECTIONS",
    "HpcConfig",
    "HpcConfigError",
    "Option",
    "UserNameError",
    "UserPaths",
    "config_from_dict",
    "defaults_as_dict",
    "dump_toml",
    "find_config",
    "load_config",
    "parse_size",
    "render_docs_table",
    "render_template",
    "safe_username",
    "template_fields",
    "validate_username",
    "validate_webdav_url",
]
