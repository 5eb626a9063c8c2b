"""broker.store.SessionStore on a real SQLite file."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import time

import pytest

from broker.secrets import hash_secret
from broker.store import Session, SessionStore


def make(sid: str = "s1", port: int = 40001, state: str = "registered", user: str = "zoe", **kw) -> Session:
    return Session(
        id=sid,
        user=user,
        server_name=kw.pop("server_name", ""),
        routespec=f"/user/{user}/",
        state=state,
        port=port,
        created=kw.pop("created", time.time()),
        secret_hash=kw.pop("secret_hash", hash_secret("sekrit-" + sid)),
        **kw,
    )


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "state" / "broker.sqlite")


@pytest.fixture
def store(db_path):
    s = SessionStore(db_path)
    yield s
    s.close()


def raw(db_path: str, sid: str) -> dict:
    """Read a row through a second, independent connection."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        return dict(row) if row else {}
    finally:
        con.close()


def test_create_get_roundtrip(store):
    s = make(job_id="123", node="n1")
    store.create(s)
    got = store.get("s1")
    assert got == s
    assert store.get("nope") is None


def test_create_visible_to_second_connection_before_return(store, db_path):
    store.create(make())
    row = raw(db_path, "s1")
    assert row["user"] == "zoe" and row["port"] == 40001 and row["state"] == "registered"


def test_update_visible_to_second_connection_before_return(store, db_path):
    store.create(make())
    store.update("s1", state="ready", job_id="4242", node="cn01", ready_at=12.5)
    row = raw(db_path, "s1")
    assert (row["state"], row["job_id"], row["node"], row["ready_at"]) == ("ready", "4242", "cn01", 12.5)


def test_persist_across_reopen(db_path):
    st = SessionStore(db_path)
    st.create(make("a", 40001, created=1.0))
    st.create(make("b", 40002, created=2.0, user="秀樹"))
    st.update("a", state="connected", agent_connected=1)
    st.close()
    st2 = SessionStore(db_path)
    try:
        assert [s.id for s in st2.list()] == ["a", "b"]
        a = st2.get("a")
        assert a.state == "connected" and a.agent_connected == 1
        assert st2.get("b").user == "秀樹"
    finally:
        st2.close()


def test_list_live_only_and_all_ordered_by_created(store):
    store.create(make("late", 40003, created=30.0))
    store.create(make("early", 40001, created=10.0))
    store.create(make("mid", 40002, created=20.0))
    store.update("mid", state="closed")
    assert [s.id for s in store.list()] == ["early", "late"]
    assert [s.id for s in store.list(live_only=True)] == ["early", "late"]
    assert [s.id for s in store.list(live_only=False)] == ["early", "mid", "late"]
    assert store.live_ports() == {40001, 40003}


def test_list_by_state_and_count_by_state(store):
    store.create(make("r1", 40011, created=3.0))
    store.create(make("r2", 40012, created=1.0))
    store.create(make("ok", 40013, created=2.0))
    store.create(make("gone", 40014, created=4.0))
    store.update("ok", state="ready")
    store.update("gone", state="closed")
    assert [s.id for s in store.list(state="registered")] == ["r2", "r1"]
    assert [s.id for s in store.list(state="ready")] == ["ok"]
    assert [s.id for s in store.list(state="closed")] == ["gone"]
    assert store.count_by_state() == {"registered": 2, "ready": 1}  # closed ones are not live


def test_live_ports_unique(store):
    store.create(make("a", 40001))
    with pytest.raises(sqlite3.IntegrityError):
        store.create(make("b", 40001))
    assert store.get("b") is None


@pytest.mark.parametrize("state", ["registered", "connected", "ready"])
def test_live_port_unique_in_every_live_state(store, state):
    store.create(make("a", 40001, state=state))
    with pytest.raises(sqlite3.IntegrityError):
        store.create(make("b", 40001))


def test_closed_session_port_may_be_reused(store):
    store.create(make("a", 40001))
    store.update("a", state="closed")
    store.create(make("b", 40001))
    assert store.get("b").port == 40001
    # ...but not reopened while the new one is live
    with pytest.raises(sqlite3.IntegrityError):
        store.update("a", state="ready")


def test_duplicate_id_refused(store):
    store.create(make("a", 40001))
    with pytest.raises(sqlite3.IntegrityError):
        store.create(make("a", 40002))


def test_spend_secret_once(store, db_path):
    store.create(make())
    assert raw(db_path, "s1")["secret_hash"] == hash_secret("sekrit-s1")
    assert store.spend_secret("s1", "ssh-ed25519 AAAAkey1", now=100.0) is True
    row = raw(db_path, "s1")  # committed before return
    assert row["secret_hash"] is None
    assert row["secret_spent_at"] == 100.0
    assert row["agent_key"] == "ssh-ed25519 AAAAkey1"
    # second attempt loses and does not rebind the key
    assert store.spend_secret("s1", "ssh-ed25519 AAAAkey2", now=200.0) is False
    s = store.get("s1")
    assert s.agent_key == "ssh-ed25519 AAAAkey1" and s.secret_spent_at == 100.0


