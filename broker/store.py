"""The session store: SQLite, the one truth for sessions, credentials and ports.

Contract:
- Every mutating method commits before it returns, so a caller may acknowledge the change
  (to the agent or to the REST client) only after the call returned.
- Only hashes of secrets are stored. Agent public keys are public material and stored as is.
- A session's hub-side ``port`` never changes once assigned; live (non-closed) sessions never
  share a port.
- Hub-side facts and agent claims are kept apart: ``job_id`` and ``node`` are written only
  through the REST API (the spawner); what the agent reports about its node is stored as
  ``node_reported``, already reduced to hostname characters (:mod:`broker.untrusted`).
- ``last_heartbeat`` is written in batches (:meth:`SessionStore.set_heartbeats`, with the
  periodic counters flush), so it may lag the agent's last heartbeat by one flush interval.

Schema versions (``PRAGMA user_version``): 0, the first; 1 adds ``node_reported`` and moves the
old ``node`` values (which agents wrote) there, escaped. Opening a store migrates it.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

STATES = ("registered", "connected", "ready", "closed")
SCHEMA_VERSION = 1
LIVE_STATES = ("registered", "connected", "ready")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id               TEXT PRIMARY KEY,
    user             TEXT NOT NULL,
    server_name      TEXT NOT NULL DEFAULT '',
    routespec        TEXT NOT NULL,
    state            TEXT NOT NULL,
    port             INTEGER NOT NULL,
    secret_hash      TEXT,
    secret_expires   REAL,
    secret_spent_at  REAL,
    agent_key        TEXT,
    job_id           TEXT NOT NULL DEFAULT '',
    node             TEXT NOT NULL DEFAULT '',
    node_reported    TEXT NOT NULL DEFAULT '',
    created          REAL NOT NULL,
    connected_at     REAL,
    ready_at         REAL,
    closed_at        REAL,
    last_heartbeat   REAL,
    agent_connected  INTEGER NOT NULL DEFAULT 0,
    bytes_in         INTEGER NOT NULL DEFAULT 0,
    bytes_out        INTEGER NOT NULL DEFAULT 0,
    end_reason       TEXT NOT NULL DEFAULT '',
    walltime_warning TEXT NOT NULL DEFAULT '',
    exit_status      INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS live_port ON sessions(port) WHERE state != 'closed';
CREATE INDEX IF NOT EXISTS by_state ON sessions(state);
"""


@dataclasses.dataclass
class Session:
    """One notebook server's tunnel session, as stored."""

    id: str
    user: str
    server_name: str
    routespec: str
    state: str
    port: int
    created: float
    secret_hash: str | None = None
    secret_expires: float | None = None
    secret_spent_at: float | None = None
    agent_key: str | None = None
    job_id: str = ""  # the batch system's job id, from the spawner (REST API) only
    node: str = ""  # the node, from the hub side (REST API) only
    node_reported: str = ""  # the node's name as the agent reported it (escaped, see broker.untrusted)
    connected_at: float | None = None
    ready_at: float | None = None
    closed_at: float | None = None
    last_heartbeat: float | None = None
    agent_connected: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    end_reason: str = ""
    walltime_warning: str = ""
    exit_status: int | None = None

    @property
    def live(self) -> bool:
        return self.state != "closed"

    @property
    def target(self) -> str:
        """The hub-side address of this session (what the spawner returns, what CHP routes to)."""
        return f"http://127.0.0.1:{self.port}"

    def public(self) -> dict[str, Any]:
        """The session as shown over the API and in ``broker status``: no credential material."""
        d = {k: getattr(self, k) for k in _PUBLIC_FIELDS}  # flat scalars: no asdict() deep copy
        d["agent_enrolled"] = self.agent_key is not None
        d["agent_connected"] = bool(self.agent_connected)
        d["target"] = self.target
        return d


_FIELDS = [f.name for f in dataclasses.fields(Session)]
_COLUMNS = ", ".join(_FIELDS)
_PUBLIC_FIELDS = [f for f in _FIELDS if f not in ("secret_hash", "secret_expires", "secret_spent_at", "agent_key")]


