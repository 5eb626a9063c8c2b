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
``Broker.max_hub_api_channels`` open direct channels to the hub API.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import asyncssh

from . import policy
from .limits import PROGRESS_AUTH, PROGRESS_KEY
from .secrets import verify_secret
from .tunnel import Tunnel, TunnelAttachment

if TYPE_CHECKING:
    from .core import Broker

MAX_CONTROL_LINE = 16 * 1024
#: Failed authentication attempts on one connection before it is closed (OpenSSH MaxAuthTries).
MAX_AUTH_TRIES = 6
ENROL_PREFIX = "enrol "


def normalise_public_key(text: str) -> str | None:
    """Return ``"<alg> <base64>"`` for an OpenSSH public key, or None if it isn't one."""
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError, TypeError):
        return None
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


class ControlSession(asyncssh.SSHTCPSession[bytes]):
    """The agent's control channel: newline-delimited JSON messages, capped in length."""

    def __init__(self, server: "AgentSSHServer"):
        self._server = server
        self._buf = b""
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._handle(line)
        if len(self._buf) > MAX_CONTROL_LINE:
            self._server.reject("control message too long", self._buf[:80])

    def _handle(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            msg = json.loads(line.decode("utf-8"))
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ValueError("not an object with a type")
        except (UnicodeDecodeError, ValueError):
            self._server.reject("malformed control message", line[:80])
            return
        self._server.broker.spawn(self._server.on_control(msg))

    def send(self, msg: dict[str, Any]) -> None:
        if self._chan is not None:
            try:
                self._chan.write(json.dumps(msg).encode() + b"\n")
            except (asyncssh.Error, OSError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._chan = None


class AgentSSHServer(asyncssh.SSHServer):
    """Per-connection server object: holds the authenticated session and decides requests."""

    def __init__(self, broker: "Broker"):
        self.broker = broker
        self.conn: asyncssh.SSHServerConnection | None = None
        self.session_id: str | None = None
        self.authenticated = False
        self.tunnel: Tunnel | None = None
        self.control: ControlSession | None = None
        self.peer = "?"
        self.source = "?"
        self.log = broker.log.bind(component="ssh")
        self.admission = getattr(broker, "admission", None)
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
        self._preauth = self.admission is not None
        if self.admission is not None:
            self.admission.attach(self.source, self)  # evictable from now on

    def _leave_preauth(self) -> None:
        if self._preauth and self.admission is not None:
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
        self._leave_preauth()
        if self.authenticated:
            self.broker.agent_disconnected(self, exc)

    def _auth_failed(self, username: str, reason: str) -> None:
        """One failed attempt: log it, count it against the source, close after MAX_AUTH_TRIES."""
        self.broker.auth_failed(self, username, reason)
        self._auth_failures += 1
        if self.admission is not None and self.admission.auth_failed(self.source):
            self.log.warning("source penalised: throttled", source=self.source,
                             seconds=round(self.admission.penalty_left(self.source), 1),
                             interval=self.admission.throttle_interval)
        if self._auth_failures >= MAX_AUTH_TRIES and self.conn is not None:
            self.conn.close()

    def reject(self, why: str, sample: bytes = b"") -> None:
        """Hostile or broken input: log once (capped) and close only this connection."""
        self.log.warning("closing agent connection", reason=why, sample=repr(sample[:80]),
                         session=self.session_id)
        if self.conn is not None:
            self.conn.close()

    # -- authentication ------------------------------------------------------------------
    def begin_auth(self, username: str) -> bool:
        self.progress = max(self.progress, PROGRESS_AUTH)
        return True  # always require authentication

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        if not password.startswith(ENROL_PREFIX):
            self._auth_failed(username, "not an enrolment")
            return False
        parts = password[len(ENROL_PREFIX):].split(" ", 1)
        if len(parts) != 2:
            self._auth_failed(username, "malformed enrolment")
            return False
        secret, key_text = parts
        key = normalise_public_key(key_text)
        session = self.broker.store.get(username)
        ok = verify_secret(secret, session.secret_hash if session else None)
        if session is None or not session.live:
            self._auth_failed(username, "unknown or closed session")
            return False
        if not ok:
            reason = "secret already spent" if session.secret_spent_at else "wrong secret"
            self._auth_failed(username, reason)
            return False
        if session.secret_expires is not None and time.time() > session.secret_expires:
            self._auth_failed(username, "secret expired")
            return False
        if key is None:
            self._auth_failed(username, "enrolment without a valid public key")
            return False
        if not self.broker.store.spend_secret(username, key):
            self._auth_failed(username, "secret already spent")
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
            self._auth_failed(username, "public key for an unknown, closed or unenrolled session")
            return False
        offered = " ".join(key.export_public_key("openssh").decode().split()[:2])
        if offered != session.agent_key:
            self._auth_failed(username, "public key not bound to this session")
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
            dest_host, dest_port, authenticated=self.authenticated,
            hub_api=self.broker.hub_api, has_control=self.control is not None,
        )
        if not d:
            self.log.warning("direct channel refused", host=dest_host, port=dest_port, reason=d.reason)
            return False
        if dest_host == policy.CONTROL_HOST:
            self.control = ControlSession(self)
            return self.control
        cap = getattr(self.broker, "max_hub_api_channels", 0)
        if cap and self.hub_api_channels >= cap:
            self.log.warning("direct channel refused", reason=f"{cap} hub API channels already open")
            return False
        assert self.conn is not None
        chan = self.conn.create_tcp_channel()
        self.hub_api_channels += 1
        self.broker.spawn(self._count_channel(chan))
        return chan, self.conn.forward_connection(dest_host, dest_port)

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
        if msg.get("type") in ("hello", "ready", "exit", "walltime") and self.control is not None:
            self.control.send({"type": "ack", "of": msg["type"]})
