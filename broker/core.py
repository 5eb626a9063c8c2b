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
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncssh
from traitlets import Float, Integer, List, Unicode, validate
from traitlets.config import Configurable

from wire import asyncssh_compat, contract
from wire.contract import Msg
from wire.hubapi import (
    DEFAULT_API_PREFIX,
    DEFAULT_BURST,
    DEFAULT_MAX_BODY,
    DEFAULT_RATE,
    DEFAULT_STRIP_HEADERS,
    HubApiPolicy,
    SessionRates,
)
from wire.tasks import TaskOwner
from wire.tunnel import SessionListener

from .acceptor import AgentAcceptor, server_options
from .control import ControlLimits
from .limits import AdmissionControl
from .log import get_logger
from .metrics import BrokerMetrics
from .options import OptionError, each, is_header_name, minimum, refuse_unknown
from .proxy import ROUTE_TAG_KEY, ChpClient, RoutePublisher, resolve_publisher
from .secrets import hash_secret, new_id, new_secret
from .ssh_server import AgentSSHServer
from .store import LIVE_STATES, Session, SessionStore
from .untrusted import reported_name

T = TypeVar("T")


class SessionNotFound(Exception):
    pass


class Broker(Configurable):
    """Owns the store, the SSH server, the session listeners and the route publisher.

    Options are traits (``c.Broker.<name>``); the objects it works with are constructor
    arguments: the session *store*, the SSH *host_key*, the *hub_api* address (and the API
    prefix the relay lets through), the CHP client *chp* (for the ``chp`` route publisher; None:
    publish no routes), where the SSH
    server listens (*ssh_listen*) and the name agents are told (*ssh_public_host*). Its parts are
    Configurables of their own, made with ``parent=self``: :class:`~broker.limits.AdmissionControl`
    (or the *admission* given) and the route publisher ``route_publisher_class`` names
    (:mod:`broker.proxy`), if any.

    The hub-API and control-channel limits are read once, when the broker is made, into
    :attr:`hub_api_policy`, :attr:`hub_api_rates` and :attr:`control_limits`.
    """

    # one option a line: the class reads as a table of its options
    # fmt: off
    # sessions and their agents' SSH connections
    enrol_ttl = Float(86400.0, help="Seconds an enrolment secret stays valid (covers time pending in the queue).").tag(config=True)
    tunnel_wait_timeout = Float(10.0, help="Seconds a hub-side connection waits for a reconnecting agent before it is closed.").tag(config=True)
    keepalive_interval = Float(15.0, help="Seconds between SSH keepalives to agents (0 disables).").tag(config=True)
    keepalive_count_max = Integer(3, help="Unanswered keepalives before an agent connection is dropped.").tag(config=True)
    login_timeout = Float(30.0, help="Seconds an SSH client has to authenticate (also how long a connection of a throttled source may wait for its turn).").tag(config=True)
    _not_negative = minimum({"enrol_ttl": 0, "tunnel_wait_timeout": 0, "keepalive_interval": 0,
                             "keepalive_count_max": 0, "login_timeout": 0})
    # the hub-API relay (wire/hubapi.py)
    max_hub_api_channels = Integer(64, help="Open hub-API channels allowed per agent connection (0: no cap).").tag(config=True)
    hub_api_strip_headers = List(Unicode(), list(DEFAULT_STRIP_HEADERS), help="Identity headers removed from every request on the hub-API relay (case insensitive, '_' = '-'), besides Forwarded, X-Forwarded-*, X-Real-Ip and the like, which always are. Include the header your hub's header authenticator trusts (RemoteUserAuthenticator.header_name).").tag(config=True)
    hub_api_max_body = Integer(DEFAULT_MAX_BODY, help="Largest request body (bytes) on the hub-API relay; larger ones get 413 (0: no cap).").tag(config=True)
    hub_api_rate = Float(DEFAULT_RATE, help="Hub-API requests per second per session, over all its channels (token bucket; more get 429; 0: no cap).").tag(config=True)
    hub_api_burst = Integer(DEFAULT_BURST, help="Hub-API requests a session may make at once before hub_api_rate applies (the token bucket's size).").tag(config=True)
    _header_names = each(is_header_name, "a header name", "hub_api_strip_headers")
    _hub_api_limits = minimum({"hub_api_max_body": 0, "hub_api_rate": 0, "hub_api_burst": 1})
    # the control channel (broker/control.py)
    control_rate = Float(10.0, help="Control messages per second an agent connection may send on average (0: no rate limit); a connection over the limit is closed. An honest agent sends a few per connection plus one heartbeat every NODE_AGENT_HEARTBEAT seconds.").tag(config=True)
    control_burst = Integer(100, help="Control messages an agent connection may send at once (the token bucket's size).").tag(config=True)
    control_queue = Integer(256, help="Control messages of one agent connection waiting to be handled, at most; a connection that fills the queue is closed.").tag(config=True)
    _control_limits = minimum({"control_rate": 0, "control_burst": 1, "control_queue": 1})

    # routes (broker/proxy.py)
    route_publisher_class = Unicode("chp", help="How session routes reach the proxy. 'chp': the broker publishes them to configurable-http-proxy and keeps them there (BrokerApp.proxy_api_url, proxy_auth_token). 'traefik': it keeps them in a file of Traefik's file provider (c.TraefikRoutePublisher; the hub runs jupyterhub-traefik-proxy's TraefikFileProviderProxy). 'none': it publishes no routes and only keeps the ports; the hub's own Proxy class adds the routes when the spawner returns (no proxy_auth_token needed). Or the import name of a broker.proxy.RoutePublisher subclass.").tag(config=True)

    counters_flush_interval = Float(5.0, help="Seconds between writes of the byte counters and heartbeats to the store (not an option; tests shorten it).")
    # fmt: on

    def __init__(
        self,
        *,
        store: SessionStore,
        host_key: asyncssh.SSHKey,
        hub_api: tuple[str, int],
        chp: ChpClient | None,
        hub_api_prefix: str = DEFAULT_API_PREFIX,
        ssh_listen: tuple[str, int] = ("127.0.0.1", 0),
        ssh_public_host: str = "",
        admission: AdmissionControl | None = None,
        **kwargs: Any,
    ):
        """*kwargs*: options (traits) and the ``parent``/``config`` of a Configurable."""
        refuse_unknown(type(self), kwargs)
        super().__init__(**kwargs)
        self.store = store
        self.host_key = host_key
        self.hub_api = hub_api
        self.ssh_listen = ssh_listen
        self.ssh_public_host = ssh_public_host
        self.ssh_port = 0
        self.log = get_logger()
        self.listeners: dict[str, SessionListener] = {}
        self.agents: dict[str, AgentSSHServer] = {}  # session id -> its current connection
        #: the value of ROUTE_TAG_KEY in the routes this broker publishes (its host key's
        #: fingerprint: stable across restarts, distinct between brokers sharing one CHP)
        self.route_tag = self.fingerprint
        self.routes = self._make_route_publisher(chp)
        self._changed = asyncio.Condition()
        self._tasks = TaskOwner(on_error=self._task_failed)
        self._ssh_server: AgentAcceptor | None = None
        # SSH admission control (pre-auth caps, per-source penalties): see broker/limits.py
        self.admission = admission if admission is not None else AdmissionControl(parent=self)
        self.metrics = BrokerMetrics(self)  # Prometheus metrics, served at GET /metrics
        # what hub-API direct channels let through (wire/hubapi.py); one token bucket per session
        self.hub_api_policy = HubApiPolicy(
            api_prefix=hub_api_prefix,
            strip_headers=tuple(self.hub_api_strip_headers),
            max_body=self.hub_api_max_body,
            rate=self.hub_api_rate,
            burst=self.hub_api_burst,
        )
        self.hub_api_rates = SessionRates(self.hub_api_policy.rate, self.hub_api_policy.burst)
        self.control_limits = ControlLimits(rate=self.control_rate, burst=self.control_burst, queue=self.control_queue)
        # session id -> time of the last heartbeat not yet written to the store
        self._heartbeats: dict[str, float] = {}

    @validate("route_publisher_class")
    def _valid_publisher(self, proposal: Any) -> str:
        try:
            resolve_publisher(proposal["value"])
        except ValueError as exc:
            raise OptionError(f"Broker.route_publisher_class: {exc}") from None
        return str(proposal["value"]).strip()

    def _make_route_publisher(self, chp: ChpClient | None) -> RoutePublisher | None:
        """The publisher ``route_publisher_class`` names (None: ``none``, or ``chp`` without a client)."""
        cls = resolve_publisher(self.route_publisher_class)
        if cls is None:
            return None
        if not cls.needs_chp:
            return cls(parent=self, desired=self._desired_routes, tag=self.route_tag)
        if chp is None:
            return None
        return cls(parent=self, chp=chp, desired=self._desired_routes, tag=self.route_tag)

    # -- task ownership ------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start a task the broker owns: :meth:`stop` cancels and awaits it."""
        return self._tasks.spawn(coro)

    def _task_failed(self, exc: BaseException) -> None:
        self.log.error("background task failed", error=repr(exc))

    # -- start / stop --------------------------------------------------------------------
    async def start(self) -> None:
        """Rebind listeners of live sessions at their stored ports, then start serving."""
        self.store.mark_all_disconnected()
        for s in self.store.list(live_only=True):
            await self._open_listener(s.id, s.port)
        asyncssh_compat.install()  # no empty MSG_IGNORE per packet under AEAD (docs/benchmarks.md)
        options = await server_options(
            server_factory=lambda: AgentSSHServer(self),
            server_host_keys=[self.host_key],
            encryption_algs=list(contract.ENCRYPTION_ALGS),
            login_timeout=self.login_timeout,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            allow_pty=False,
        )
        self._ssh_server = AgentAcceptor(
            self.admission,
            options,
            self.log,
            on_refused=lambda: self.metrics.on_connect_failure(None, False, refused=True),
        )
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
        await self._tasks.close()
        if self._ssh_server is not None:
            await self._ssh_server.wait_closed()
        if self.routes is not None:
            await self.routes.close()
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
            id=sid,
            user=user,
            server_name=server_name,
            routespec=routespec,
            state="registered",
            port=port,
            created=now,
            secret_hash=hash_secret(secret),
            secret_expires=now + self.enrol_ttl,
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
        self.store.update(
            session_id,
            state="closed",
            closed_at=time.time(),
            end_reason=reason[:200],
            agent_connected=0,
            exit_status=exit_status,
        )
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
    def agent_authenticated(self, agent: AgentSSHServer) -> None:
        """*agent* logged in: it becomes its session's connection (an older one is closed)."""
        sid = agent.session_id
        assert sid is not None
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

    def agent_disconnected(self, agent: AgentSSHServer, exc: Exception | None) -> None:
        """An authenticated connection ended: the session stays, its agent is marked away."""
        sid = agent.session_id
        assert sid is not None
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

    async def agent_message(self, agent: AgentSSHServer, msg: dict[str, Any]) -> None:
        """Handle one control message of *agent* (called in order, one at a time, per connection).

        Messages of a connection that a newer one replaced are ignored; those of a connection
        that just ended are still handled (an ``exit`` sent right before the end counts).
        A heartbeat costs no store access: it is written with the next counters flush.
        """
        sid = agent.session_id
        assert sid is not None
        kind = msg["type"]
        current = self.agents.get(sid)
        if current is not None and current is not agent:
            return
        now = time.time()
        if kind == Msg.HEARTBEAT:
            if current is agent:
                self._heartbeats[sid] = now
            return
        s = self.store.get(sid)
        if s is None or not s.live:
            return
        if kind == Msg.HELLO:
            refusal = contract.protocol_refusal(msg.get("protocol"))
            if refusal is not None:
                await self._refuse_agent(agent, refusal, msg.get("protocol"))
                return
            node = reported_name(msg.get("node"))
            claimed = msg.get("job_id")
            if s.job_id and claimed not in (None, "") and str(claimed) != s.job_id:
                # the job id is the spawner's (REST API); the agent's word is never taken. (An
                # honest agent may say hello before the spawner's PATCH: no job id to differ yet.)
                agent.log.warning("agent's job id ignored", reported=reported_name(str(claimed), 100), job_id=s.job_id)
            self.store.update(sid, node_reported=node, last_heartbeat=now)
            self._heartbeats.pop(sid, None)
            agent.log.info("agent hello", node_reported=node)
        elif kind == Msg.READY:
            if agent.tunnel is None:
                if agent.control is not None:
                    agent.control.fail("protocol", "ready before the tunnel was requested")
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
        elif kind == Msg.WALLTIME:
            self.store.update(sid, walltime_warning=str(msg.get("message", "walltime ending soon"))[:200])
        elif kind == Msg.EXIT:
            status = msg.get("status")
            status = status if isinstance(status, int) and not isinstance(status, bool) else None
            await self.close_session(sid, f"server exited with status {status}", exit_status=status)
            return
        else:
            agent.log.info("unknown control message ignored", kind=kind[:40])
        await self._notify()

    async def _refuse_agent(self, agent: AgentSSHServer, refusal: str, announced: Any) -> None:
        """*agent* speaks a protocol this broker cannot serve: close its session with *refusal* as
        the reason (the spawner shows it on the spawn page), then tell the agent (it prints the
        message in the job's output and stops) and drop its connection."""
        sid = agent.session_id
        assert sid is not None
        agent.log.warning("agent refused: unsupported protocol", announced=reported_name(str(announced), 20))
        if self.agents.get(sid) is agent:
            del self.agents[sid]  # the connection is closed below, after the answer
        await self.close_session(sid, refusal)
        if agent.control is not None:
            agent.control.send({"type": Msg.REFUSED, "message": refusal})
        if agent.conn is not None:
            agent.conn.close()

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
            raise PermissionError(
                f"host key {path} is readable by others (mode {oct(st.st_mode & 0o777)}); chmod 600 it"
            )
        return asyncssh.read_private_key(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.replace(path + ".tmp", path)
    return key


__all__ = ["Broker", "SessionNotFound", "LIVE_STATES", "load_or_create_host_key"]
