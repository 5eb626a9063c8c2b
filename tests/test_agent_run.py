"""``node-agent run`` starts the notebook server while it connects to the broker: what happens
when the broker refuses it, and when the server exits before the broker can be reached; and the
agent runs with nothing of the project but ``node_agent`` and ``wire`` (what an image carries).

Real parts: an in-process broker (real asyncssh server, real SQLite store, real session
listeners) or a real ``broker serve``, the real ``node-agent`` command as a subprocess, and a small
Python "server" that records its pid and either stays up or exits with a chosen status (or the
benchmarks' HTTP server, ``bench/nodeserver.py``, in place of ``jupyterhub-singleuser``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import asyncssh
import pytest
import pytest_asyncio

from broker.core import Broker
from broker.store import SessionStore

from broker_cli import HUB, Served
from harness import REPO

pytestmark = pytest.mark.asyncio

SERVER = r"""
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
if sys.argv[2] == "exit":
    sys.exit(int(sys.argv[3]))
time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _hub_api() -> asyncio.base_events.Server:
    async def handle(reader, writer):
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Fixture:
    def __init__(self, tmp_path, hub_port: int):
        self.tmp = tmp_path
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.store = SessionStore(str(tmp_path / "broker.sqlite"))
        self.hub_port = hub_port
        self.ssh_port = _free_port()
        self.broker: Broker | None = None

    async def start_broker(self) -> Broker:
        self.broker = Broker(
            store=self.store,
            host_key=self.key,
            hub_api=("127.0.0.1", self.hub_port),
            chp=None,
            ssh_listen=("127.0.0.1", self.ssh_port),
            keepalive_interval=0,
        )
        await self.broker.start()
        return self.broker

    async def stop_broker(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None

    async def agent(self, session_id: str, secret: str, server_args: list[str]) -> asyncio.subprocess.Process:
        env = dict(
            os.environ,
            BROKER_SSH_HOST="127.0.0.1",
            BROKER_SSH_PORT=str(self.ssh_port),
            BROKER_HOST_KEY=self.key.export_public_key("openssh").decode(),
            BROKER_SESSION_ID=session_id,
            BROKER_ENROL_SECRET=secret,
            JUPYTERHUB_API_URL=f"http://127.0.0.1:{self.hub_port}/hub/api",
            JUPYTERHUB_SERVICE_PREFIX="/user/x/",
            NODE_AGENT_RUNTIME_DIR=str(self.tmp / "rt"),
            NODE_AGENT_RECONNECT_CAP="0.5",
            NODE_AGENT_JOB_ID="t1",
        )
        script = self.tmp / "server.py"
        script.write_text(SERVER)
        self.agent_log = open(self.tmp / "agent.log", "wb")
        return await asyncio.create_subprocess_exec(
            os.path.join(os.path.dirname(sys.executable), "node-agent"),
            "run",
            "--",
            sys.executable,
            str(script),
            *server_args,
            env=env,
            stdout=self.agent_log,
            stderr=asyncio.subprocess.STDOUT,
        )

    def log(self) -> str:
        return (self.tmp / "agent.log").read_text(errors="replace")


@pytest_asyncio.fixture
async def fx(tmp_path):
    hub = await _hub_api()
    f = Fixture(tmp_path, hub.sockets[0].getsockname()[1])
    yield f
    await f.stop_broker()
    f.store.close()
    hub.close()


async def _pid_from(path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never written")


async def test_refused_agent_stops_the_server_it_started_and_exits_77(fx, tmp_path):
    broker = await fx.start_broker()
    session, _secret = await broker.create_session("ann", "", "/user/ann/")
    pidfile = tmp_path / "server.pid"
    agent = await fx.agent(session.id, "not-the-secret", [str(pidfile), "stay"])
    rc = await asyncio.wait_for(agent.wait(), 60)
    assert rc == 77, fx.log()
    assert "giving up" in fx.log()
    # the server was started at once, before the login (it may not even have got to write its pid)
    m = re.search(r"server started pid=(\d+)", fx.log())
    assert m, fx.log()
    server_pid = int(m.group(1))
    deadline = time.monotonic() + 15
    while _alive(server_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not _alive(server_pid), "the agent left its server running after the broker refused it"
    assert broker.get(session.id).state == "registered"  # nothing was enrolled


async def test_server_exit_before_the_broker_is_reachable_is_still_reported(fx, tmp_path):
    broker = await fx.start_broker()
    session, secret = await broker.create_session("bob", "", "/user/bob/")
    await fx.stop_broker()  # the broker is down (same state and port come back below)
    pidfile = tmp_path / "server.pid"
    agent = await fx.agent(session.id, secret, [str(pidfile), "exit", "3"])
    server_pid = await _pid_from(pidfile)
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _alive(server_pid)
    await asyncio.sleep(1.0)  # the agent is retrying against a closed port
    assert agent.returncode is None, fx.log()
    broker = await fx.start_broker()
    rc = await asyncio.wait_for(agent.wait(), 60)
    assert rc == 3, fx.log()
    s = broker.store.get(session.id)
    assert s.state == "closed" and s.exit_status == 3, (s, fx.log())
    assert "status 3" in s.end_reason


# -- the node side alone ----------------------------------------------------------------------

#: Printed by the node-side interpreter: its sys.path, where node_agent came from, and which
#: hub-side modules it can import (none may be importable).
PROBE = r"""
import importlib, json, sys
import node_agent.agent, node_agent.cli
found = {}
for name in ("broker", "hub_plugin", "aiohttp", "traitlets", "jupyterhub", "structlog"):
    try:
        importlib.import_module(name)
        found[name] = True
    except ImportError:
        found[name] = False
print(json.dumps({"path": sys.path, "agent": node_agent.agent.__file__, "imports": found}))
"""


def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def node_side_tree(root) -> tuple[str, str]:
    """Copies of ``node_agent/`` and ``wire/`` in ``root/code``; asyncssh and the distributions it
    needs (its metadata's requirements, recursively, extras left out), linked from this
    interpreter's site-packages into ``root/site``. Returns (code, site)."""
    code, site = root / "code", root / "site"
    for package in ("node_agent", "wire"):
        shutil.copytree(os.path.join(REPO, package), code / package, ignore=shutil.ignore_patterns("__pycache__"))
    site.mkdir()
    todo, seen = ["asyncssh"], set()
    while todo:
        name = _dist_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or ()}:
            if top.endswith(".dist-info") or top in ("..", "__pycache__") or (site / top).exists():
                continue
            (site / top).symlink_to(dist.locate_file(top))
        todo += [r for r in dist.requires or () if "extra ==" not in r]
    assert {"asyncssh", "cryptography"} <= seen
    return str(code), str(site)


def node_side_env(code: str, site: str, home, **extra: str) -> dict[str, str]:
    """The whole environment of a node-side process: its sys.path is *code*, *site* and the
    standard library (run it with ``python -S``: no site-packages)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join((code, site)),
        **extra,
    }


async def test_agent_with_only_node_agent_wire_and_asyncssh_reaches_ready(tmp_path):
    """The node side as an image carries it: ``python -S -m node_agent.cli run`` with a
    ``sys.path`` of copies of ``node_agent/`` and ``wire/``, asyncssh with its dependencies and
    the standard library, against a real ``broker serve``: ready, traffic through the tunnel,
    a clean exit reported."""
    code, site = node_side_tree(tmp_path)
    env = node_side_env(code, site, tmp_path)
    probe = subprocess.run(
        [sys.executable, "-S", "-c", PROBE], env=env, cwd=code, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["imports"] == dict.fromkeys(seen["imports"], False), seen["imports"]  # no `import broker`
    assert seen["agent"] == os.path.join(code, "node_agent", "agent.py")
    stdlib = os.path.dirname(os.__file__)
    for entry in seen["path"]:
        entry = entry or code  # '' is the working directory
        assert entry in (code, site) or entry.startswith((os.path.dirname(stdlib), stdlib)), seen["path"]
        assert REPO not in entry and "site-packages" not in entry.replace(site, ""), seen["path"]

    served = Served(tmp_path, str(tmp_path / "state"))
    served.env["PYTHONPATH"] = REPO
    served.start()
    agent = None
    try:
        session = served.api("POST", "/api/sessions", {"user": "nina", "routespec": "/user/nina/"})
        ssh = session["ssh"]
        agent_env = node_side_env(
            code,
            site,
            tmp_path,
            BROKER_SSH_HOST=ssh["host"],
            BROKER_SSH_PORT=str(ssh["port"]),
            BROKER_HOST_KEY=ssh["host_key"],
            BROKER_SESSION_ID=session["id"],
            BROKER_ENROL_SECRET=session["secret"],
            JUPYTERHUB_API_URL=HUB,
            JUPYTERHUB_SERVICE_PREFIX="/user/nina/",
            NODE_AGENT_RUNTIME_DIR=str(tmp_path / "rt"),
        )
        server = [sys.executable, "-S", os.path.join(REPO, "bench", "nodeserver.py")]
        log = open(tmp_path / "agent.log", "wb")
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-S", "-m", "node_agent.cli", "run", "--", *server,
            env=agent_env, cwd=code, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and agent.returncode is None:
            state = served.api("GET", f"/api/sessions/{session['id']}")["state"]
            if state == "ready":
                break
            await asyncio.sleep(0.2)
        agent_log = (tmp_path / "agent.log").read_text(errors="replace")
        assert state == "ready", agent_log + served.output()
        with urllib.request.urlopen(f"{session['target']}/user/nina/small", timeout=10) as r:
            assert r.read() == b"hello, world\n"
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = served.api("GET", f"/api/sessions/{session['id']}")
            if s["state"] == "closed":
                break
            await asyncio.sleep(0.1)
        assert (s["state"], s["exit_status"]) == ("closed", 0), s
    finally:
        if agent is not None and agent.returncode is None:
            agent.kill()
            await agent.wait()
        assert served.stop() == 0
