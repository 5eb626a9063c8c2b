"""The test harness: what the test modules share, imported from here (never from one another).

* Paths: :data:`REPO`, :data:`ARTIFACTS` (``test-artifacts/``, kept by CI), :func:`tool_path`
  (``PATH`` with the venv's bin and the project's ``node_modules/.bin`` first); :func:`wait_until`,
  :func:`terminate`.
* :class:`Chp`: a real configurable-http-proxy on free loopback ports.
* The in-process broker: :class:`BrokerFactory` builds brokers in the test's event loop (real
  asyncssh server, real SQLite store, real listeners) in front of a loopback "hub API"; each comes
  wrapped in a :class:`Harness`, whose methods play the agent's side over real SSH (enrol,
  reconnect, serve a notebook on a unix socket), so that a test can behave like an honest agent
  or like an attacker. Stand-ins for the two servers a tunnel leads to, :func:`unix_http_server`
  (jupyterhub-singleuser) and :func:`echo_server` (the hub API), and :func:`http_get`.
* The whole stack: :func:`running_stack`, a :class:`devstack.stack.Stack` (hub + CHP + broker as
  processes) started with the ``PATH`` it is given, stopped and its logs saved on exit.

conftest.py turns these into fixtures (``chp``, ``make_broker``, ``harness``, ``stack``). No
helper here writes to this process's environment: child processes get theirs with ``env=``.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import asyncssh
import pytest
from jupyterhub.utils import url_escape_path

from broker.core import Broker
from broker.store import SessionStore
from devstack.stack import Stack, free_port, wait_http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")

T = TypeVar("T")


def tool_path() -> str:
    """PATH with the venv's bin and the project's node_modules/.bin first."""
    parts = [os.path.dirname(sys.executable), os.path.join(REPO, ".node", "node_modules", ".bin")]
    return os.pathsep.join(parts + [os.environ.get("PATH", "")])


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Poll *predicate* until it returns a true value (returned); fail the test after *timeout* s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM *proc* (if it still runs) and reap it; SIGKILL after *timeout* seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- a real configurable-http-proxy ------------------------------------------------------------


def find_chp() -> str:
    chp = shutil.which("configurable-http-proxy", path=tool_path())
    if not chp:
        pytest.fail("configurable-http-proxy is not installed: run `make chp` (make test does it)")
    return chp


class Chp:
    """A real configurable-http-proxy process on free loopback ports."""

    def __init__(self, default_target: str = "http://127.0.0.1:9"):
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.api_port = free_port()
        self.default_target = default_target
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Chp:
        env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=self.token, PATH=tool_path())
        self.proc = subprocess.Popen(
            [
                find_chp(),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
                "--default-target",
                self.default_target,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_http(self.api_url + "/api/routes", 30, self.proc, "configurable-http-proxy")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


# -- the in-process broker and the servers behind its tunnels ---------------------------------------

#: A hub-API request the broker's HTTP filter passes unchanged (wire/hubapi.py); raw bytes that
#: are not HTTP get 400 from the broker and never reach the hub.
HUB_API_PING = b"GET /hub/api/ HTTP/1.1\r\nHost: hub\r\n\r\n"


async def unix_http_server(path: str) -> asyncio.base_events.Server:
    """A server on the unix socket *path* answering every request with 200 and the request path
    as the body (what the tests put behind a tunnel instead of jupyterhub-singleuser)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            target = line.split()[1] if len(line.split()) > 1 else b"/"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(target), target)
            )
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


