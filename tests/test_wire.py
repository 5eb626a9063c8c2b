"""broker.wire.CoalescingTransport over real asyncio socket transports (socketpairs), and on a
real broker <-> agent SSH connection."""

from __future__ import annotations

import asyncio
import os
import socket

import asyncssh
import pytest

from broker import wire
from broker.wire import CoalescingTransport, coalesce_writes

pytestmark = pytest.mark.asyncio


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(True)


async def _pair() -> tuple[asyncio.Transport, _Sink]:
    """A real writing transport and the protocol reading the other end."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    writer, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    _, sink = await loop.connect_accepted_socket(_Sink, b)
    return writer, sink  # type: ignore[return-value]


def _count_writes(transport: asyncio.Transport) -> list[int]:
    """Spy on the real transport's write(): record each call's size, then write for real."""
    sizes: list[int] = []
    real = transport.write

    def write(data: bytes) -> None:
        sizes.append(len(data))
        real(data)

    transport.write = write  # type: ignore[method-assign]
    return sizes


async def test_writes_in_one_iteration_go_out_as_one_in_order():
    inner, sink = await _pair()
    sizes = _count_writes(inner)
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    chunks = [os.urandom(n) for n in (1, 100, 32768, 7, 65536, 3)]
    for c in chunks:
        t.write(c)
    assert sizes == [], "nothing reaches the socket before the loop turns"
    assert t.get_write_buffer_size() == sum(map(len, chunks))
    await asyncio.sleep(0)
    assert sizes == [sum(map(len, chunks))], "one write of everything"
    t.write(b"second")
    t.write(b" batch")
    t.close()  # close flushes what is pending
    await asyncio.wait_for(sink.eof, 5)
    assert bytes(sink.data) == b"".join(chunks) + b"second batch"
    assert sizes[1:] == [12]


async def test_write_eof_flushes_and_abort_drops():
    inner, sink = await _pair()
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    t.write(b"kept")
    t.write_eof()
    await asyncio.wait_for(sink.eof, 5)
    assert bytes(sink.data) == b"kept"

    inner2, sink2 = await _pair()
    t2 = CoalescingTransport(inner2, asyncio.get_running_loop())
    t2.write(b"dropped")
    t2.abort()
    await asyncio.wait_for(sink2.eof, 5)
    await asyncio.sleep(0.05)
    assert bytes(sink2.data) == b""
    assert t2.get_write_buffer_size() == 0


async def test_other_attributes_are_the_inner_transports():
    inner, _ = await _pair()
    t = CoalescingTransport(inner, asyncio.get_running_loop())
    assert t.get_extra_info("socket") is inner.get_extra_info("socket")
    assert t.is_closing() is False
    t.close()
    assert t.is_closing() is True


async def test_a_real_ssh_connection_is_wrapped_and_works(tmp_path):
    """Both ends of a real asyncssh connection wrapped: a 4 MiB echo comes back intact."""

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn):
            assert coalesce_writes(conn)

        def begin_auth(self, username):
            return False

        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            return dest_port == echo_port  # direct-tcpip to the echo server only

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn):
            assert coalesce_writes(conn)

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    key = asyncssh.generate_private_key("ssh-ed25519")
    srv = await asyncssh.create_server(Server, "127.0.0.1", 0, server_host_keys=[key],
                                       process_factory=None)
    port = srv.sockets[0].getsockname()[1]
    async with asyncssh.connect("127.0.0.1", port, known_hosts=None, client_factory=Client, username="u",
                                agent_path=None, config=None) as conn:
        assert isinstance(conn._transport, CoalescingTransport)
        reader, writer = await conn.open_connection("127.0.0.1", echo_port)
        payload = os.urandom(4 << 20)
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        assert got == payload
    srv.close()
    echo_srv.close()


async def test_disabled_switch_leaves_the_transport_alone(monkeypatch):
    inner, _ = await _pair()

    class Conn:
        _transport = inner

    monkeypatch.setattr(wire, "ENABLED", False)
    assert coalesce_writes(Conn) is False and Conn._transport is inner
    monkeypatch.setattr(wire, "ENABLED", True)
    assert coalesce_writes(Conn) is True and isinstance(Conn._transport, CoalescingTransport)
    assert coalesce_writes(Conn) is False, "never wrapped twice"
