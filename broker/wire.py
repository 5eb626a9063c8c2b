"""Fewer ``send()`` system calls on an SSH connection: coalesce its writes per loop iteration.

asyncssh hands every SSH packet to its transport with a separate ``transport.write()`` — and
before each encrypted data packet it sends an ``MSG_IGNORE`` packet, so one 256 KiB read from a
notebook server becomes 16 writes of 8 packets. asyncio's socket transport tries ``send()`` at
once on each write while its buffer is empty, so the tunnel spent more time in ``send()`` than in
AES-GCM (see docs/benchmarks.md). :func:`coalesce_writes` wraps the connection's transport in a
:class:`CoalescingTransport` that collects the writes made in one event-loop iteration and passes
them on as one ``write()`` at the start of the next.

Contract: bytes go out in the order written, none is dropped unless the connection is aborted (as
with the plain transport); ``close()`` and ``write_eof()`` flush first; flow control is the inner
transport's (its ``pause_writing``/``resume_writing`` still reach the SSH connection), and
:meth:`CoalescingTransport.get_write_buffer_size` counts the bytes held here too. Used by both
ends: the broker (``broker.ssh_server``) and the node agent (``node_agent.agent``).

asyncssh has no public hook for its transport, so this sets the connection's ``_transport``
attribute from the ``connection_made`` callback of the client/server object — which asyncssh
calls right after storing the transport and before it sends its version string. If a future
asyncssh renames the attribute, :func:`coalesce_writes` returns False and nothing changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: Module switch (benchmarks A/B it: ``bench/tunnel_ab.py``); True in production.
ENABLED = True


class CoalescingTransport:
    """An :class:`asyncio.Transport` stand-in whose ``write()`` calls in one loop iteration go out
    as one ``write()`` of the wrapped transport. Everything else is the wrapped transport's."""

    __slots__ = ("_inner", "_loop", "_pending", "_pending_len", "_scheduled")

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_len += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Pass everything held so far to the wrapped transport (idempotent)."""
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        if not self._inner.is_closing():
            try:
                self._inner.write(data)
            except ConnectionError:  # as asyncssh's own _send(): the connection is going away
                pass

    def get_write_buffer_size(self) -> int:
        return self._pending_len + self._inner.get_write_buffer_size()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def abort(self) -> None:
        self._pending.clear()
        self._pending_len = 0
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, is_closing, pause_reading, ...
        return getattr(self._inner, name)


def coalesce_writes(conn: Any) -> bool:
    """Wrap *conn*'s transport (an asyncssh connection, from its ``connection_made``) in a
    :class:`CoalescingTransport`. Returns whether it did (False: disabled, no transport, already
    wrapped, or an asyncssh without the ``_transport`` attribute)."""
    transport = getattr(conn, "_transport", None)
    if not ENABLED or transport is None or isinstance(transport, CoalescingTransport):
        return False
    if not callable(getattr(transport, "write", None)):
        return False
    conn._transport = CoalescingTransport(transport, asyncio.get_running_loop())
    return True