def test_spend_secret_unknown_or_closed(store):
    assert store.spend_secret("nope", "k") is False
    store.create(make())
    store.update("s1", state="closed")
    assert store.spend_secret("s1", "k") is False
    assert store.get("s1").agent_key is None


def test_spend_secret_from_two_connections_only_one_wins(db_path):
    a, b = SessionStore(db_path), SessionStore(db_path)
    try:
        a.create(make())
        results = [a.spend_secret("s1", "ka"), b.spend_secret("s1", "kb")]
        assert results == [True, False]
        assert b.get("s1").agent_key == "ka"
    finally:
        a.close()
        b.close()


def test_add_bytes(store, db_path):
    store.create(make("a", 40001))
    store.create(make("b", 40002))
    store.add_bytes([("a", 10, 20), ("b", 1, 2)])
    store.add_bytes([("a", 5, 0), ("missing", 9, 9)])
    store.add_bytes([])
    ra, rb = raw(db_path, "a"), raw(db_path, "b")
    assert (ra["bytes_in"], ra["bytes_out"]) == (15, 20)
    assert (rb["bytes_in"], rb["bytes_out"]) == (1, 2)


@pytest.mark.parametrize(
    "fields",
    [
        {"bogus": 1},
        {"id": "other"},
        {"user; DROP TABLE sessions; --": 1},
        {"state": "running"},
        {"state": ""},
        {"state": "READY"},
    ],
)
def test_update_rejects_unknown_fields_and_states(store, fields):
    store.create(make())
    before = store.get("s1")
    with pytest.raises(ValueError):
        store.update("s1", **fields)
    assert store.get("s1") == before


@pytest.mark.parametrize("state", ["registered", "connected", "ready", "closed"])
def test_update_accepts_every_state(store, state):
    store.create(make())
    store.update("s1", state=state)
    assert store.get("s1").state == state


def test_public_has_no_credential_material(store):
    s = make(agent_key="ssh-ed25519 AAAAsecretish", secret_expires=5.0, secret_spent_at=4.0)
    store.create(s)
    pub = store.get("s1").public()
    for k in ("secret_hash", "agent_key", "secret_expires", "secret_spent_at"):
        assert k not in pub
    text = repr(pub)
    assert hash_secret("sekrit-s1") not in text
    assert "AAAAsecretish" not in text
    assert pub["agent_enrolled"] is True
    assert pub["agent_connected"] is False
    assert pub["target"] == "http://127.0.0.1:40001"
    assert pub["user"] == "zoe" and pub["port"] == 40001 and pub["id"] == "s1"
    # every other field is shown
    hidden = {"secret_hash", "agent_key", "secret_expires", "secret_spent_at"}
    assert {f.name for f in dataclasses.fields(Session)} - hidden <= set(pub)


def test_public_not_enrolled():
    assert make().public()["agent_enrolled"] is False


def test_db_file_mode_0600(db_path, store):
    store.create(make())
    for suffix in ("", "-wal", "-shm"):
        p = db_path + suffix
        if os.path.exists(p):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert os.path.exists(db_path)
    assert stat.S_IMODE(os.stat(os.path.dirname(db_path)).st_mode) == 0o700


def test_db_file_mode_tightened_on_reopen(db_path):
    SessionStore(db_path).close()
    os.chmod(db_path, 0o644)
    SessionStore(db_path).close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_memory_store():
    st = SessionStore(":memory:")
    st.create(make())
    assert st.get("s1").user == "zoe"
    st.close()


def test_mark_all_disconnected_touches_live_sessions_only(store):
    store.create(make("a", 40021, created=1.0))
    store.create(make("b", 40022, created=2.0))
    store.update("a", agent_connected=1)
    store.update("b", agent_connected=1, state="closed")
    store.mark_all_disconnected()
    assert store.get("a").agent_connected == 0
    assert store.get("b").agent_connected == 1  # a closed session's record is history: left as it was


# -- schema versions and upgrades -------------------------------------------------------------


def test_new_database_is_created_at_the_current_schema_with_the_writer_recorded(db_path):
    from broker.store import SCHEMA_VERSION
    from wire.version import __version__

    s = SessionStore(db_path)
    try:
        assert s.schema_version == SCHEMA_VERSION
        assert s._meta("written_by") == __version__
    finally:
        s.close()
    assert not [p for p in os.listdir(os.path.dirname(db_path)) if ".bak" in p]  # nothing to back up


def test_migrations_are_ordered_and_end_at_the_schema_version():
    from broker.store import MIGRATIONS, SCHEMA_VERSION

    versions = [v for v, _ in MIGRATIONS]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_from_a_newer_schema_is_refused_naming_the_version_it_needs(db_path):
    from broker.store import SCHEMA_VERSION, SchemaTooNew

    SessionStore(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("UPDATE store_meta SET value = '9.1.0' WHERE key = 'written_by'")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew) as e:
        SessionStore(db_path)
    text = str(e.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in text and "broker 9.1.0 or newer" in text, text
    db = sqlite3.connect(db_path)  # untouched
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert db.execute("SELECT value FROM store_meta WHERE key = 'written_by'").fetchone()[0] == "9.1.0"
    db.close()
