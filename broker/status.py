"""``broker status``: the live sessions as a table (or JSON).

The NODE column shows the hub-side node when the spawner set one, else the name the agent
reported, marked ``(reported)``: the agent runs as the user and its word is a claim. Every cell
is printable text: the broker stores reported names escaped already (``\\u202e``), and any other
text with a control or format character (a user name, say) is shown escaped here too.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .table import format_bytes, printable, render_rows

COLUMNS = [
    ("USER", "user"),
    ("SERVER", "server_name"),
    ("JOB", "job_id"),
    ("NODE", "node"),
    ("PORT", "port"),
    ("STATE", "state"),
    ("AGENT", "agent_connected"),
    ("SINCE", "connected_at"),
    ("IN", "bytes_in"),
    ("OUT", "bytes_out"),
    ("HEARTBEAT", "last_heartbeat"),
    ("WALLTIME", "walltime_warning"),
]


def _fmt_time(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    t = _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")
    return f"{t} ({int(now - ts)}s ago)"


def _cell(key: str, s: dict[str, Any], now: float) -> str:
    v = s.get(key)
    if key in ("connected_at", "last_heartbeat"):
        return _fmt_time(v, now)
    if key in ("bytes_in", "bytes_out"):
        return format_bytes(v or 0)
    if key == "agent_connected":
        return "up" if v else "down"
    if key == "node" and not v and s.get("node_reported"):
        v = f"{s['node_reported']} (reported)"
    return printable("-" if v in (None, "") else str(v))  # never let a hostile name break the table


def render_table(sessions: list[dict[str, Any]], now: float) -> str:
    lines = render_rows([[h for h, _ in COLUMNS]] + [[_cell(k, s, now) for _, k in COLUMNS] for s in sessions])
    if not sessions:
        lines.append("(no live sessions)")
    return "\n".join(lines)