async def echo_server() -> asyncio.base_events.Server:
    """A loopback TCP "hub API": reads up to 1 KiB, answers ``b"hub-api:" + what it read``, closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        writer.write(b"hub-api:" + data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def http_get(port: int, path: str = "/x") -> tuple[int, bytes]:
    """One ``GET`` (HTTP/1.0) to 127.0.0.1:*port*; returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Harness:
    """A started in-process *broker* plus the agent's side of its protocol.

    *tmp* holds the unix sockets of :meth:`serve_unix`; *hub_api_port* is the port of the "hub
    API" the broker relays to. Servers started by :meth:`serve_unix` are listed in ``servers``
    and closed by :meth:`close_servers` (the fixture's teardown).
    """

    def __init__(self, broker: Broker, tmp: str, hub_api_port: int = 0):
        self.broker = broker
        self.tmp = tmp
        self.hub_api_port = hub_api_port
        self.servers: list[asyncio.base_events.Server] = []

    async def session(self, user: str = "zoe", routespec: str | None = None) -> Any:
        """Register a session as the hub does; returns (session, enrolment secret)."""
        return await self.broker.create_session(user, "", routespec or f"/user/{url_escape_path(user)}/")

    def ssh_options(self, **kw: Any) -> dict[str, Any]:
        """asyncssh.connect options of an agent: trusts the broker's host key only, no ssh
        config, no key agent; *kw* added."""
        host_key = self.broker.host_key.convert_to_public()
        return dict(known_hosts=([host_key], [], []), agent_path=None, config=None, **kw)

    async def enrol(
        self, session_id: str, secret: str, key: asyncssh.SSHKey | None = None
    ) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHKey]:
        """Log in as the session's agent with its enrolment secret, enrolling *key* (default: a
        fresh ed25519 key); returns (connection, key)."""
        key = key or asyncssh.generate_private_key("ssh-ed25519")
        pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
        conn = await asyncssh.connect(
            "127.0.0.1",
            self.broker.ssh_port,
            username=session_id,
            password=f"enrol {secret} {pub}",
            client_keys=None,
            preferred_auth="password",
            **self.ssh_options(),
        )
        return conn, key

    async def reconnect(self, session_id: str, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
        """Log in again as the session's agent with its enrolled *key*."""
        return await asyncssh.connect(
            "127.0.0.1",
            self.broker.ssh_port,
            username=session_id,
            client_keys=[key],
            preferred_auth="publickey",
            **self.ssh_options(),
        )

    async def serve_unix(self, name: str) -> str:
        """Start a :func:`unix_http_server` at ``<tmp>/<name>.sock``; returns its path."""
        path = os.path.join(self.tmp, f"{name}.sock")
        self.servers.append(await unix_http_server(path))
        return path

    def close_servers(self) -> None:
        for s in self.servers:
            s.close()


class BrokerFactory:
    """Builds started in-process brokers for one test; :meth:`close` stops them all.

    Each call makes a broker with its own store in *tmp* and a fresh host key, in front of *hub*
    (default: an :func:`echo_server`), without CHP, keepalives off and a 10 s login timeout;
    *broker_kw* override or add ``Broker(...)`` arguments. Returns it wrapped in *harness*.
    """

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.made: list[tuple[Harness, asyncio.base_events.Server, SessionStore]] = []

    async def __call__(
        self, *, hub: asyncio.base_events.Server | None = None, harness: type[Harness] = Harness, **broker_kw: Any
    ) -> Harness:
        hub = hub or await echo_server()
        hub_port = hub.sockets[0].getsockname()[1]
        store = SessionStore(os.path.join(self.tmp, f"broker{len(self.made) or ''}.sqlite"))
        kw: dict[str, Any] = dict(
            store=store,
            host_key=asyncssh.generate_private_key("ssh-ed25519"),
            hub_api=("127.0.0.1", hub_port),
            chp=None,
            keepalive_interval=0,
            login_timeout=10,
        )
        kw.update(broker_kw)
        broker = Broker(**kw)
        await broker.start()
        h = harness(broker, self.tmp, hub_port)
        self.made.append((h, hub, store))
        return h

    async def close(self) -> None:
        for h, hub, store in self.made:
            await h.broker.stop()
            h.close_servers()
            hub.close()
            store.close()


# -- the whole stack: hub + CHP + broker as processes --------------------------------------------


def save_stack_logs(stack: Stack, name: str) -> None:
    """Copy the stack's service logs, its local jobs' output (as ``job-<id>.log``) and its Slurm
    jobs' output (``slurm-out/``) into ``test-artifacts/<name>/``, as far as they can be read."""
    dest = os.path.join(ARTIFACTS, name)
    os.makedirs(dest, exist_ok=True)
    copies = [
        (log, dest)
        for log in glob.glob(os.path.join(stack.logs, "*.log"))
        + glob.glob(os.path.join(stack.workdir, "slurm-out", "*.log"))
    ]
    copies += [
        (out, os.path.join(dest, f"job-{out.split(os.sep)[-2]}.log"))
        for out in glob.glob(os.path.join(stack.workdir, "spool", "*", "output.log"))
    ]
    for src, to in copies:
        try:
            shutil.copy(src, to)
        except OSError:  # best effort: a log that cannot be read is not the test's failure
            pass


@contextmanager
def running_stack(workdir: str, *, path: str, logs: str | None = None, **stack_kw: Any) -> Iterator[Stack]:
    """A started :class:`~devstack.stack.Stack` in *workdir* whose services get *path* as their
    ``PATH`` (after the interpreter's bin directory); *stack_kw* are the Stack's other settings.
    On exit (also when starting fails) it is stopped and, with *logs*, its logs are saved to
    ``test-artifacts/<logs>/``."""
    stack = Stack(str(workdir), path=path, **stack_kw)
    try:
        yield stack.start()
    finally:
        stack.stop()
        if logs:
            save_stack_logs(stack, logs)
