"""The hub-API filter (:mod:`wire.hubapi`) on live connections (asyncssh only; both sides run it).

- :func:`open_filtered_hub_connection`: the broker's end of an agent's hub-API direct channel,
  returned from ``connection_requested`` in place of asyncssh's ``forward_connection``.
- :class:`FilteredRelay`: the agent's node-local relay, a :class:`~wire.tunnel.SessionListener`
  whose connections are filtered before anything enters the tunnel; with ``owner_uid`` set it
  serves only processes of that user that the agent can see (:mod:`wire.peercred`): another
  user's or another container's connection gets a 403 at once and never reaches the tunnel or
  the session's rate limit.

In both, the client's bytes go through :meth:`~wire.hubapi.HubApiExchange.from_client` and only
what it returns reaches the hub; the hub's bytes pass back untouched (observed by
:meth:`~wire.hubapi.HubApiExchange.from_hub`). Flow control is asyncssh's (a slow side pauses
reading on the other). A refusal is reported once through ``on_refused``; then reading from the
client stops, responses to requests already forwarded are passed on, the refusal (403, 400, ...)
is written and this connection alone is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.forward import SSHForwarder

from .hubapi import Denial, HubApiExchange, HubApiPolicy
from .peercred import peer_is_ours
from .ratelimit import TokenBucket
from .tunnel import SessionListener, _HubSideConnection

OnRefused = Callable[[Denial], None]

#: what a process of another user gets from a relay with an owner (then the connection closes)
FOREIGN_ANSWER = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 41\r\n"
    b"Connection: close\r\n\r\nthis relay serves another user's server.\n"
)


class _FilteringClient(SSHForwarder):
    """The client-facing end: its transport is the client's connection, its peer the hub-facing end."""

    exchange: HubApiExchange

    def _setup_filter(self, exchange: HubApiExchange, on_refused: OnRefused) -> None:
        self.exchange = exchange
        self._on_refused = on_refused
        self._answered = False

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        ex = self.exchange
        if ex.denial is not None:
            return
        out = ex.from_client(data)
        if out and self._peer is not None:
            self._peer.write(out)
        if ex.denial is not None:
            self._on_refused(ex.denial)
            if self._transport is not None:
                try:
                    self._transport.pause_reading()
                except (OSError, RuntimeError, asyncssh.Error):
                    pass
            self.maybe_answer()

    def eof_received(self) -> bool:
        if self.exchange.denial is not None:
            return True  # keep our sending side open for the answer
        return super().eof_received()

    def maybe_answer(self) -> None:
        """After a refusal: once earlier responses are through, write the answer and close."""
        ex = self.exchange
        if ex.denial is None or self._answered:
            return
        if ex.tracking and not ex.can_answer():
            return  # a response to an earlier request is still on its way
        self._answered = True
        hub = self._peer
        if isinstance(hub, _ObservedHub):
            self._peer = None
            hub.detach()
            hub.close()
        if ex.tracking:
            self.write(ex.answer())
        self.close()


class _ObservedHub(SSHForwarder):
    """The hub-facing end: passes the hub's bytes to the client unchanged, letting the filter see them."""

    def __init__(self, client: _FilteringClient):
        super().__init__(client)
        self._client: _FilteringClient | None = client

    def detach(self) -> None:
        self._peer = None
        self._client = None

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        client = self._client
        if client is None:
            return
        client.exchange.from_hub(data)
        super().data_received(data, datatype)
        client.maybe_answer()


class FilteredChannel(_FilteringClient):
    """The broker's end of one hub-API direct channel (transport: the SSH channel)."""

    def __init__(self, exchange: HubApiExchange, on_refused: OnRefused):
        super().__init__()
        self._setup_filter(exchange, on_refused)


async def open_filtered_hub_connection(
    host: str, port: int, exchange: HubApiExchange, on_refused: OnRefused
) -> SSHForwarder:
    """Connect to the hub API at (host, port); return the channel's session, filtering through *exchange*."""
    client = FilteredChannel(exchange, on_refused)
    try:
        await asyncio.get_running_loop().create_connection(lambda: _ObservedHub(client), host, port)
    except OSError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
    return client


class _FilteredLocalConnection(_FilteringClient, _HubSideConnection):
    """One connection to the agent's node-local relay (transport: the local TCP connection)."""

    def __init__(self, listener: FilteredRelay):
        super().__init__(listener)
        self._setup_filter(HubApiExchange(listener.policy, listener.bucket), listener.on_refused)
        self._foreign = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        relay = self._listener
        assert isinstance(relay, FilteredRelay)
        if relay.owner_uid is not None:
            ours = transport.get_extra_info("sockname") or ("", 0)
            peer = transport.get_extra_info("peername") or ("", 0)
            accepted, uid = peer_is_ours(ours[:2], peer[:2], relay.owner_uid)
            if not accepted:
                SSHForwarder.connection_made(self, transport)  # no forward is started
                self._foreign = True
                who = "another user" if uid != relay.owner_uid else "another job"
                relay.on_refused(Denial(403, f"connection from a process of {who} (uid {uid})", b""))
                self.write(FOREIGN_ANSWER)
                self.close()
                return
        super().connection_made(transport)

    def data_received(self, data: bytes, datatype: Any = None) -> None:
        if self._foreign:
            return
        if self._held_back(data):  # the channel is not open yet (see wire.tunnel)
            return
        super().data_received(data, datatype)

    def _channel_side(self) -> SSHForwarder:
        return _ObservedHub(self)


class FilteredRelay(SessionListener):
    """The agent's node-local hub-API relay: a session listener whose connections are filtered.

    The token bucket (``policy.rate``) is shared by all connections of the relay. With
    *owner_uid*, a connection whose peer socket belongs to another uid, is held by no process
    this one can see (another PID namespace: another container), or cannot be found at all is
    answered 403 and closed before anything else happens.
    """

    def __init__(
        self,
        session_id: str,
        policy: HubApiPolicy,
        on_refused: OnRefused,
        wait_timeout: float = 10.0,
        owner_uid: int | None = None,
    ):
        super().__init__(session_id, wait_timeout)
        self.owner_uid = owner_uid
        self.policy = policy
        self.on_refused = on_refused
        self.bucket = TokenBucket(policy.rate, policy.burst) if policy.rate > 0 else None

    def _protocol(self) -> asyncio.BaseProtocol:
        return _FilteredLocalConnection(self)
