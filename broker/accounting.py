"""``broker accounting``: per-user usage over a period, from the broker's session store (+ sacct).

The report reads the SQLite session store **directly and read-only** (``mode=ro``): it works
whether or not the broker is running, needs no REST token, and can never change state. It
needs read access to the database file (the broker's ``state_dir`` is 0700: run it as the
broker's user, or root).

Which sessions count: those **registered** in ``[since, until)``; each is attributed whole to
that period (its hours, bytes and CPU/GPU time are not split across period boundaries), so
consecutive periods never count a session twice.

- ``hours``: from the moment the notebook's agent first connected (``connected_at``; queue time
  does not count) to ``closed_at``, or to now for a session still live. Sessions whose agent
  never connected count as sessions with 0 hours.
- ``bytes_in`` / ``bytes_out``: tunnel bytes hub -> node and node -> hub (flushed counters).
- ``cpu_hours`` / ``gpu_hours``: from Slurm accounting, one ``sacct -n -P -j IDS -o
  JobID,CPUTimeRAW,AllocTRES,Elapsed`` call per 200 job ids: CPUTimeRAW (allocated CPUs x
  elapsed) of the job allocation line, and the ``gres/gpu`` count of AllocTRES x Elapsed. When
  sacct is missing, fails, or Slurm's accounting storage is disabled, the report says so and
  these columns stay empty. **Slurm only**: job ids that are not Slurm's (the local backend's,
  Grid Engine's — plain numbers too, so sacct would report some unrelated Slurm job) must not be
  looked up in Slurm: use ``--no-sacct`` (or ``BrokerApp.accounting_sacct = ''``). Grid Engine's
  own accounting (``qacct``) is not read.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from .table import format_bytes, printable, render_rows

SACCT_FIELDS = "JobID,CPUTimeRAW,AllocTRES,Elapsed"
SACCT_CHUNK = 200
_SLURM_JOB_ID = re.compile(r"^\d+(_\d+)?$")

COLUMNS = ["user", "sessions", "hours", "bytes_in", "bytes_out", "cpu_hours", "gpu_hours"]


class AccountingError(Exception):
    """The report cannot be made (no database, bad date); the message says why."""


# -- dates ----------------------------------------------------------------------------------


def parse_when(text: str) -> float:
    """``YYYY-MM-DD`` (local midnight), an ISO date-time (local unless it has an offset), or epoch seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text) and len(text) > 8:
        return float(text)
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AccountingError(f"not a date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM])") from None
    return when.timestamp()  # naive -> local time


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


# -- the store ------------------------------------------------------------------------------


