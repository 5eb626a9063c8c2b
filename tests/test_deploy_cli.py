"""What a deployment relies on, with a real ``broker serve`` subprocess: the version in one place,
systemd's readiness protocol (READY=1 only once the API answers, STOPPING=1 on SIGTERM), ``broker
status`` with no arguments (the runtime file), and upgrades of the session database (the committed
schema-1 fixture migrated at start keeping ports and routes; a newer database refused)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest

from wire.version import __version__

from broker_cli import PY, TOKEN, Served, clean_env, run
from harness import Chp, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "store-schema1.sqlite"


# -- one version -----------------------------------------------------------------------------


def test_broker_and_node_agent_print_the_one_version(tmp_path):
    r = run(tmp_path, ["--version"], clean_env(tmp_path))
    assert (r.returncode, r.stdout.strip()) == (0, __version__), r.stderr
    # node-agent prints it without importing the hub side (a compute node has no broker package)
    code = (
        "import sys, node_agent.cli as c; rc = c.main(['--version']); "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('broker', 'hub_plugin')], 'imports broker'; "
        "sys.exit(rc)"
    )
    r = subprocess.run([PY, "-c", code], env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, __version__), r.stderr
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "wire.version.__version__"' in pyproject


# -- systemd readiness --------------------------------------------------------------------------


def _api_answers(url: str, token: str) -> int:
    req = urllib.request.Request(url + "/api/sessions", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def test_serve_notifies_ready_only_once_the_api_answers_and_stopping_on_sigterm(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(60)
    served = Served(tmp_path, str(tmp_path / "state"))
    served.env["NOTIFY_SOCKET"] = notify_path
    served.start()
    try:
        assert sock.recv(4096) == b"READY=1"
        # at READY the API answers at once, and the runtime file is in place (0600)
        runtime = tmp_path / "state" / "runtime.json"
        assert _api_answers(json.loads(runtime.read_text())["api_url"], TOKEN) == 200
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o600
        assert served.stop() == 0
        assert sock.recv(4096) == b"STOPPING=1"
        assert not runtime.exists()  # a stopped broker leaves no token behind
    finally:
        served.stop()
        sock.close()


# -- broker status with no arguments ------------------------------------------------------------


def test_status_without_arguments_finds_the_broker_through_the_runtime_file(tmp_path):
    served = Served(tmp_path, str(tmp_path / "broker-state")).start()  # the default state_dir name
    try:
        served.api("POST", "/api/sessions", {"user": "ada", "server_name": "", "routespec": "/user/ada/"})
        # in the directory of the state dir, no token anywhere in the environment
        env = clean_env(tmp_path)
        assert "BROKER_API_TOKEN" not in env
        r = run(tmp_path, ["status"], env)
        assert r.returncode == 0, r.stderr
        assert "ada" in r.stdout and "registered" in r.stdout
        assert TOKEN not in r.stdout + r.stderr
        # from elsewhere, with a broker_config.py naming the state directory
        other = tmp_path / "elsewhere"
        other.mkdir()
        (other / "broker_config.py").write_text(f"c.BrokerApp.state_dir = {served.state_dir!r}\n")
        r = run(other, ["status", "--json"], env)
        assert r.returncode == 0, r.stderr
        assert [s["user"] for s in json.loads(r.stdout)] == ["ada"]
    finally:
        served.stop()
    # broker stopped: its runtime file is gone, and the message says what to pass
    r = run(tmp_path, ["status"], clean_env(tmp_path))
    assert r.returncode == 1
    assert "runtime.json does not exist" in r.stderr and "--config-file" in r.stderr, r.stderr
    assert "BROKER_API_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_status_without_access_says_what_to_pass(tmp_path):
    r = run(tmp_path, ["status"], clean_env(tmp_path))
    assert r.returncode == 1
    err = r.stderr
    assert err.startswith("broker status: no API token"), err
    assert "./broker_config.py" in err and "/etc/jupyterhub-hpc-broker/broker_config.py" in err
    assert "--BrokerApp.api_url" in err and "Traceback" not in err


# -- upgrades of the session database -------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_schema1_database_is_migrated_at_start_keeping_ports_and_routes(tmp_path):
    """tests/fixtures/store-schema1.sqlite was written by the release with schema 1 (see
    make_store_schema1.py): its live sessions come back on their ports, its ready ones routed."""
    before = sqlite3.connect(FIXTURE)
    assert before.execute("PRAGMA user_version").fetchone()[0] == 1
    rows = {r[0]: r[1:] for r in before.execute("SELECT id, port, routespec, state FROM sessions")}
    before.close()
    busy = [p for p, _, s in rows.values() if s != "closed" and not _port_free(p)]
    if busy:
        pytest.fail(f"the fixture's ports {busy} are taken on this machine")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(FIXTURE, state / "broker.sqlite")
    chp = Chp().start()
    served = Served(tmp_path, str(state))
    served.args = [a for a in served.args if not a.startswith(("--BrokerApp.proxy_api_url=", "--RoutePublisher."))]
    served.args += [f"--BrokerApp.proxy_api_url={chp.api_url}", "--RoutePublisher.reconcile_interval=1"]
    served.env["CONFIGPROXY_AUTH_TOKEN"] = chp.token
    try:
        served.start()
        live = {s["id"]: s for s in served.api("GET", "/api/sessions")["sessions"]}
        assert set(live) == {sid for sid, (_, _, st) in rows.items() if st != "closed"}
        for sid, s in live.items():
            port, routespec, st = rows[sid]
            assert (s["port"], s["routespec"], s["state"]) == (port, routespec, st)
            assert s["target"] == f"http://127.0.0.1:{port}"
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # its listener is back

        def routes() -> dict:
            req = urllib.request.Request(chp.api_url + "/api/routes", headers={"Authorization": f"token {chp.token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())

        want = {routespec.rstrip("/"): port for port, routespec, st in rows.values() if st == "ready"}
        got = wait_until(lambda: {k: v for k, v in routes().items() if k in want} or None, 15, what="routes")
        assert {k: v["target"] for k, v in got.items()} == {k: f"http://127.0.0.1:{p}" for k, p in want.items()}
    finally:
        served.stop()
        chp.stop()
    db = sqlite3.connect(state / "broker.sqlite")
    from broker.store import SCHEMA_VERSION

    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT value FROM store_meta WHERE key='written_by'").fetchone()[0] == __version__
    closed = db.execute("SELECT state, port, end_reason FROM sessions WHERE id='s-closed-eve'").fetchone()
    assert closed == ("closed", 47315, "stopped by the hub")
    db.close()
    backup = sqlite3.connect(state / "broker.sqlite.schema1.bak")  # the state before the upgrade
    assert backup.execute("PRAGMA user_version").fetchone()[0] == 1
    assert backup.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == len(rows)
    backup.close()
    assert stat.S_IMODE(os.stat(state / "broker.sqlite.schema1.bak").st_mode) == 0o600


def test_serve_refuses_a_database_from_a_newer_broker(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(FIXTURE, state / "broker.sqlite")
    db = sqlite3.connect(state / "broker.sqlite")
    db.execute("CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO store_meta VALUES ('written_by', '7.3.1')")
    db.execute("PRAGMA user_version = 7")
    db.commit()
    db.close()
    served = Served(tmp_path, str(state))
    r = run(tmp_path, served.args, served.env)
    assert r.returncode == 2, r.stderr
    assert "BrokerApp.db_path" in r.stderr and "schema version 7" in r.stderr
    assert "needs broker 7.3.1 or newer" in r.stderr and "Traceback" not in r.stderr
    db = sqlite3.connect(state / "broker.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 7  # not touched
    db.close()
