"""The SSH server node agents connect to: authentication and the request policy in action.

Authentication (username = session id):

- *Enrolment* (first connection of a job): password authentication whose password is
  ``enrol <one-time secret> <agent public key in OpenSSH format>``. The secret must match the
  session's hash, be unspent and unexpired; it is then spent and the key bound to the session,
  both written to the store before the login succeeds.
- *Reconnect*: public-key authentication with exactly that session's bound key.

Everything after login is decided by :mod:`broker.policy`; anything not explicitly allowed
(shells, exec, subsystems, agent/X11 forwarding, unix sockets, other ports/hosts) is refused.

Denial-of-service limits (see :mod:`broker.limits`): a connection reaches this class only once
the broker's accept loop (:mod:`broker.acceptor`) admitted it — at once, or at its throttled
source's rate — before any SSH state or banner. Until its credential is verified it may be
evicted to make room for a newer connection of its source (:meth:`AgentSSHServer.evict`; the least
progressed first, see :attr:`AgentSSHServer.progress`); once verified it leaves the pre-auth
accounting. Failed authentication attempts count towards the source's penalty, and a connection is
closed after ``MAX_AUTH_TRIES`` failures. An authenticated connection may hold at most
``max_hub_api_channels`` (``c.Broker.max_hub_api_channels``) open direct channels to the hub API.
Its control channel is bounded by the broker's ``control_limits`` (:mod:`broker.control`): line
length, message rate, queue.

The server counts what happens to its connections itself (authentication failures by
:class:`~broker.reasons.AuthFailure`, connections that end unauthenticated, control channels it
closes) in the broker's metrics. It knows the broker only through :class:`BrokerCore`, the narrow
interface it needs (sessions, listeners, the hub API, task ownership, the agent callbacks), so
this module does not depend on :mod:`broker.core`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol, TypeVar

import asyncssh

from wire import contract
from wire.contract import Msg
from wire.hubapi import Denial, HubApiExchange, HubApiPolicy, SessionRates
from wire.hubrelay import open_filtered_hub_connection
from wire.ratelimit import TokenBucket
from wire.tunnel import SessionListener, Tunnel, TunnelAttachment

from . import policy
from .control import ControlLimits, LineSplitter, LineTooLong
from .limits import PROGRESS_AUTH, PROGRESS_KEY, AdmissionControl
from .metrics import BrokerMetrics
from .reasons import AuthFailure
from .secrets import verify_secret
from .store import SessionStore

T = TypeVar("T")

#: Failed authentication attempts on one connection before it is closed (OpenSSH MaxAuthTries).
MAX_AUTH_TRIES = 6


class BrokerCore(Protocol):
    """What the SSH server needs of the broker (:class:`broker.core.Broker` implements it)."""

    @property
    def store(self) -> SessionStore:
        """The sessions: looked up at login, secrets spent and keys bound there."""
        ...

    @property
    def listeners(self) -> Mapping[str, SessionListener]:
        """Each live session's hub-side listener, by session id (a granted forward attaches to it)."""
        ...

    @property
    def hub_api(self) -> tuple[str, int]:
        """The hub API's address: the only destination of direct channels."""
        ...

    @property
    def hub_api_policy(self) -> HubApiPolicy:
        """What the hub-API filter lets through."""
        ...

    @property
    def hub_api_rates(self) -> SessionRates:
        """The hub-API token bucket of each session."""
        ...

    @property
    def max_hub_api_channels(self) -> int:
        """Open hub-API channels allowed per connection (0: no cap)."""
        ...

    @property
    def control_limits(self) -> ControlLimits:
        """The limits of a control channel opened now."""
        ...

    @property
    def admission(self) -> AdmissionControl:
        """Admission control: pre-auth accounting, eviction and penalties."""
        ...

    @property
    def metrics(self) -> BrokerMetrics: ...

    @property
    def log(self) -> Any:
        """The broker's (structlog) logger."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start a task the broker owns (cancelled and awaited when it stops)."""
        ...

    def agent_authenticated(self, agent: AgentSSHServer) -> None:
        """*agent* logged in to its session (it replaces an older connection of the session)."""
        ...

    def agent_disconnected(self, agent: AgentSSHServer, exc: Exception | None) -> None:
        """An authenticated *agent*'s connection ended."""
        ...

    async def agent_message(self, agent: AgentSSHServer, msg: dict[str, Any]) -> None:
        """Handle one control message of *agent* (called in order, one at a time, per connection)."""
        ...