def load_sessions(db_path: str, since: float, until: float, user: str | None = None) -> list[dict[str, Any]]:
    """Sessions registered in ``[since, until)`` (optionally of one user), read-only."""
    if not os.path.exists(db_path):
        raise AccountingError(f"no session database at {db_path} (set BrokerApp.state_dir or BrokerApp.db_path)")
    try:
        db = sqlite3.connect(f"file:{quote(os.path.abspath(db_path))}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise AccountingError(f"cannot open {db_path} read-only: {e}") from None
    try:
        db.row_factory = sqlite3.Row
        q = (
            "SELECT id, user, server_name, job_id, node, state, created, connected_at, ready_at, closed_at, "
            "end_reason, bytes_in, bytes_out FROM sessions WHERE created >= ? AND created < ?"
        )
        args: list[Any] = [since, until]
        if user is not None:
            q += " AND user = ?"
            args.append(user)
        return [dict(r) for r in db.execute(q + " ORDER BY created", args)]
    except sqlite3.Error as e:
        raise AccountingError(f"cannot read {db_path}: {e}") from None
    finally:
        db.close()


# -- sacct ----------------------------------------------------------------------------------


def parse_elapsed(text: str) -> float:
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS`` or ``MM:SS.mmm`` as seconds."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts[-3:]
    return days * 86400 + h * 3600 + m * 60 + s


def gpus_in_tres(tres: str) -> int:
    """GPU count of an AllocTRES string (``gres/gpu=2``; typed ``gres/gpu:a100=2`` if no total is given)."""
    total, typed = None, 0
    for item in tres.split(","):
        name, _, value = item.partition("=")
        if not value.isdigit():
            continue
        if name == "gres/gpu":
            total = int(value)
        elif name.startswith("gres/gpu:"):
            typed += int(value)
    return total if total is not None else typed


def parse_sacct(text: str) -> dict[str, dict[str, float]]:
    """``sacct -n -P -o JobID,CPUTimeRAW,AllocTRES,Elapsed`` output -> {job id: usage} (allocation lines only)."""
    usage: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or "." in fields[0] or not fields[0]:
            continue  # steps (123.batch, 123.0, 123.extern) repeat the allocation's numbers
        job, cputime, tres, elapsed = fields[:4]
        try:
            elapsed_s = parse_elapsed(elapsed) if elapsed else 0.0
            cpu_s = float(cputime) if cputime else 0.0
        except ValueError:
            continue
        usage[job] = {"cpu_seconds": cpu_s, "gpu_seconds": gpus_in_tres(tres) * elapsed_s, "elapsed_seconds": elapsed_s}
    return usage


def sacct_usage(
    job_ids: Iterable[str],
    sacct: str = "sacct",
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> tuple[dict[str, dict[str, float]] | None, str]:
    """Usage of *job_ids* from sacct, or ``(None, why not)``."""
    ids = sorted({j for j in job_ids if _SLURM_JOB_ID.match(j)}, key=lambda j: [int(x) for x in j.split("_")])
    if not sacct:
        return None, "sacct not queried (disabled)"
    if not ids:
        return {}, "no Slurm job ids in this period"
    usage: dict[str, dict[str, float]] = {}
    for i in range(0, len(ids), SACCT_CHUNK):
        chunk = ids[i : i + SACCT_CHUNK]
        try:
            r = run(
                [sacct, "-n", "-P", "-j", ",".join(chunk), "-o", SACCT_FIELDS],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError:
            return None, f"{sacct} not found: Slurm accounting unavailable"
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"sacct failed: {e}"
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            msg_text = msg[-1][:200] if msg else f"exit status {r.returncode}"
            if "accounting storage is disabled" in (r.stderr + r.stdout).lower():
                return None, f"Slurm accounting storage is disabled (sacct: {msg_text})"
            return None, f"sacct failed: {msg_text}"
        usage.update(parse_sacct(r.stdout))
    return usage, f"sacct: {len([j for j in ids if j in usage])} of {len(ids)} jobs found"


# -- the report ------------------------------------------------------------------------------


def session_hours(s: dict[str, Any], now: float) -> float:
    start = s.get("connected_at") or s.get("ready_at")
    if not start:
        return 0.0
    end = s.get("closed_at") or now
    return max(0.0, end - start) / 3600.0


def build_report(
    sessions: list[dict[str, Any]],
    since: float,
    until: float,
    now: float,
    usage: dict[str, dict[str, float]] | None,
    sacct_note: str,
) -> dict[str, Any]:
    users: dict[str, dict[str, Any]] = {}
    with_sacct = usage is not None
    for s in sessions:
        u = users.setdefault(
            s["user"],
            {
                "user": s["user"],
                "sessions": 0,
                "live_sessions": 0,
                "hours": 0.0,
                "bytes_in": 0,
                "bytes_out": 0,
                "cpu_hours": 0.0 if with_sacct else None,
                "gpu_hours": 0.0 if with_sacct else None,
                "jobs": [],
            },
        )
        u["sessions"] += 1
        u["live_sessions"] += s["state"] != "closed"
        u["hours"] += session_hours(s, now)
        u["bytes_in"] += s["bytes_in"] or 0
        u["bytes_out"] += s["bytes_out"] or 0
        if s["job_id"]:
            u["jobs"].append(printable(s["job_id"]))  # hub-side since schema 1; older rows may hold an agent's claim
        if usage is not None and s["job_id"] in usage:
            u["cpu_hours"] += usage[s["job_id"]]["cpu_seconds"] / 3600.0
            u["gpu_hours"] += usage[s["job_id"]]["gpu_seconds"] / 3600.0
    rows = [users[k] for k in sorted(users)]
    for r in rows:
        r["hours"] = round(r["hours"], 4)
        for k in ("cpu_hours", "gpu_hours"):
            if r[k] is not None:
                r[k] = round(r[k], 4)
    totals: dict[str, Any] = {
        k: sum(r[k] for r in rows) for k in ("sessions", "live_sessions", "bytes_in", "bytes_out")
    }
    totals["hours"] = round(sum(r["hours"] for r in rows), 4)
    for k in ("cpu_hours", "gpu_hours"):
        totals[k] = round(sum(r[k] for r in rows), 4) if with_sacct else None
    return {
        "period": {"since": _iso(since), "until": _iso(until), "since_epoch": since, "until_epoch": until},
        "generated": _iso(now),
        "sacct": {"available": with_sacct, "note": sacct_note},
        "users": rows,
        "totals": totals,
    }


def render_table(report: dict[str, Any]) -> str:
    head = ["USER", "SESSIONS", "HOURS", "IN", "OUT", "CPU_HOURS", "GPU_HOURS"]

    def row(r: dict[str, Any], name: str) -> list[str]:
        def h(v: Any) -> str:
            return "-" if v is None else f"{v:.2f}"

        return [
            name,
            str(r["sessions"]),
            f"{r['hours']:.2f}",
            format_bytes(r["bytes_in"]),
            format_bytes(r["bytes_out"]),
            h(r["cpu_hours"]),
            h(r["gpu_hours"]),
        ]

    rows = [head] + [row(r, printable(r["user"])) for r in report["users"]]
    if report["users"]:
        rows.append(row(report["totals"], "TOTAL"))
    lines = [
        f"Sessions registered {report['period']['since']} .. {report['period']['until']}",
        f"CPU/GPU time: {report['sacct']['note']}",
        "",
    ]
    lines += render_rows(rows)
    if not report["users"]:
        lines.append("(no sessions in this period)")
    return "\n".join(lines)


def render_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in report["users"]:
        w.writerow([printable(r[k]) if k == "user" else "" if r[k] is None else r[k] for k in COLUMNS])
    return buf.getvalue()


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def report(
    db_path: str,
    *,
    since: float,
    until: float,
    user: str | None = None,
    sacct: str = "sacct",
    now: float | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    if until <= since:
        raise AccountingError("--until must be later than --since")
    sessions = load_sessions(db_path, since, until, user)
    usage, note = sacct_usage([s["job_id"] for s in sessions], sacct, run)
    return build_report(sessions, since, until, now, usage, note)
