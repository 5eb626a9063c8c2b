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

Schema versions (``PRAGMA user_version``), one ordered migration each (:data:`MIGRATIONS`):

- 0: the first schema.
- 1: adds ``node_reported`` and moves the old ``node`` values (which agents wrote) there, escaped.
- 2: adds the ``store_meta`` table: the broker version that last opened the database, so that an
  older broker refused by a newer database can say which version it needs.

Opening a store migrates it: a copy of the database is saved first (``<db>.schema<N>.bak``, the
state before the upgrade), then each pending migration runs in order, all in one transaction;
sessions keep their ids, ports and routes. A database of a NEWER schema than this code knows is
refused with :class:`SchemaTooNew`, which names the broker version it needs; it is not touched.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from wire.version import __version__

STATES = ("registered", "connected", "ready", "closed")
SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SchemaTooNew(Exception):
    """The database was written by a newer broker (its schema version is above :data:`SCHEMA_VERSION`)."""

    def __init__(self, path: str, version: int, written_by: str):
        self.path, self.version, self.written_by = path, version, written_by
        needs = f"broker {written_by} or newer" if written_by else f"a broker that knows schema version {version}"
        super().__init__(
            f"{path}: the session database has schema version {version}, newer than this broker's "
            f"({SCHEMA_VERSION}, broker {__version__}); it needs {needs}. Run that version, or restore "
            "the state directory's backup from before the upgrade (docs/deploy.md, Upgrades)"
        )


def _migrate_1_node_reported(db: sqlite3.Connection) -> None:
    """Version 1: before it, the agent's hello overwrote ``node``: that was the agent's claim."""
    from .untrusted import reported_name

    columns = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
    if "node_reported" in columns:
        return
    db.execute("ALTER TABLE sessions ADD COLUMN node_reported TEXT NOT NULL DEFAULT ''")
    rows = db.execute("SELECT id, node FROM sessions WHERE node != ''").fetchall()
    db.executemany(
        "UPDATE sessions SET node_reported = ?, node = '' WHERE id = ?",
        [(reported_name(node), sid) for sid, node in rows],
    )


def _migrate_2_store_meta(db: sqlite3.Connection) -> None:
    """Version 2: the ``store_meta`` table (the writing broker's version is set on every open)."""
    db.execute("CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


#: (version, migration) in order: migration N takes a database from version N-1 to N.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [
    (1, _migrate_1_node_reported),
    (2, _migrate_2_store_meta),
]


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
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._open_schema()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _open_schema(self) -> None:
        """Create a new database at :data:`SCHEMA_VERSION`, refuse a newer one, migrate an older one,
        and record this broker's version as the last writer."""
        has_sessions = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='sessions'").fetchone()
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(self.path, version, self._meta("written_by"))
        if not has_sessions:  # a new database: the current schema, in one transaction
            self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        elif version < SCHEMA_VERSION:
            self._migrate(version)
        self._db.execute(
            "INSERT INTO store_meta (key, value) VALUES ('written_by', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (__version__,),
        )

    def _meta(self, key: str) -> str:
        try:
            row = self._db.execute("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no store_meta table (before version 2)
            return ""
        return str(row[0]) if row else ""

    def _migrate(self, version: int) -> None:
        """Save a copy, then run the migrations after *version* in order, in one transaction."""
        if self.path != ":memory:":
            backup = sqlite3.connect(f"{self.path}.schema{version}.bak")
            try:
                self._db.backup(backup)
            finally:
                backup.close()
            os.chmod(f"{self.path}.schema{version}.bak", 0o600)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for target, migration in MIGRATIONS:
                if target > version:
                    migration(self._db)
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
