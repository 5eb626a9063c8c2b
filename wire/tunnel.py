"""Listeners whose connections are carried over an agent's SSH connection (asyncssh only; both sides run it).

On the broker, the hub-side listener of each session; in the node agent, the node-local hub-API
relay (:class:`wire.hubrelay.FilteredRelay`, a subclass).

A session's listener is bound on 127.0.0.1 at the session's stable port when the session is
created (or when the broker restarts) and lives until the session closes. It does not depend
on the agent being connected: a hub-side connection that arrives while the agent is
(re)connecting waits up to ``wait_timeout`` seconds for the tunnel, then is closed.

When the agent's remote-forward request is granted, the SSH server *attaches* a
:class:`Tunnel` (the agent's SSH connection and the forward it asked for); each accepted
connection then opens one ``forwarded-tcpip`` channel on it. Bytes that arrive before the
channel is open are kept (reading is paused at the first of them, so at most one read is held)
and sent first once it opens; asyncssh's window flow control pauses reading whenever the agent
is slower than the hub side, so memory stays bounded per connection.

Reading is *not* paused in ``connection_made``: on some Python releases (Debian 12's 3.11.2, the
shipped image's interpreter; not 3.11.7) asyncio's socket transport starts reading right after
``connection_made`` even when it paused reading there, and marks itself paused, so later
``pause_reading()`` calls do nothing. The bytes then came in with no channel to take them and
were lost (issue 14: the notebook server's first hub-API request, sent while the agent's channel
open was still on its way to the broker; tests/test_relay_early_bytes.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.forward import SSHForwarder

from . import contract
from .tasks import TaskOwner

#: How this module calls ``SSHConnection.create_connection``: with a factory of
#: :class:`~asyncssh.forward.SSHForwarder`, as asyncssh's own port forwarding does. asyncssh types
#: the factory's product as an ``SSHTCPSession``; an ``SSHForwarder`` is what it really handles
#: there (its forwarding code passes it through an untyped callable too).
OpenChannel = Callable[..., Awaitable[Any]]


@dataclasses.dataclass(eq=False)
class Tunnel:
    """A live agent connection able to carry this session's hub-side connections (on the broker, the
    agent's connection; in the agent, its connection to the broker for the hub-API relay)."""

    conn: SSHConnection
    remote_host: str  # the listen address the agent asked for (what it expects back)
    remote_port: int  # the port the broker granted (the session's port)


class _HubSideConnection(SSHForwarder):
    """One TCP connection accepted on a session listener (from CHP or the hub)."""

    def __init__(self, listener: SessionListener):
        super().__init__()
        self._listener = listener
        self._channel_open = False
        self._early = bytearray()  # bytes received before the channel was open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._listener.spawn(self._forward(peer[0], peer[1]))

    def _held_back(self, data: bytes) -> bool:
        """Keep *data* if the channel is not open yet (and stop reading until it is); True if kept."""
        if self._channel_open:
            return False
        self._early += data
        if self._transport is not None:
            self._transport.pause_reading()
        return True

    async def _forward(self, orig_host: str, orig_port: int) -> None:
        tunnel = await self._listener.wait_for_tunnel()
        if tunnel is None or self._transport is None:
            self.close()
            return
        open_channel: OpenChannel = tunnel.conn.create_connection
        try:
            await open_channel(
                self._channel_side,
                tunnel.remote_host,
                tunnel.remote_port,
                orig_host,
                orig_port,
                window=contract.CHANNEL_WINDOW,
                max_pktsize=contract.CHANNEL_MAX_PKTSIZE,
            )
        except (asyncssh.Error, OSError):
            self.close()
            return
        if self._transport is None:  # hub side went away meanwhile
            self.close()
            return
        self._channel_open = True
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)
        if self._eof_received and self._peer:
            self._peer.write_eof()
        if self._transport is not None:
            self._transport.resume_reading()

    def _channel_side(self) -> SSHForwarder:
        """The protocol of this connection's SSH channel (its peer)."""
        return SSHForwarder(self)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if self._held_back(data):
            return
        self._listener.bytes_in += len(data)
        super().data_received(data, datatype)

    def write(self, data: bytes) -> None:
        self._listener.bytes_out += len(data)
        super().write(data)


class SessionListener:
    """The hub-side listener of one session at 127.0.0.1:port."""

    def __init__(self, session_id: str, wait_timeout: float = 10.0):
        self.session_id = session_id
        self.wait_timeout = wait_timeout
        self.port = 0
        self.bytes_in = 0  # hub → agent
        self.bytes_out = 0  # agent → hub
        self._server: asyncio.base_events.Server | None = None
        self._tunnel: Tunnel | None = None
        self._attached = asyncio.Event()
        self._tasks = TaskOwner()  # the pending forwards

    async def start(self, port: int = 0) -> int:
        """Bind 127.0.0.1:*port* (0 = pick one) and start accepting; returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, "127.0.0.1", port, reuse_address=True, family=socket.AF_INET
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _protocol(self) -> asyncio.BaseProtocol:
        """The protocol of one accepted hub-side connection."""
        return _HubSideConnection(self)

    @property
    def tunnel(self) -> Tunnel | None:
        return self._tunnel

    def attach(self, tunnel: Tunnel) -> None:
        """Route new hub-side connections through *tunnel* (replacing any previous one)."""
        self._tunnel = tunnel
        self._attached.set()

    def detach(self, tunnel: Tunnel) -> None:
        """Forget *tunnel* if it is the current one (a stale detach is ignored)."""
        if self._tunnel is tunnel:
            self._tunnel = None
            self._attached.clear()

    async def wait_for_tunnel(self) -> Tunnel | None:
        if self._tunnel is None:
            try:
                await asyncio.wait_for(self._attached.wait(), self.wait_timeout)
            except asyncio.TimeoutError:
                return None
        return self._tunnel

    def take_counts(self) -> tuple[int, int]:
        """Return and reset the (bytes_in, bytes_out) counters since the last call."""
        counts = (self.bytes_in, self.bytes_out)
        self.bytes_in = self.bytes_out = 0
        return counts

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start a task owned by this listener (cancelled by :meth:`close`)."""
        self._tasks.spawn(coro)

    async def close(self) -> None:
        """Stop listening, drop the tunnel and cancel pending forwards; idempotent."""
        self._tunnel = None
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._tasks.close()


class TunnelAttachment(asyncssh.SSHListener):
    """What the SSH server hands asyncssh for a granted remote forward.

    asyncssh reports :meth:`get_port` to the agent and calls :meth:`close` when the forward
    is cancelled or the connection ends; the broker-owned listener itself stays up.
    """

    def __init__(self, listener: SessionListener, tunnel: Tunnel):
        super().__init__()
        self._listener = listener
        self._agent_tunnel = tunnel  # (not ``_tunnel``: asyncssh's SSHListener has its own)
        listener.attach(tunnel)

    def get_port(self) -> int:
        return self._listener.port

    def close(self) -> None:
        self._listener.detach(self._agent_tunnel)

    async def wait_closed(self) -> None:
        return None
