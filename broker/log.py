"""Structured logging for the broker (structlog), with bound context and capped fields.

Log lines never carry environments, tokens or secrets: callers bind only identifiers
(session, user, server, job_id, conn). As a second line of defence every string value is
capped in length and control characters are escaped, so hostile input (odd usernames,
garbage from the network) cannot forge or flood log lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

MAX_FIELD = 200


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_FIELD:
            value = value[:MAX_FIELD] + f"...(+{len(value) - MAX_FIELD})"
        if not value.isprintable():
            value = value.encode("unicode_escape", "backslashreplace").decode("ascii")
    return value


def cap_fields(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """structlog processor: cap and escape every string field."""
    return {k: _clean(v) for k, v in event.items()}


def configure(level: str = "INFO", json: bool = False, stream: Any = None) -> None:
    """Configure structlog (and the stdlib root logger it renders through) once per process."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            cap_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # asyncssh logs through stdlib logging; keep it quiet and never at debug (it can show
    # usernames and packet details but never passwords; still, cap its volume).
    logging.basicConfig(
        stream=stream or sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("broker").bind(**context)
