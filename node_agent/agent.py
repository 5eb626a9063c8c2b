"""``node-agent run``: connect out to the broker, supervise the notebook server, carry its traffic.

Sequence (docs/design.md, "A spawn, step by step", steps 4-6):

1. Generate an ephemeral SSH key; connect to the broker with its host key pinned; enrol with
   the one-time secret (spent by the broker) — reconnects authenticate with the key only.
   On each connection, say ``hello`` with the protocol version (:mod:`wire.contract`) and wait
   for the broker's answer: a broker that cannot serve this agent's version answers
   ``refused`` with a message for the user; the agent prints it and stops for good (exit 77).
2. Ask for the one remote forward (``127.0.0.1``, port 0: the broker picks the session's port);
   hub-side connections arrive as channels and are connected to the server's unix socket.
3. Open a node-local listener on ``127.0.0.1:0`` that relays to the hub API through the tunnel
   (direct channel), and point ``JUPYTERHUB_API_URL`` at it. The relay speaks HTTP: only requests
   under the path of ``JUPYTERHUB_API_URL`` (``<base_url>hub/api/``) go into the tunnel, with
   forwarding and identity headers removed; anything else is answered 403 on the node
   (:mod:`wire.hubapi`; the broker applies the same filter, and the body and rate caps). Only
   processes of the agent's own user that it can see (its container's PID namespace) may
   connect (:mod:`wire.peercred`): on a shared node another user's or another job's process is
   answered 403 and uses none of the session's rate budget.
4. Start ``jupyterhub-singleuser`` on a unix socket in a fresh 0700 directory; report ``ready``
   on the control channel only once the server answers HTTP.
5. Heartbeat; on a lost connection reconnect with capped, jittered backoff while the server
   keeps running; on SIGTERM/SIGINT pass the signal on; exit with the server's exit status.
6. On SIGUSR1 (the batch system's walltime warning, ``--signal``): tell the broker, and write the
   notice file named by ``JUPYTERHUB_WALLTIME_NOTICE_FILE`` in the server's environment (in the
   private socket directory), which JupyterLab's time-left extension reads
   (:mod:`lab_timeleft`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncssh
from asyncssh.forward import SSHForwarder

from wire import asyncssh_compat, contract
from wire.contract import Msg
from wire.hubapi import Denial, HubApiPolicy, api_prefix_of
from wire.hubrelay import FilteredRelay
from wire.tasks import TaskOwner
from wire.tunnel import Tunnel

from .backoff import Backoff
from .probe import http_status_over_unix
from .settings import Settings, SettingsError

#: Environment variables the notebook server must not inherit.
PRIVATE_VARS = contract.JOB_ENV
#: Seconds the agent waits for the broker's answer to ``hello`` before it tries a new connection.
HELLO_TIMEOUT_S = 30.0

#: After the server exits, how long the agent still tries to reach the broker to report it.
EXIT_REPORT_S = 30.0

#: The server's environment names the file the agent writes when the walltime warning arrives.
WALLTIME_NOTICE_VAR = "JUPYTERHUB_WALLTIME_NOTICE_FILE"

EXIT_CONFIG = 78  # EX_CONFIG
EXIT_REFUSED = 77  # EX_NOPERM: the broker refused us (spent/closed session)


def log(msg: str, **fields: Any) -> None:
    """One line to stderr (ends up in the job's output): never environments or secrets."""
    extra = " ".join(f"{k}={json.dumps(v, ensure_ascii=True)}" for k, v in fields.items())
    print(f"node-agent: {msg} {extra}".rstrip(), file=sys.stderr, flush=True)


class Refused(Exception):
    """The broker refused this agent for good (not a transient error)."""


class _Control(asyncssh.SSHTCPSession[bytes]):
    """The agent's end of the control channel: JSON lines out (hello, ready, heartbeat, walltime,
    exit), the broker's answers in (``ack``, ``refused``).

    :attr:`greeted` resolves with None when the broker acknowledges ``hello``, or with the
    broker's message when it refuses this agent; with an error if the channel ends first.
    """

    #: The broker's answers are short; anything longer is not one.
    MAX_LINE = 16 * 1024

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.greeted: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._buf = b""

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        *lines, self._buf = (self._buf + data).split(b"\n")
        if len(self._buf) > self.MAX_LINE:
            self._buf = b""
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict) or self.greeted.done():
                continue
            if msg.get("type") == Msg.REFUSED:
                self.greeted.set_result(str(msg.get("message") or "the broker refused this agent")[:500])
            elif msg.get("type") == Msg.ACK and msg.get("of") == Msg.HELLO:
                self.greeted.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.chan = None
        if not self.greeted.done():
            self.greeted.set_exception(ConnectionError("the control channel closed before the broker answered hello"))

    def send(self, msg: dict[str, Any]) -> None:
        if self.chan is not None:
            self.chan.write(json.dumps(msg).encode() + b"\n")