def normalise_public_key(text: str) -> str | None:
    """Return ``"<alg> <base64>"`` for an OpenSSH public key, or None if it isn't one."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError, TypeError):
        return None
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


class ControlSession(asyncssh.SSHTCPSession[bytes]):
    """The agent's control channel: newline-delimited JSON messages, handled in order.

    ``data_received`` only frames lines and admits them: each line costs a token of the
    connection's :class:`~wire.ratelimit.TokenBucket` and takes a place in a bounded queue.
    One reader task per channel parses and handles the queued messages in order, one at a time,
    yielding to the event loop after each, so one agent's messages never hold the broker's loop
    for more than one message's work. ``hello`` and ``ready`` have an effect once per connection;
    repeats are dropped here, before any store access.

    A line over the length limit, a message over the rate limit, a full queue or a malformed
    message closes the whole connection (logged once, counted in ``/metrics``); the messages
    not yet handled are dropped. When the agent closes the channel, the messages it sent before
    are still handled (an ``exit`` right before the end is not lost).
    """

    #: Message types that have an effect only the first time on one connection.
    ONCE_PER_CONNECTION = (Msg.HELLO, Msg.READY)

    def __init__(self, server: AgentSSHServer, limits: ControlLimits | None = None):
        self._server = server
        self.limits = limits or server.broker.control_limits
        self._lines = LineSplitter(self.limits.max_line)
        self._bucket = TokenBucket(self.limits.rate, self.limits.burst)
        # bounded by data_received (limits.queue); the end mark (None) always fits
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._seen: set[str] = set()
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.failed = False  # closed by the broker for exceeding a limit or bad input

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        self._reader = self._server.broker.spawn(self._read())

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.failed:
            return
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self.fail("line_too_long", "control message too long", exc.args[0])
            return
        for line in lines:
            if not self._bucket.take():
                self.fail("rate_limit", "control messages over the rate limit", line)
                return
            if not line.strip():
                continue
            if self._queue.qsize() >= self.limits.queue:
                self.fail("queue_full", "control message queue full", line)
                return
            self._queue.put_nowait(line)

    def fail(self, reason: str, why: str, sample: bytes = b"") -> None:
        """Close the connection for *reason* (one of ``CLOSE_REASONS``): logged and counted once."""
        if self.failed:
            return
        self.failed = True
        while not self._queue.empty():  # nothing more of this connection is handled
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        self._server.broker.metrics.on_control_closed(reason)
        self._server.reject(why, sample)

    async def _read(self) -> None:
        """Handle queued messages in order until the channel ends or fails."""
        while True:
            line = await self._queue.get()
            if line is None or self.failed:
                return
            try:
                msg = json.loads(line.decode("utf-8"))
                if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                    raise ValueError("not an object with a type")
            except (UnicodeDecodeError, ValueError):
                self.fail("malformed", "malformed control message", line)
                return
            kind = msg["type"]
            if kind in self.ONCE_PER_CONNECTION and kind in self._seen:
                pass  # a repeat: no effect, no store access, no ack
            else:
                if kind in self.ONCE_PER_CONNECTION:
                    self._seen.add(kind)
                try:
                    await self._server.on_control(msg)
                except Exception as exc:  # noqa: BLE001 -- one bad message must not end the reader
                    self._server.log.error("control message failed", kind=kind[:40], error=repr(exc)[:200])
            await asyncio.sleep(0)  # let others run between two messages of this agent

    def send(self, msg: dict[str, Any]) -> None:
        if self._chan is not None:
            try:
                self._chan.write(json.dumps(msg).encode() + b"\n")
            except (asyncssh.Error, OSError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan = None
        if not self.failed:
            self._queue.put_nowait(None)  # handle what was sent before, then end


class AgentSSHServer(asyncssh.SSHServer):
    """Per-connection server object: holds the authenticated session and decides requests."""

    def __init__(self, broker: BrokerCore):
        self.broker = broker
        self.conn: asyncssh.SSHServerConnection | None = None
        self.session_id: str | None = None
        self.authenticated = False
        self.tunnel: Tunnel | None = None
        self.control: ControlSession | None = None
        self.peer = "?"
        self.source = "?"
        self.log = broker.log.bind(component="ssh")
        self.admission = broker.admission
        self._preauth = False  # counted in the admission control's pre-auth totals
        #: How far authentication got (``broker.limits.PROGRESS_*``): the least progressed is evicted first.
        self.progress = 0
        self.evicted = False
        self._auth_failures = 0
        self.hub_api_channels = 0

    # -- connection ----------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.source = str(peer[0])
        self.peer = f"{peer[0]}:{peer[1]}"
        self.log = self.log.bind(conn=self.peer)
        # admitted by the accept loop (broker/acceptor.py), which counted it as pre-auth
        self._preauth = True
        self.admission.attach(self.source, self)  # evictable from now on

    def _leave_preauth(self) -> None:
        if self._preauth:
            self._preauth = False
            self.admission.left_preauth(self.source, self)

    def evict(self) -> None:
        """Admission control needs this pre-auth slot for a newer connection of the same source
        (it has already taken this one out of its accounting): close the connection."""
        self._preauth = False
        self.evicted = True
        if self.conn is not None:
            self.conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.authenticated:  # (refusals by admission control are counted by the acceptor)
            self.broker.metrics.on_connect_failure(exc, self._auth_failures > 0)
        self._leave_preauth()
        if self.authenticated:
            self.broker.agent_disconnected(self, exc)

    def _auth_failed(self, username: str, reason: AuthFailure) -> None:
        """One failed attempt: log and count it, count it against the source, close after MAX_AUTH_TRIES."""
        self.broker.metrics.on_auth_failure(reason)
        self.log.warning("agent authentication failed", session=username, reason=reason.value)
        self._auth_failures += 1
        if self.admission.auth_failed(self.source):
            self.log.warning(
                "source penalised: throttled",
                source=self.source,
                seconds=round(self.admission.penalty_left(self.source), 1),
                interval=self.admission.throttle_interval,
            )
        if self._auth_failures >= MAX_AUTH_TRIES and self.conn is not None:
            self.conn.close()

    def reject(self, why: str, sample: bytes = b"") -> None:
        """Hostile or broken input: log once (capped) and close only this connection."""
        self.log.warning("closing agent connection", reason=why, sample=repr(sample[:80]), session=self.session_id)
        if self.conn is not None:
            self.conn.close()

    # -- authentication ------------------------------------------------------------------
    def begin_auth(self, username: str) -> bool:
        self.progress = max(self.progress, PROGRESS_AUTH)
        return True  # always require authentication

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        if not password.startswith(contract.ENROL_PREFIX):
            self._auth_failed(username, AuthFailure.NOT_ENROLMENT)
            return False
        parts = password[len(contract.ENROL_PREFIX) :].split(" ", 1)
        if len(parts) != 2:
            self._auth_failed(username, AuthFailure.MALFORMED_ENROLMENT)
            return False
        secret, key_text = parts
        key = normalise_public_key(key_text)
        session = self.broker.store.get(username)
        ok = verify_secret(secret, session.secret_hash if session else None)
        if session is None or not session.live:
            self._auth_failed(username, AuthFailure.UNKNOWN_SESSION)
            return False
        if not ok:
            reason = AuthFailure.SECRET_SPENT if session.secret_spent_at else AuthFailure.WRONG_SECRET
            self._auth_failed(username, reason)
            return False
        if session.secret_expires is not None and time.time() > session.secret_expires:
            self._auth_failed(username, AuthFailure.SECRET_EXPIRED)
            return False
        if key is None:
            self._auth_failed(username, AuthFailure.NO_VALID_KEY)
            return False
        if not self.broker.store.spend_secret(username, key):
            self._auth_failed(username, AuthFailure.SECRET_SPENT)
            return False
        self._leave_preauth()  # verified: no longer counted, never evicted
        self.session_id = username
        self.log.info("agent enrolled", session=username)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        session = self.broker.store.get(username)
        if session is None or not session.live or not session.agent_key:
            self._auth_failed(username, AuthFailure.KEY_UNKNOWN_SESSION)
            return False
        offered = " ".join(key.export_public_key("openssh").decode().split()[:2])
        if offered != session.agent_key:
            self._auth_failed(username, AuthFailure.KEY_NOT_BOUND)
            return False
        # the session's own key: evicted last; it leaves the pre-auth accounting once asyncssh has
        # verified the signature (auth_completed)
        self.progress = PROGRESS_KEY
        self.session_id = username
        return True

    def auth_completed(self) -> None:
        self._leave_preauth()
        self.authenticated = True
        self.log = self.log.bind(session=self.session_id)
        self.broker.agent_authenticated(self)

    # -- requests (deny by default) ------------------------------------------------------
    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        d = policy.decide_remote_forward(
            listen_host, listen_port, authenticated=self.authenticated, has_forward=self.tunnel is not None
        )
        if not d:
            self.log.warning("remote forward refused", host=listen_host, port=listen_port, reason=d.reason)
            return False
        listener = self.broker.listeners.get(self.session_id or "")
        if listener is None or self.conn is None:
            self.log.warning("remote forward refused", reason="session has no listener")
            return False
        self.tunnel = Tunnel(self.conn, listen_host, listener.port)
        self.log.info("tunnel attached", port=listener.port)
        return TunnelAttachment(listener, self.tunnel)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        d = policy.decide_direct(
            dest_host,
            dest_port,
            authenticated=self.authenticated,
            hub_api=self.broker.hub_api,
            has_control=self.control is not None,
        )
        if not d:
            self.log.warning("direct channel refused", host=dest_host, port=dest_port, reason=d.reason)
            return False
        if dest_host == contract.CONTROL_HOST:
            self.control = ControlSession(self)
            return self.control
        cap = self.broker.max_hub_api_channels
        if cap and self.hub_api_channels >= cap:
            self.log.warning("direct channel refused", reason=f"{cap} hub API channels already open")
            return False
        assert self.conn is not None
        chan = self.conn.create_tcp_channel()
        self.hub_api_channels += 1
        self.broker.spawn(self._count_channel(chan))
        # an HTTP filter, not a byte relay: only the hub's REST API, identity headers stripped,
        # body and rate capped per session (wire/hubapi.py)
        exchange = HubApiExchange(self.broker.hub_api_policy, self.broker.hub_api_rates.bucket(self.session_id or ""))
        return chan, open_filtered_hub_connection(dest_host, dest_port, exchange, self._hub_api_refused)

    def _hub_api_refused(self, denial: Denial) -> None:
        self.log.warning(
            "hub API request refused", status=denial.status, reason=denial.reason, sample=repr(denial.sample[:80])
        )

    async def _count_channel(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        try:
            await chan.wait_closed()
        finally:
            self.hub_api_channels -= 1

    def unix_server_requested(self, listen_path: str) -> bool:
        self.log.warning("unix forward refused")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.log.warning("unix channel refused")
        return False

    def session_requested(self) -> bool:
        self.log.warning("session (shell/exec/subsystem) refused")
        return False

    # -- control messages ----------------------------------------------------------------
    async def on_control(self, msg: dict[str, Any]) -> None:
        await self.broker.agent_message(self, msg)
        if msg.get("type") in (Msg.HELLO, Msg.READY, Msg.EXIT, Msg.WALLTIME) and self.control is not None:
            self.control.send({"type": Msg.ACK, "of": msg["type"]})