class SessionStore:
    """SQLite-backed session table. Not thread-safe: use from the broker's event loop only."""

    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        if path != ":memory:":
            os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Bring an older database to :data:`SCHEMA_VERSION` (in one transaction)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        from .untrusted import reported_name

        columns = {r[1] for r in self._db.execute("PRAGMA table_info(sessions)")}
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if "node_reported" not in columns:
                # before version 1 the agent's hello overwrote `node`: it was the agent's claim
                self._db.execute("ALTER TABLE sessions ADD COLUMN node_reported TEXT NOT NULL DEFAULT ''")
                rows = self._db.execute("SELECT id, node FROM sessions WHERE node != ''").fetchall()
                self._db.executemany(
                    "UPDATE sessions SET node_reported = ?, node = '' WHERE id = ?",
                    [(reported_name(node), sid) for sid, node in rows],
                )
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- reads ---------------------------------------------------------------------------
    def get(self, session_id: str) -> Session | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return Session(*row) if row else None

    def list(self, *, live_only: bool = True, state: str | None = None) -> list[Session]:
        """Sessions oldest first: live ones (default), all, or those in one *state* (indexed)."""
        q = f"SELECT {_COLUMNS} FROM sessions"
        args: tuple[str, ...] = ()
        if state is not None:
            q += " WHERE state = ?"
            args = (state,)
        elif live_only:
            q += " WHERE state != 'closed'"
        q += " ORDER BY created"
        return [Session(*r) for r in self._db.execute(q, args)]

    def count_by_state(self) -> dict[str, int]:
        """Live sessions per state (one aggregate query; for metrics)."""
        return dict(self._db.execute("SELECT state, COUNT(*) FROM sessions WHERE state != 'closed' GROUP BY state"))

    def live_ports(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT port FROM sessions WHERE state != 'closed'")}

    # -- writes --------------------------------------------------------------------------
    def create(self, session: Session) -> None:
        cols = ", ".join(_FIELDS)
        marks = ", ".join("?" for _ in _FIELDS)
        values = [getattr(session, f) for f in _FIELDS]
        self._db.execute(f"INSERT INTO sessions ({cols}) VALUES ({marks})", values)

    def update(self, session_id: str, **fields: Any) -> None:
        """Set *fields* on one session (committed on return)."""
        bad = set(fields) - set(_FIELDS) - {"id"}
        if bad or "id" in fields:
            raise ValueError(f"unknown session fields: {sorted(bad | ({'id'} & set(fields)))}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE sessions SET {sets} WHERE id = ?", [*fields.values(), session_id])

    def mark_all_disconnected(self) -> None:
        """No agent is connected (broker start): one statement for every live session."""
        self._db.execute("UPDATE sessions SET agent_connected = 0 WHERE state != 'closed' AND agent_connected != 0")

    def spend_secret(self, session_id: str, agent_key: str, now: float | None = None) -> bool:
        """Atomically mark the enrolment secret spent and bind *agent_key*.

        Returns False if the secret was already spent (a concurrent enrolment won).
        """
        now = time.time() if now is None else now
        cur = self._db.execute(
            "UPDATE sessions SET secret_spent_at = ?, agent_key = ?, secret_hash = NULL "
            "WHERE id = ? AND secret_spent_at IS NULL AND state != 'closed'",
            (now, agent_key, session_id),
        )
        return cur.rowcount == 1

    def set_heartbeats(self, beats: Iterable[tuple[str, float]]) -> None:
        """Set (session_id, last_heartbeat) of live sessions in one transaction (never moves back)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE sessions SET last_heartbeat = ? WHERE id = ? AND state != 'closed' "
                "AND (last_heartbeat IS NULL OR last_heartbeat < ?)",
                [(ts, sid, ts) for sid, ts in beats],
            )

    def add_bytes(self, counts: Iterable[tuple[str, int, int]]) -> None:
        """Add (session_id, bytes_in, bytes_out) increments in one transaction."""
        with self._db:
            self._db.executemany(
                "UPDATE sessions SET bytes_in = bytes_in + ?, bytes_out = bytes_out + ? WHERE id = ?",
                [(i, o, sid) for sid, i, o in counts],
            )