def rewrite_url_port(url: str, host: str, port: int) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(netloc=f"{host}:{port}"))


class Agent:
    def __init__(self, settings: Settings, cmd: list[str]):
        self.s = settings
        self.cmd = cmd
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.enrolled = False
        self.conn: asyncssh.SSHClientConnection | None = None
        self.control: _Control | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.sock_dir = ""
        self.sock_path = ""
        # path and header rules as the broker's; the body and rate caps are the broker's (per session)
        relay_policy = HubApiPolicy(api_prefix=api_prefix_of(settings.hub_api_url), max_body=0, rate=0)
        # only this job's processes (the server, its kernels and terminals) may use the relay: on a
        # shared node another user's or another container's connection is answered 403 (wire.peercred)
        self.hub_relay = FilteredRelay(
            "hub-api", relay_policy, self._hub_api_refused, wait_timeout=30.0, owner_uid=os.getuid()
        )
        self._lost = asyncio.Event()
        self._watchers = TaskOwner()  # owned; cancelled at exit

    @staticmethod
    def _hub_api_refused(denial: Denial) -> None:
        log(
            "hub API request refused on the node",
            status=denial.status,
            reason=denial.reason,
            sample=denial.sample[:80].decode("latin-1"),
        )

    # -- broker connection ---------------------------------------------------------------
    async def connect(self) -> None:
        """One connection attempt: login, forward, control channel, hello and its answer (+ ready if ready).

        Raises :class:`Refused` when the broker refuses this agent for good (authentication, host
        key, or a ``refused`` answer to hello), another error when the attempt may be retried.
        """
        asyncssh_compat.install()  # no empty MSG_IGNORE per packet under AEAD (docs/benchmarks.md)
        try:
            host_key = asyncssh.import_public_key(self.s.host_key)
        except (asyncssh.KeyImportError, ValueError):
            raise Refused("BROKER_HOST_KEY: not an OpenSSH public key") from None
        opts: dict[str, Any] = dict(
            username=self.s.session_id,
            known_hosts=([host_key], [], []),
            encryption_algs=list(contract.ENCRYPTION_ALGS),
            keepalive_interval=self.s.keepalive,
            keepalive_count_max=3,
            agent_path=None,
            config=None,
            connect_timeout=30,
        )
        if self.enrolled:
            opts.update(client_keys=[self.key], preferred_auth="publickey", password=None)
        else:
            pub = " ".join(self.key.export_public_key("openssh").decode().split()[:2])
            opts.update(
                client_keys=None,
                preferred_auth="password",
                password=f"{contract.ENROL_PREFIX}{self.s.enrol_secret} {pub}",
            )
        try:
            conn = await asyncssh.connect(self.s.ssh_host, self.s.ssh_port, **opts)
        except asyncssh.PermissionDenied:
            raise Refused("the broker refused authentication (secret spent or expired, or session closed)") from None
        except asyncssh.HostKeyNotVerifiable:
            raise Refused("the broker's host key does not match BROKER_HOST_KEY (possible impostor)") from None
        if not self.enrolled:
            self.enrolled = True
            self.s.enrol_secret = ""  # spent: forget it
        try:
            listener = await conn.create_server(
                lambda _h, _p: self._to_server(),
                "127.0.0.1",
                0,
                window=contract.CHANNEL_WINDOW,
                max_pktsize=contract.CHANNEL_MAX_PKTSIZE,
            )
            control = _Control()
            await conn.create_connection(lambda: control, contract.CONTROL_HOST, contract.CONTROL_PORT)
        except (asyncssh.Error, OSError) as exc:
            conn.close()
            raise ConnectionError(f"broker refused the tunnel: {exc}") from None
        control.send(
            {
                "type": Msg.HELLO,
                "protocol": self.s.protocol,
                "node": self.s.node,
                "job_id": self.s.job_id,
                "pid": os.getpid(),
            }
        )
        try:
            refusal = await asyncio.wait_for(control.greeted, HELLO_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            conn.close()
            raise ConnectionError(f"no answer to hello: {exc or 'timed out'}") from None
        if refusal is not None:
            conn.close()
            raise Refused(f"the broker refused this agent: {refusal}")
        self.conn = conn
        self.control = control
        hub_host, hub_port = self.s.hub_api_address
        self.hub_relay.attach(Tunnel(conn, hub_host, hub_port))
        if self.ready:
            control.send({"type": Msg.READY})
        log("connected to broker", hub_port=listener.get_port())
        self._lost.clear()
        self._watchers.spawn(self._watch(conn))

    async def _to_server(self) -> Any:
        """Connect one hub-side channel to the server's unix socket.

        A unix socket whose listen backlog is full refuses at once (EAGAIN, which asyncio reports
        as EINVAL) instead of queueing the connection like TCP does, so a burst of new
        connections (e.g. 1,000 clients) would fail some channels; retry those briefly.
        """
        loop = asyncio.get_running_loop()
        delay = 0.01
        for attempt in range(9):  # about 2.5 s in all
            try:
                _, peer = await loop.create_unix_connection(SSHForwarder, self.sock_path)
                return SSHForwarder(peer)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EINVAL) or attempt == 8:
                    raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def _watch(self, conn: asyncssh.SSHClientConnection) -> None:
        await conn.wait_closed()
        if self.conn is conn:
            self.conn = None
            self.control = None
            self._lost.set()

    async def connect_with_retry(self, backoff: Backoff) -> None:
        while True:
            try:
                await self.connect()
                backoff.reset()
                return
            except Refused:
                raise
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                delay = backoff.next_delay()
                log("broker unreachable; retrying", error=str(exc)[:200], delay=round(delay, 2))
                await asyncio.sleep(delay)

    # -- notebook server -----------------------------------------------------------------
    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_VARS}
        env["JUPYTERHUB_API_URL"] = rewrite_url_port(self.s.hub_api_url, "127.0.0.1", self.hub_relay.port)
        if env.get("JUPYTERHUB_ACTIVITY_URL"):
            env["JUPYTERHUB_ACTIVITY_URL"] = rewrite_url_port(
                env["JUPYTERHUB_ACTIVITY_URL"], "127.0.0.1", self.hub_relay.port
            )
        if env.get("JUPYTERHUB_SERVICE_URL"):
            # jupyter_server refuses --sock together with a non-default port (see environment notes)
            env["JUPYTERHUB_SERVICE_URL"] = rewrite_url_port(env["JUPYTERHUB_SERVICE_URL"], "127.0.0.1", 8888)
        env.setdefault("JUPYTERHUB_SERVICE_PREFIX", "/")
        if self.sock_dir:
            env[WALLTIME_NOTICE_VAR] = self.notice_path
        return env

    async def start_server(self) -> None:
        argv = [*self.cmd, f"--ServerApp.sock={self.sock_path}", "--ServerApp.sock_mode=0600"]
        # The walltime warning (SIGUSR1) is for the agent. A scheduler that signals the job's
        # whole process group (Grid Engine's s_rt, Slurm's --signal without B:) would otherwise
        # end the server with it (SIGUSR1's default action): the server starts with it ignored
        # (an ignored signal stays ignored across exec).
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, env=self.server_env(), stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            signal.signal(signal.SIGUSR1, previous)
        log("server started", pid=self.proc.pid)

    async def wait_server_ready(self) -> bool:
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        if not prefix.endswith("/"):
            prefix += "/"
        deadline = time.monotonic() + self.s.ready_timeout
        delay = 0.05
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                return False
            status = await http_status_over_unix(self.sock_path, prefix + "api")
            if status is not None and status < 500:
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)  # one HTTP request over a local unix socket: cheap to repeat
        return False

    # -- main ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Connect to the broker and start the server *concurrently* (the server's first hub-API
        calls wait in the hub relay until the tunnel is up), report ready, supervise, report exit.

        If the server exits before the first connection succeeds, connecting goes on for at most
        ``EXIT_REPORT_S`` so the broker (and the user's spawn page) still learns the exit status.
        If the broker refuses us for good, the server is stopped and the exit status is 77.
        """
        os.makedirs(self.s.runtime_dir, exist_ok=True)
        self.sock_dir = tempfile.mkdtemp(prefix="node-agent-", dir=self.s.runtime_dir)
        os.chmod(self.sock_dir, 0o700)
        self.sock_path = os.path.join(self.sock_dir, "server.sock")
        await self.hub_relay.start(0)
        loop = asyncio.get_running_loop()
        backoff = Backoff(cap=self.s.reconnect_cap)
        await self.start_server()
        assert self.proc is not None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._forward_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._walltime_warning)
        connecting = loop.create_task(self.connect_with_retry(backoff))
        server_exit = loop.create_task(self.proc.wait())
        await asyncio.wait({connecting, server_exit}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            log("server exited before the broker connection was up; still trying to report it", seconds=EXIT_REPORT_S)
            await asyncio.wait({connecting}, timeout=EXIT_REPORT_S)
            connecting.cancel()
        try:
            await connecting
        except Refused as exc:
            log(f"giving up: {exc}")
            await self._stop_server()
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            return EXIT_REFUSED
        except asyncio.CancelledError:
            pass  # the server is gone and the broker unreachable: nothing to report to
        if await self.wait_server_ready():
            self.ready = True
            if self.control is not None:
                self.control.send({"type": Msg.READY})
            log("server ready")
        supervisor = loop.create_task(self._supervise(backoff))
        try:
            status = await self.proc.wait()
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        log("server exited", status=status)
        if self.control is not None:
            self.control.send({"type": Msg.EXIT, "status": status})
            await asyncio.sleep(0.2)
        if self.conn is not None:
            self.conn.close()
        await self.hub_relay.close()
        await self._watchers.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        return status if status >= 0 else 128 - status

    async def _supervise(self, backoff: Backoff) -> None:
        """Heartbeat while connected; reconnect when the connection is lost."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.s.heartbeat)
            except asyncio.TimeoutError:
                if self.control is not None:
                    self.control.send({"type": Msg.HEARTBEAT})
                continue
            log("connection to broker lost; reconnecting")
            try:
                await self.connect_with_retry(backoff)
            except Refused as exc:
                log(f"broker refused reconnect, stopping server: {exc}")
                self._forward_signal(signal.SIGTERM)
                return

    async def _stop_server(self) -> None:
        """SIGTERM the server; SIGKILL after 10 s."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def _forward_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            log("passing signal to server", signal=signal.Signals(sig).name)
            self.proc.send_signal(sig)

    @property
    def notice_path(self) -> str:
        """The walltime-notice file in the private socket directory (read by the server's
        :mod:`lab_timeleft` extension through ``JUPYTERHUB_WALLTIME_NOTICE_FILE``)."""
        return os.path.join(self.sock_dir, "walltime-notice.json")

    def _walltime_warning(self) -> None:
        log("walltime warning received")
        message = "the job is close to its time limit"
        if self.sock_dir:
            write_notice(self.notice_path, message)
        if self.control is not None:
            self.control.send({"type": Msg.WALLTIME, "message": message})


def write_notice(path: str, message: str) -> None:
    """Write the walltime notice (JSON: message, epoch seconds) atomically, mode 0600."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"message": message, "at": time.time()}, f)
    os.replace(tmp, path)


def run(cmd: list[str]) -> int:
    """``node-agent run -- CMD``: the server's exit status (77: refused by the broker, 78: bad
    settings)."""
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        log(f"configuration error: {exc}")
        return EXIT_CONFIG
    if not cmd:
        log("configuration error: no server command given (node-agent run -- CMD ...)")
        return EXIT_CONFIG
    return asyncio.run(Agent(settings, cmd).run())
