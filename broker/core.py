"""The broker: sessions, their listeners, agent connections and route publishing, in one loop.

Lifecycle of a session (see docs/design.md, "A spawn, step by step")::

    registered --agent logs in--> connected --agent reports ready--> ready --close--> closed

``ready`` survives agent reconnects and broker restarts: the session keeps its port, its
listener and its route; only ``agent_connected`` flips while the agent is away.

What the agent says is handled in order per connection (see ``ControlSession``) and trusted
only about itself: ``ready`` has an effect once per session (the first), heartbeats are kept
in memory and written with the periodic counters flush, the job id comes only from the
spawner (REST API) and the node name the agent reports is stored as ``node_reported``,
escaped (:mod:`broker.untrusted`).

Every task started here is owned: :meth:`spawn` keeps it, :meth:`stop` cancels and awaits it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable

import asyncssh

from .log import get_logger
from .metrics import BrokerMetrics
from .proxy import ROUTE_TAG_KEY, ChpClient, RoutePublisher
from .secrets import hash_secret, new_id, new_secret
from .store import LIVE_STATES, Session, SessionStore
from .acceptor import AgentAcceptor, server_options
from .hubapi import HubApiPolicy, SessionRates
from .control import ControlLimits
from .limits import AdmissionControl
from .tunnel import SessionListener
from .untrusted import reported_name

#: Agent → broker messages the control channel understands.
CONTROL_TYPES = ("hello", "ready", "heartbeat", "walltime", "exit")

ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]


class SessionNotFound(Exception):
    pass


class Broker:
    """Owns the store, the SSH server, the session listeners and the route publisher."""

    def __init__(
        self,
        *,
        store: SessionStore,
        host_key: asyncssh.SSHKey,
        hub_api: tuple[str, int],
        chp: ChpClient | None,
        ssh_listen: tuple[str, int] = ("127.0.0.1", 0),
        ssh_public_host: str = "",
        enrol_ttl: float = 86400.0,
        tunnel_wait_timeout: float = 10.0,
        reconcile_interval: float = 5.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        login_timeout: float = 30.0,
        counters_flush_interval: float = 5.0,
        admission: AdmissionControl | None = None,
        max_hub_api_channels: int = 64,
        hub_api_policy: HubApiPolicy | None = None,
        control_limits: ControlLimits | None = None,
    ):
        self.store = store
        self.host_key = host_key
        self.hub_api = hub_api
        self.ssh_listen = ssh_listen
        self.ssh_public_host = ssh_public_host
        self.ssh_port = 0
        self.enrol_ttl = enrol_ttl
        self.tunnel_wait_timeout = tunnel_wait_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.login_timeout = login_timeout
        self.counters_flush_interval = counters_flush_interval
        self.log = get_logger()
        self.listeners: dict[str, SessionListener] = {}
        self.agents: dict[str, Any] = {}  # session id -> AgentSSHServer (current connection)
        #: the value of ROUTE_TAG_KEY in the routes this broker publishes (its host key's
        #: fingerprint: stable across restarts, distinct between brokers sharing one CHP)
        self.route_tag = self.fingerprint
        self.routes = (RoutePublisher(chp, self._desired_routes, reconcile_interval, tag=self.route_tag)
                       if chp else None)
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ssh_server: AgentAcceptor | None = None
        self.auth_failures = 0
        self.metrics = BrokerMetrics(self)  # Prometheus metrics, served at GET /metrics
        # SSH admission control (pre-auth caps, per-source penalties) and per-connection
        # channel cap: see broker/limits.py and broker/ssh_server.py
        self.admission = admission if admission is not None else AdmissionControl()
        self.max_hub_api_channels = max_hub_api_channels
        # what hub-API direct channels let through (broker/hubapi.py); one token bucket per session
        self.hub_api_policy = hub_api_policy or HubApiPolicy()
        self.hub_api_rates = SessionRates(self.hub_api_policy.rate, self.hub_api_policy.burst)
        self.control_limits = control_limits or ControlLimits()
        # session id -> time of the last heartbeat not yet written to the store
        self._heartbeats: dict[str, float] = {}

    # -- task ownership ------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed", error=repr(task.exception()))

    # -- start / stop --------------------------------------------------------------------
    async def start(self) -> None:
        """Rebind listeners of live sessions at their stored ports, then start serving."""
        from .ssh_server import AgentSSHServer

        self.store.mark_all_disconnected()
        for s in self.store.list(live_only=True):
            await self._open_listener(s.id, s.port)
        options = await server_options(
            server_factory=self._counted_server_factory(AgentSSHServer),
            server_host_keys=[self.host_key],
            encryption_algs=ENCRYPTION_ALGS,
            login_timeout=self.login_timeout,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            allow_pty=False,
        )
        self._ssh_server = AgentAcceptor(self.admission, options, self.log,
                                         on_refused=lambda: self.metrics.on_connect_failure(None, False, refused=True))
        await self._ssh_server.start(self.ssh_listen[0], self.ssh_listen[1])
        self.ssh_port = self._ssh_server.port
        if self.routes is not None:
            self.spawn(self.routes.run())
        self.spawn(self._flush_counters_loop())
        self.log.info("broker started", ssh_port=self.ssh_port, live_sessions=len(self.listeners))

    async def stop(self) -> None:
        """Graceful stop: stop accepting, close agent connections, flush state, await tasks."""
        if self._ssh_server is not None:
            self._ssh_server.close()
        for agent in list(self.agents.values()):
            if agent.conn is not None:
                agent.conn.close()
        self._flush_counters()
        for listener in list(self.listeners.values()):
            await listener.close()
        self.listeners.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ssh_server is not None:
            await self._ssh_server.wait_closed()
        if self.routes is not None:
            await self.routes.chp.close()
        self.log.info("broker stopped")

    async def _open_listener(self, session_id: str, port: int = 0) -> int:
        listener = SessionListener(session_id, self.tunnel_wait_timeout)
        port = await listener.start(port)
        self.listeners[session_id] = listener
        return port

    # -- sessions (REST side) ------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.host_key.get_fingerprint("sha256")

    @property
    def public_host_key(self) -> str:
        return " ".join(self.host_key.export_public_key("openssh").decode().split()[:2])

    async def create_session(self, user: str, server_name: str, routespec: str) -> tuple[Session, str]:
        """Register a session: bind its listener, store it, return it and its one-time secret."""
        sid = new_id()
        secret = new_secret()
        listener = SessionListener(sid, self.tunnel_wait_timeout)
        port = await listener.start(0)
        now = time.time()
        session = Session(
            id=sid, user=user, server_name=server_name, routespec=routespec, state="registered",
            port=port, created=now, secret_hash=hash_secret(secret), secret_expires=now + self.enrol_ttl,
        )
        try:
            self.store.create(session)
        except Exception:
            await listener.close()
            raise
        self.listeners[sid] = listener
        self.metrics.on_created()
        self.log.info("session registered", session=sid, user=user, server=server_name, port=port)
        return session, secret

    def get(self, session_id: str) -> Session:
        s = self.store.get(session_id)
        if s is None:
            raise SessionNotFound(session_id)
        return s

    def update(self, session_id: str, **fields: Any) -> Session:
        self.get(session_id)
        self.store.update(session_id, **fields)
        self.spawn(self._notify())
        return self.get(session_id)

    async def close_session(self, session_id: str, reason: str, exit_status: int | None = None) -> Session:
        """Close a session: state first, then the tunnel, listener and route. Idempotent."""
        s = self.get(session_id)
        if s.state == "closed":
            return s
        self._flush_counters()
        self.store.update(session_id, state="closed", closed_at=time.time(), end_reason=reason[:200],
                          agent_connected=0, exit_status=exit_status)
        self.metrics.on_closed()
        agent = self.agents.pop(session_id, None)
        if agent is not None and agent.conn is not None:
            agent.conn.close()
        listener = self.listeners.pop(session_id, None)
        if listener is not None:
            await listener.close()
        if self.routes is not None and s.state == "ready":
            await self.routes.unpublish(s.routespec, s.target)
        self.log.info("session closed", session=session_id, user=s.user, reason=reason)
        await self._notify()
        return self.get(session_id)

    async def wait_for(self, session_id: str, states: set[str], timeout: float) -> Session:
        """Return when the session is in one of *states* or closed, or after *timeout*."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                s = self.get(session_id)
                if s.state in states or s.state == "closed":
                    return s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return s
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return self.get(session_id)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- agents (SSH side) ---------------------------------------------------------------
    def auth_failed(self, agent: Any, username: str, reason: str) -> None:
        self.auth_failures += 1
        self.metrics.on_auth_failure(reason)
        agent._metrics_auth_failed = True
        agent.log.warning("agent authentication failed", session=username, reason=reason)

    def agent_authenticated(self, agent: Any) -> None:
        sid = agent.session_id
        old = self.agents.get(sid)
        self.agents[sid] = agent
        if old is not None and old is not agent and old.conn is not None:
            old.log.info("replaced by a newer agent connection")
            old.conn.close()
        s = self.get(sid)
        fields: dict[str, Any] = {"agent_connected": 1, "last_heartbeat": time.time()}
        if s.state == "registered":
            fields.update(state="connected", connected_at=time.time())
            self.metrics.on_connected(s.created, fields["connected_at"])
        else:
            self.metrics.on_reconnect()
        self.store.update(sid, **fields)
        agent.log.info("agent connected", user=s.user)
        self.spawn(self._notify())

    def agent_disconnected(self, agent: Any, exc: Exception | None) -> None:
        sid = agent.session_id
        if self.agents.get(sid) is agent:
            del self.agents[sid]
            s = self.store.get(sid)
            fields: dict[str, Any] = {"agent_connected": 0}
            beat = self._heartbeats.pop(sid, None)
            if beat is not None:
                fields["last_heartbeat"] = beat
            if s is not None and s.live:
                self.store.update(sid, **fields)
            agent.log.info("agent disconnected", error=str(exc) if exc else None)
            self.spawn(self._notify())

    async def agent_message(self, agent: Any, msg: dict[str, Any]) -> None:
        """Handle one control message of *agent* (called in order, one at a time, per connection).

        Messages of a connection that a newer one replaced are ignored; those of a connection
        that just ended are still handled (an ``exit`` sent right before the end counts).
        A heartbeat costs no store access: it is written with the next counters flush.
        """
        sid = agent.session_id
        kind = msg["type"]
        current = self.agents.get(sid)
        if current is not None and current is not agent:
            return
        now = time.time()
        if kind == "heartbeat":
            if current is agent:
                self._heartbeats[sid] = now
            return
        s = self.store.get(sid)
        if s is None or not s.live:
            return
        if kind == "hello":
            node = reported_name(msg.get("node"))
            claimed = msg.get("job_id")
            if s.job_id and claimed not in (None, "") and str(claimed) != s.job_id:
                # the job id is the spawner's (REST API); the agent's word is never taken. (An
                # honest agent may say hello before the spawner's PATCH: no job id to differ yet.)
                agent.log.warning("agent's job id ignored", reported=reported_name(str(claimed), 100),
                                  job_id=s.job_id)
            self.store.update(sid, node_reported=node, last_heartbeat=now)
            self._heartbeats.pop(sid, None)
            agent.log.info("agent hello", node_reported=node)
        elif kind == "ready":
            if agent.tunnel is None:
                control = getattr(agent, "control", None)
                if control is not None:
                    control.fail("protocol", "ready before the tunnel was requested")
                else:
                    agent.reject("ready before the tunnel was requested")
                return
            if s.state == "ready":
                # a reconnect of a ready session: its route is the reconciler's to keep
                if self.routes is not None:
                    self.routes.wake()
                return
            self.store.update(sid, state="ready", ready_at=now, last_heartbeat=now)
            self.metrics.on_ready(s.created, s.connected_at, now)
            agent.log.info("session ready", user=s.user, port=s.port)
            if self.routes is not None:
                await self.routes.publish(s.routespec, s.target, self.route_data(s))
                after = self.store.get(sid)
                if after is None or after.state != "ready":
                    # closed while the route was being added: take it back
                    await self.routes.unpublish(s.routespec, s.target)
        elif kind == "walltime":
            self.store.update(sid, walltime_warning=str(msg.get("message", "walltime ending soon"))[:200])
        elif kind == "exit":
            status = msg.get("status")
            status = status if isinstance(status, int) and not isinstance(status, bool) else None
            await self.close_session(sid, f"server exited with status {status}", exit_status=status)
            return
        else:
            agent.log.info("unknown control message ignored", kind=kind[:40])
        await self._notify()

    def _counted_server_factory(self, server_class: Any) -> Any:
        """The SSH server factory, counting connections that end before they authenticate."""
        broker = self

        class CountedAgentServer(server_class):  # type: ignore[misc, valid-type]
            def connection_lost(self, exc: Exception | None) -> None:
                if not self.authenticated:  # (refusals by admission control are counted by the acceptor)
                    broker.metrics.on_connect_failure(exc, getattr(self, "_metrics_auth_failed", False))
                super().connection_lost(exc)

        return lambda: CountedAgentServer(self)

    # -- routes --------------------------------------------------------------------------
    def route_data(self, s: Session) -> dict[str, Any]:
        """The data of *s*'s CHP route.

        ``"jupyterhub": True`` marks the route as the hub's own, so the hub's check_routes
        compares it with what the spawner returned (the same target) and keeps it.
        ``ROUTE_TAG_KEY: route_tag`` marks it as this broker's: the reconciler deletes such
        routes once their session is not ready, and never touches routes without the tag.
        """
        return {"user": s.user, "server_name": s.server_name, "jupyterhub": True, ROUTE_TAG_KEY: self.route_tag}

    def _desired_routes(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {s.routespec: (s.target, self.route_data(s)) for s in self.store.list(state="ready")}

    # -- byte counters -------------------------------------------------------------------
    def _flush_counters(self) -> None:
        """Write the coalesced heartbeats and the listeners' byte counts (one transaction each)."""
        if self._heartbeats:
            beats, self._heartbeats = self._heartbeats, {}
            self.store.set_heartbeats(beats.items())
        counts = []
        for sid, listener in self.listeners.items():
            i, o = listener.take_counts()
            if i or o:
                counts.append((sid, i, o))
        if counts:
            self.store.add_bytes(counts)
            self.metrics.on_bytes(sum(c[1] for c in counts), sum(c[2] for c in counts))

    async def _flush_counters_loop(self) -> None:
        while True:
            await asyncio.sleep(self.counters_flush_interval)
            self._flush_counters()
            await self._expire_unenrolled()

    async def _expire_unenrolled(self) -> None:
        """Close sessions whose agent never enrolled before the secret expired (their port is freed)."""
        now = time.time()
        for s in self.store.list(state="registered"):
            if s.secret_expires is not None and now > s.secret_expires:
                await self.close_session(s.id, "enrolment secret expired before the agent connected")


def load_or_create_host_key(path: str) -> asyncssh.SSHKey:
    """The broker's persistent SSH host key: created on first start with mode 0600."""
    if os.path.exists(path):
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise PermissionError(f"host key {path} is readable by others (mode {oct(st.st_mode & 0o777)}); chmod 600 it")
        return asyncssh.read_private_key(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.replace(path + ".tmp", path)
    return key


__all__ = ["Broker", "SessionNotFound", "LIVE_STATES", "load_or_create_host_key"]
