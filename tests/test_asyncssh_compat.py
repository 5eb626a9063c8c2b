"""wire.asyncssh_compat: active with the pinned asyncssh, no empty MSG_IGNORE per data packet (counted on
a real loopback asyncssh connection), off and logged on an untested version, loud when asyncssh's
internals change shape."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio
import tomllib
from asyncssh.connection import SSHConnection

from wire import asyncssh_compat

REPO = Path(__file__).resolve().parents[1]

#: sha256 of ``inspect.getsource(SSHConnection.send_packet)`` of asyncssh 2.24.1, the method the
#: patch wraps. When asyncssh changes it, read the new method, check that the patch still drops
#: exactly the inserted empty ignore packet (and nothing else), then update this and TESTED.
SEND_PACKET_SHA256 = "fb9da7bec6dd395a2f379f8a0f4dbfc5f194ff80e1ed8630d9a6dbf291359406"

CHUNK = 1000
WRITES = 200


@pytest.fixture
def fresh() -> Iterator[None]:
    """The patch uninstalled before the test; re-installed afterwards (the state production runs in)."""
    asyncssh_compat.uninstall()
    yield
    asyncssh_compat.uninstall()
    asyncssh_compat.install()


def _stock_send_packet():
    return getattr(SSHConnection.send_packet, "__wrapped__", SSHConnection.send_packet)


# -- the pinned version -------------------------------------------------------------------------
def test_pyproject_pins_the_tested_range():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("asyncssh")]
    low, high = (".".join(map(str, v)) for v in asyncssh_compat.TESTED)
    assert spec.replace(" ", "") == f"asyncssh>={low},<{high}"


def test_active_with_the_installed_pinned_asyncssh(fresh):
    assert asyncssh_compat.version_supported(asyncssh.__version__), asyncssh.__version__
    assert asyncssh_compat.install() is True
    assert asyncssh_compat.state() == "active"
    assert SSHConnection.send_packet is not _stock_send_packet()
    assert asyncssh_compat.install() is True  # idempotent: not wrapped twice
    assert SSHConnection.send_packet.__wrapped__ is _stock_send_packet()  # type: ignore[attr-defined]


def test_the_broker_and_the_agent_install_it():
    """Both ends call install() on their connection path (broker: server setup; agent: connect)."""
    from broker import core
    from node_agent import agent

    assert "asyncssh_compat.install()" in inspect.getsource(core.Broker.start)
    assert "asyncssh_compat.install()" in inspect.getsource(agent.Agent.connect)


# -- asyncssh's internals -----------------------------------------------------------------------
def test_asyncssh_internals_have_the_shape_the_patch_was_written_for():
    """Fails loudly when asyncssh changes what the patch relies on (see SEND_PACKET_SHA256)."""
    stock = _stock_send_packet()
    src = inspect.getsource(stock)
    assert asyncssh_compat.shape_problem() == ""
    assert re.search(
        r"if self\._send_encryption and pkttype > MSG_KEX_LAST:\s+self\.send_packet\(MSG_IGNORE, String\(b''\)\)", src
    ), "asyncssh no longer inserts the empty MSG_IGNORE the way wire/asyncssh_compat.py expects"
    assert asyncssh.packet.String(b"") == asyncssh_compat.EMPTY_STRING
    digest = hashlib.sha256(src.encode()).hexdigest()
    assert digest == SEND_PACKET_SHA256, (
        f"asyncssh {asyncssh.__version__} changed SSHConnection.send_packet (sha256 {digest}): "
        "review wire/asyncssh_compat.py against it before updating SEND_PACKET_SHA256 and TESTED"
    )
    names = {c.__name__ for c in asyncssh_compat.AEAD_ENCRYPTIONS}
    assert names == {"GCMEncryption", "ChachaEncryption"}


def test_a_changed_shape_keeps_it_off(fresh, monkeypatch, caplog):
    def send_packet(self, pkttype, *args):  # a different signature, as a future asyncssh might have
        return None

    monkeypatch.setattr(SSHConnection, "send_packet", send_packet)
    with caplog.at_level(logging.WARNING, logger="wire.asyncssh_compat"):
        assert asyncssh_compat.install() is False
    assert SSHConnection.send_packet is send_packet
    assert "changed its signature" in caplog.text


# -- an unknown version ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.25.0", "2.24.0", "3.0", "2.24.1rc1", "garbage"])
def test_an_untested_version_stays_off_and_logs_once(fresh, caplog, version):
    stock = SSHConnection.send_packet
    with caplog.at_level(logging.WARNING, logger="wire.asyncssh_compat"):
        assert asyncssh_compat.install(version=version) is False
        assert asyncssh_compat.install(version=version) is False
    assert SSHConnection.send_packet is stock  # untouched
    assert asyncssh_compat.state().startswith("off: ")
    records = [r for r in caplog.records if r.name == "wire.asyncssh_compat"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    assert f"asyncssh {version} is not in the tested range" in records[0].getMessage()


# -- packets on a real connection ------------------------------------------------------------------
class _Counting(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: this connection only carries bytes


@pytest_asyncio.fixture
async def host_key() -> AsyncIterator[asyncssh.SSHKey]:
    yield asyncssh.generate_private_key("ssh-ed25519")


async def _count_packets(host_key: asyncssh.SSHKey, cipher: str, **client_opts: object) -> tuple[int, int, bytes]:
    """Send WRITES channel-data packets client -> server over loopback; return (packets the server
    received meanwhile, packets the client sent meanwhile, the bytes that arrived)."""
    received = bytearray()
    got_all = asyncio.Event()
    server_conns: list[SSHConnection] = []

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        while len(received) < WRITES * CHUNK:
            data = await process.stdin.read(65536)
            if not data:
                break
            received.extend(data)
        got_all.set()
        await process.stdin.read()
        process.exit(0)

    def server_factory() -> asyncssh.SSHServer:
        server = _Counting()
        orig = server.connection_made

        def made(conn: asyncssh.SSHServerConnection) -> None:
            server_conns.append(conn)
            orig(conn)

        server.connection_made = made  # type: ignore[method-assign]
        return server

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        server_factory=server_factory,
        process_factory=handle,
        encryption_algs=[cipher],
        encoding=None,
    )
    port = server.get_port()
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            known_hosts=None,
            username="bench",
            encryption_algs=[cipher],
            agent_path=None,
            config=None,
            **client_opts,
        ) as conn:
            process = await conn.create_process(encoding=None)
            await asyncio.sleep(0.1)  # the session is open: nothing else in flight
            (sconn,) = server_conns
            recv0, send0 = sconn._recv_seq, conn._send_seq
            for i in range(WRITES):
                process.stdin.write(bytes([i % 256]) * CHUNK)  # one CHANNEL_DATA packet each
                await process.stdin.drain()
            await asyncio.wait_for(got_all.wait(), 30)
            recv_n, send_n = sconn._recv_seq - recv0, conn._send_seq - send0
            process.stdin.write_eof()
            await process.wait(timeout=30)
    finally:
        server.close()
        await server.wait_closed()
    return recv_n, send_n, bytes(received)


def _expected() -> bytes:
    return b"".join(bytes([i % 256]) * CHUNK for i in range(WRITES))


@pytest.mark.asyncio
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
async def test_no_empty_ignore_per_data_packet_under_aead(fresh, host_key, cipher):
    assert asyncssh_compat.install() is True
    received, sent, data = await _count_packets(host_key, cipher)
    assert data == _expected()
    assert sent == WRITES  # one packet per write, nothing in front of it
    assert received == WRITES


@pytest.mark.asyncio
async def test_stock_asyncssh_sends_two_packets_per_write(fresh, host_key):
    """The baseline the previous test is compared with: without the patch, every write is preceded
    by an empty MSG_IGNORE (what the patch removes; shows the count can fail)."""
    received, sent, data = await _count_packets(host_key, "aes128-gcm@openssh.com")
    assert data == _expected()
    assert sent == received == 2 * WRITES


@pytest.mark.asyncio
async def test_non_aead_ciphers_keep_the_ignore_packet(fresh, host_key):
    """CTR mode is not AEAD: the patch leaves asyncssh's behaviour there as it is."""
    assert asyncssh_compat.install() is True
    received, sent, data = await _count_packets(host_key, "aes128-ctr")
    assert data == _expected()
    assert sent == received == 2 * WRITES


@pytest.mark.asyncio
async def test_rekeying_under_the_patch_keeps_the_stream_intact(fresh, host_key, monkeypatch):
    """Key re-exchanges in the middle of the data (every ~20 kB): deferred packets, new keys; every
    byte arrives in order and the connection stays up. (KEXINITs are counted by wrapping asyncssh's
    own ``_send_kexinit``; the sequence numbers restart at each strict-kex NEWKEYS.)"""
    assert asyncssh_compat.install() is True
    kexinits = 0
    send_kexinit = SSHConnection._send_kexinit

    def counting(self: SSHConnection) -> None:
        nonlocal kexinits
        kexinits += 1
        send_kexinit(self)

    monkeypatch.setattr(SSHConnection, "_send_kexinit", counting)
    _, _, data = await _count_packets(host_key, "aes128-gcm@openssh.com", rekey_bytes=20000)
    assert data == _expected()
    assert kexinits >= 2 + 5  # the first exchange (both ends) and several re-exchanges
