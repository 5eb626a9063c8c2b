"""Hostile input against the broker's SSH port (component layer, in-process broker).

- a forward-policy matrix: credential kind x request kind, checked against EXPECTED (the same
  table is rendered in docs/reliability.md, and this test checks the two agree);
- garbage bytes, oversized version lines and oversized SSH packets on raw TCP;
- slowloris (idle pre-auth connections) from one source while another source enrols: the source is
  throttled, its waiting connections get no banner, admissions rotate its idle ones out;
- repeated authentication failures throttle the source (growing penalty), never refuse it;
- a per-connection cap on hub-API channels;
- hostile usernames (long, RTL marks, emoji, newlines, escapes) escaped in the broker's log.

Attackers use 127.0.0.2 as their source address, honest agents 127.0.0.1: Linux routes all of
127/8 to lo, so they are distinct sources to the broker.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import sys
import time

import asyncssh
import pytest
import pytest_asyncio
from jupyterhub.utils import url_escape_path

from broker import log as broker_log
from broker.limits import AdmissionControl
from wire.contract import CONTROL_HOST, CONTROL_PORT

from harness import HUB_API_PING, BrokerFactory, Harness
from reliability import record, rss_kib, size

pytestmark = pytest.mark.asyncio

ATTACKER = "127.0.0.2"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _hold_server() -> asyncio.base_events.Server:
    """A 'hub API' that keeps each connection open until the client closes it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1024):
                writer.write(b"ok")
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class HostileHarness(Harness):
    async def connect_from(self, source: str, **kw):
        return await asyncssh.connect(
            "127.0.0.1", self.broker.ssh_port, local_addr=(source, 0), **self.ssh_options(**kw)
        )


@pytest_asyncio.fixture
async def make_broker(make_broker: BrokerFactory):
    """Factory: an in-process broker (conftest's ``make_broker``) with the given admission
    settings; ``login_timeout`` and ``max_hub_api_channels`` go to the broker itself."""

    async def make(hub_server=None, **admission_kw) -> HostileHarness:
        broker_kw = {k: admission_kw.pop(k) for k in ("login_timeout", "max_hub_api_channels") if k in admission_kw}
        h = await make_broker(
            hub=hub_server, harness=HostileHarness, admission=AdmissionControl(**admission_kw), **broker_kw
        )
        assert isinstance(h, HostileHarness)
        return h

    return make


# -- the forward-policy matrix ---------------------------------------------------------------
CREDENTIALS = ["valid", "expired", "other session's", "revoked", "replayed"]
REQUESTS = [
    "remote forward 127.0.0.1:0",
    "remote forward fixed port",
    "remote forward 0.0.0.0",
    "direct to hub API",
    "direct elsewhere",
    "unix-socket forward",
    "exec",
    "shell",
    "subsystem",
]
LOGIN_REFUSED = "login refused"
EXPECTED: dict[str, dict[str, str]] = {
    "valid": {
        "remote forward 127.0.0.1:0": "allowed (session's port)",
        "remote forward fixed port": "refused",
        "remote forward 0.0.0.0": "refused",
        "direct to hub API": "allowed",
        "direct elsewhere": "refused",
        "unix-socket forward": "refused",
        "exec": "refused",
        "shell": "refused",
        "subsystem": "refused",
    },
    # a credential that does not authenticate gets no further than the login
    **{c: {r: LOGIN_REFUSED for r in REQUESTS} for c in CREDENTIALS[1:]},
}
CREDENTIAL_HOW = {
    "valid": "the session's own enrolled key",
    "expired": "unspent enrolment secret past its expiry",
    "other session's": "session B's enrolled key, logging in as session A",
    "revoked": "the enrolled key of a closed session",
    "replayed": "the already spent enrolment secret, with a fresh key",
}


def render_matrix() -> str:
    """The EXPECTED table as markdown (what docs/reliability.md carries)."""
    head = "| credential | " + " | ".join(REQUESTS) + " |"
    sep = "|---" * (len(REQUESTS) + 1) + "|"
    rows = [f"| {c} | " + " | ".join(EXPECTED[c][r] for r in REQUESTS) + " |" for c in CREDENTIALS]
    return "\n".join([head, sep, *rows])


async def _try_request(h: HostileHarness, conn: asyncssh.SSHClientConnection, session, request: str) -> str:
    try:
        if request == "remote forward 127.0.0.1:0":
            listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
            got = listener.get_port()
            listener.close()
            return "allowed (session's port)" if got == session.port else f"allowed (port {got}!)"
        if request == "remote forward fixed port":
            await conn.forward_remote_port("127.0.0.1", session.port + 1, "127.0.0.1", 9)
        elif request == "remote forward 0.0.0.0":
            await conn.forward_remote_port("0.0.0.0", 0, "127.0.0.1", 9)
        elif request == "direct to hub API":
            reader, writer = await conn.open_connection("127.0.0.1", h.hub_api_port)
            writer.write(HUB_API_PING)
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"hub-api:")
            writer.close()
        elif request == "direct elsewhere":
            await conn.open_connection("127.0.0.1", h.broker.ssh_port)
        elif request == "unix-socket forward":
            await conn.forward_remote_path(os.path.join(h.tmp, "evil.sock"), "/tmp/x.sock")
        elif request == "exec":
            await conn.run("id", check=False)
        elif request == "shell":
            await conn.create_process()
        elif request == "subsystem":
            await conn.start_sftp_client()
        return "allowed"
    except (asyncssh.ChannelOpenError, asyncssh.ChannelListenError):
        return "refused"


async def _login(h: HostileHarness, kind: str, a, secret_a: str, key_a, b_key):
    if kind == "valid":
        return await h.reconnect(a.id, key_a)
    if kind == "other session's":
        return await h.reconnect(a.id, b_key)
    if kind == "revoked":
        return await h.reconnect(a.id, key_a)
    if kind in ("expired", "replayed"):
        return (await h.enrol(a.id, secret_a))[0]
    raise AssertionError(kind)


async def test_forward_policy_matrix(make_broker):
    h = await make_broker(penalty_threshold=0)
    actual: dict[str, dict[str, str]] = {}
    b, secret_b = await h.session("bob")
    conn_b, key_b = await h.enrol(b.id, secret_b)
    for kind in CREDENTIALS:
        a, secret_a = await h.session(f"alice-{kind.split()[0].strip(chr(39))}")
        key_a = None
        if kind == "expired":
            h.broker.store.update(a.id, secret_expires=time.time() - 1)
        elif kind in ("valid", "revoked", "replayed", "other session's"):
            first, key_a = await h.enrol(a.id, secret_a)  # spends the secret, binds key_a
            first.close()
            await first.wait_closed()
            if kind == "revoked":
                await h.broker.close_session(a.id, "revoked by test")
        try:
            conn = await _login(h, kind, a, secret_a, key_a, key_b)
        except asyncssh.PermissionDenied:
            actual[kind] = {r: LOGIN_REFUSED for r in REQUESTS}
            continue
        actual[kind] = {}
        for request in REQUESTS:
            actual[kind][request] = await _try_request(h, conn, a, request)
        conn.close()
    conn_b.close()
    assert actual == EXPECTED
    with open(os.path.join(REPO, "docs", "reliability.md")) as f:
        assert render_matrix() in f.read(), "docs/reliability.md: update the policy matrix (render_matrix())"


# -- raw bytes on the SSH port ---------------------------------------------------------------
def _raw(port: int, payload: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send *payload* from the attacker address; return what came back and seconds until EOF."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(ATTACKER, 0)) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return b"", time.monotonic() - t0
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got, time.monotonic() - t0


GARBAGE = {
    "random bytes": os.urandom(4096),
    "HTTP request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "version line of 64 KiB, no newline": b"SSH-2.0-" + b"A" * 65536,
    "NUL flood": b"\0" * 100_000,
    "oversized packet (length 2 GiB)": b"SSH-2.0-evil\r\n" + struct.pack(">IB", 0x7FFFFFFF, 4) + os.urandom(1024),
    "oversized packet (length 1 MiB, body sent)": b"SSH-2.0-evil\r\n"
    + struct.pack(">IB", 1 << 20, 4)
    + b"\0" * (1 << 20),
}


@pytest.mark.parametrize("what", list(GARBAGE))
async def test_garbage_on_the_ssh_port_closes_only_that_connection(make_broker, what):
    h = await make_broker(penalty_threshold=0)
    session, secret = await h.session()
    honest, _ = await h.enrol(session.id, secret)
    loop = asyncio.get_running_loop()
    _, seconds = await loop.run_in_executor(None, _raw, h.broker.ssh_port, GARBAGE[what])
    assert seconds < 10, "the broker must close a connection that sends garbage"
    # the honest agent's connection is untouched and new agents still get in
    reader, writer = await honest.open_connection("127.0.0.1", h.hub_api_port)
    writer.write(HUB_API_PING)
    assert await asyncio.wait_for(reader.read(), 5) == b"hub-api:" + HUB_API_PING
    s2, secret2 = await h.session("other")
    c2, _ = await h.enrol(s2.id, secret2)
    c2.close()
    honest.close()


async def test_garbage_storm_keeps_memory_steady(make_broker):
    h = await make_broker(penalty_threshold=0, max_preauth_per_source=0)
    loop = asyncio.get_running_loop()
    rounds = size(60, 300)
    payloads = list(GARBAGE.values())

    async def storm(n: int) -> None:
        await asyncio.gather(
            *[loop.run_in_executor(None, _raw, h.broker.ssh_port, payloads[i % len(payloads)]) for i in range(n)]
        )

    await storm(rounds // 3)  # warm-up: allocator and caches settle
    before = rss_kib()
    await storm(rounds)
    await asyncio.sleep(0.5)
    after = rss_kib()
    record("garbage storm", connections=rounds, rss_before_kib=before, rss_after_kib=after)
    assert after - before < 30 * 1024, f"RSS grew {after - before} KiB over {rounds} garbage connections"
    assert h.broker.admission.preauth_total == 0, "every garbage connection left the pre-auth count"


# -- slowloris, caps, login timeout ----------------------------------------------------------
async def _idle_connections(
    n: int, port: int, source: str = ATTACKER, ident: bool = False
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """n TCP connections that send nothing (or, with *ident*, only an SSH identification line:
    the kernel then hands them to the broker at once instead of after TCP_DEFER_ACCEPT)."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        if ident:
            writer.write(b"SSH-2.0-hostile\r\n")
        conns.append((reader, writer))
    return conns


async def _closed_soon(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), timeout)
            if not chunk:
                return True
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True


async def _observe(reader: asyncio.StreamReader, timeout: float) -> str:
    """What the client sees within *timeout*: ``banner`` (admitted, still open), ``nothing``
    (waiting: no banner, not closed), ``closed`` (closed before the banner: refused or evicted
    while waiting), ``evicted`` (closed after its banner, before authenticating)."""
    got = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), timeout)
            if not chunk:
                return "evicted" if got else "closed"
            got += chunk
    except asyncio.TimeoutError:
        return "banner" if got.startswith(b"SSH-2.0-") else "nothing"
    except ConnectionError:
        return "evicted" if got else "closed"


async def _banner_soon(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return (await asyncio.wait_for(reader.readline(), timeout)).startswith(b"SSH-2.0-")
    except (asyncio.TimeoutError, ConnectionError):
        return False


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_slowloris_from_one_source_is_throttled_and_does_not_block_another(make_broker):
    """200 idle connections from one source, per-source cap 32, waiting room 32: 32 are admitted,
    32 wait (no banner, not closed), the rest are evicted from the full waiting room; the source
    then gets about one admission per second, each replacing its oldest idle connection; another
    source enrols at once; login timeout (also the longest wait) ends the rest."""
    n, per_source, room, login_timeout = 200, 32, 32, 6.0
    h = await make_broker(
        max_preauth_per_source=per_source, max_waiting_per_source=room, max_preauth_total=0, login_timeout=login_timeout
    )
    ad = h.broker.admission
    idle = await _idle_connections(n, h.broker.ssh_port)
    # the kernel hands silent connections over after TCP_DEFER_ACCEPT (1 s); wait until all arrived
    await _until(lambda: ad.stats()["throttled"] >= n - per_source, 10, "all connections to arrive")
    st = (ad.admitted(ATTACKER), ad.waiting(ATTACKER), ad.stats())
    assert st[0] == per_source and st[1] == room, st
    assert ad.preauth_total == per_source + room
    seen = await asyncio.gather(*[_observe(r, 0.3) for r, _ in idle])
    assert seen.count("banner") == per_source, "the cap holds"
    assert seen.count("closed") >= n - per_source - room - 2, "the rest were evicted from the full room"
    rotated_at_start = seen.count("evicted")
    assert rotated_at_start <= 2
    # an honest agent from another source enrols at once
    t0 = time.monotonic()
    session, secret = await h.session()
    conn, _ = await h.enrol(session.id, secret)
    enrol_s = time.monotonic() - t0
    assert enrol_s < 2
    assert h.broker.get(session.id).state == "connected"
    # throttled: about one admission per second, each replacing the oldest admitted idle one
    waiting = [r for (r, _), st in zip(idle, seen, strict=False) if st == "nothing"]
    admitted = [r for (r, _), st in zip(idle, seen, strict=False) if st == "banner"]
    later = await asyncio.gather(*[_observe(r, 2.5) for r in waiting])
    rotated = later.count("banner") + later.count("evicted")
    assert 1 <= rotated <= 6, later
    gone = await asyncio.gather(*[_closed_soon(r, 0.1) for r in admitted])
    assert sum(gone) >= rotated - 1, "each admission evicted an admitted idle connection"
    assert ad.admitted(ATTACKER) == per_source  # (none has reached the login timeout yet)
    # the login timeout (and the same longest wait) ends everything else
    t0 = time.monotonic()
    open_ones = [r for (r, _), st in zip(idle, seen, strict=False) if st in ("banner", "nothing")]
    assert all(await asyncio.gather(*[_closed_soon(r, login_timeout + 3) for r in open_ones]))
    record(
        "slowloris",
        idle_connections=n,
        admitted=per_source,
        waiting=room,
        evicted_at_once=seen.count("closed"),
        admissions_in_2_5s=rotated,
        honest_enrol_s=round(enrol_s, 3),
        all_dropped_after_s=round(time.monotonic() - t0, 2),
    )
    for _, w in idle:
        w.close()
    conn.close()


async def test_capped_source_waits_without_banner_and_rotates(make_broker):
    """Per-source cap 1: a throttled connection gets no banner while it waits, and its admission
    evicts the older pre-auth connection of its source; garbage from a throttled source is closed
    before the banner."""
    h = await make_broker(max_preauth_per_source=1, max_preauth_total=0)
    ((r1, w1),) = await _idle_connections(1, h.broker.ssh_port, ident=True)
    assert await _observe(r1, 1.0) == "banner"  # admitted
    t0 = time.monotonic()
    (r2, w2), (r3, w3) = await _idle_connections(2, h.broker.ssh_port, ident=True)
    assert await _observe(r2, 0.3) == "banner"  # the first throttled admission is immediate...
    assert await _observe(r1, 0.3) == "evicted"  # ...and replaces the oldest pre-auth connection
    assert await _observe(r3, 0.1) == "nothing"  # the next one waits: no banner, not closed
    assert await _banner_soon(r3, 2.0)
    waited = time.monotonic() - t0
    assert 0.45 <= waited <= 1.8, waited  # one admission per second, jittered x[0.5, 1.5]
    assert await _observe(r2, 1.0) == "evicted"
    got, seconds = await asyncio.get_running_loop().run_in_executor(
        None, _raw, h.broker.ssh_port, b"GET / HTTP/1.1\r\n\r\n"
    )
    assert got == b"" and seconds < 2  # garbage while throttled: closed before any banner
    for w in (w1, w2, w3):
        w.close()


async def test_full_waiting_room_refuses_before_the_banner(make_broker):
    """Without a waiting room (max_waiting_per_source=0) a throttled source is refused outright,
    as before: closed at once, no banner."""
    h = await make_broker(max_preauth_per_source=1, max_waiting_per_source=0, max_preauth_total=0)
    ((r1, w1),) = await _idle_connections(1, h.broker.ssh_port, ident=True)
    assert (await asyncio.wait_for(r1.readline(), 5)).startswith(b"SSH-2.0-")  # admitted: banner
    ((r2, w2),) = await _idle_connections(1, h.broker.ssh_port, ident=True)
    assert await _observe(r2, 5) == "closed"  # refused before the banner: nothing at all
    assert h.broker.admission.refused_total == 1
    for w in (w1, w2):
        w.close()


async def test_total_preauth_cap_queues_instead_of_refusing(make_broker):
    """At the total pre-auth cap the broker stops accepting: the excess connections wait in the
    kernel's listen queue (no banner, not closed) and are served, in turn, once slots free."""
    h = await make_broker(max_preauth_per_source=0, max_preauth_total=20)
    conns = []
    for i in range(4):
        conns += await _idle_connections(10, h.broker.ssh_port, source=f"127.0.1.{i + 1}")
    first = await asyncio.gather(*[_banner_soon(r, 3.0) for r, _ in conns])  # (silent: deferred ~1 s)
    assert sum(first) == 20, "exactly max_preauth_total connections get a banner"
    assert h.broker.admission.preauth_total == 20
    waiting = [(r, w) for (r, w), got in zip(conns, first, strict=False) if not got]
    assert not any([await _closed_soon(r, 0.2) for r, _ in waiting]), "the excess waits; it is not refused"
    assert h.broker.admission.refused_total == 0
    # the first 20 go away: the waiting 20 are accepted and get their banner
    for (_, w), got in zip(conns, first, strict=False):
        if got:
            w.close()
    later = await asyncio.gather(*[_banner_soon(r, 5.0) for r, _ in waiting])
    assert all(later), "queued connections are served once slots free"
    for _, w in waiting:
        w.close()
    # once they are gone there is room again for an honest agent
    await asyncio.sleep(0.3)
    session, secret = await h.session()
    conn, _ = await h.enrol(session.id, secret)
    conn.close()


# -- penalties -------------------------------------------------------------------------------
async def _fail_login(h: HostileHarness, source: str, session_id: str) -> str:
    try:
        conn = await h.connect_from(
            source,
            username=session_id,
            password="enrol wrong-secret ssh-ed25519 AAAA",
            client_keys=None,
            preferred_auth="password",
        )
        conn.close()
        return "logged in?!"
    except asyncssh.PermissionDenied:
        return "denied"
    except (asyncssh.Error, OSError):
        return "refused"  # closed before or during the handshake


async def test_repeated_auth_failures_throttle_the_source(make_broker):
    """After the threshold a source is throttled to about one connection per second (not refused):
    each of its connections still gets its turn and its answer; other sources are unaffected; a
    further penalty while penalised doubles."""
    h = await make_broker(penalty_threshold=5, penalty_window=60, penalty_base=10, penalty_max=30)
    session, secret = await h.session()
    t0 = time.monotonic()
    results = [await _fail_login(h, ATTACKER, session.id) for _ in range(5)]
    unthrottled_s = (time.monotonic() - t0) / 5
    assert results == ["denied"] * 5
    assert 9 < h.broker.admission.penalty_left(ATTACKER) <= 10
    # penalised: 4 attempts at once are served one by one, about a second apart, none refused
    t0 = time.monotonic()

    async def timed() -> tuple[str, float]:
        outcome = await _fail_login(h, ATTACKER, session.id)
        return outcome, time.monotonic() - t0

    done = await asyncio.gather(*[timed() for _ in range(4)])
    assert [o for o, _ in done] == ["denied"] * 4
    at = sorted(t for _, t in done)
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert all(g >= 0.4 for g in gaps), at  # throttle interval 1 s jittered x[0.5, 1.5]
    assert at[-1] <= 3 * 1.5 + 1.5, at
    # another source is not affected: the honest agent enrols (from 127.0.0.1) at once
    t1 = time.monotonic()
    conn, _ = await h.enrol(session.id, secret)
    assert time.monotonic() - t1 < 1.5
    conn.close()
    # a fifth failure in the window while penalised: the next penalty is twice as long
    assert await _fail_login(h, ATTACKER, session.id) == "denied"
    left = h.broker.admission.penalty_left(ATTACKER)
    assert 18 < left <= 20, left
    record(
        "penalties",
        threshold=5,
        first_penalty_s=10,
        second_penalty_s=round(left, 2),
        unthrottled_login_s=round(unthrottled_s, 3),
        throttled_answers_at_s=[round(t, 2) for t in at],
    )


async def test_many_attempts_on_one_connection_are_cut_off(make_broker):
    h = await make_broker(penalty_threshold=0)
    session, _ = await h.session()
    attempts = 0

    class Client(asyncssh.SSHClient):
        def password_auth_requested(self):
            nonlocal attempts
            attempts += 1
            return f"enrol wrong{attempts} ssh-ed25519 AAAA" if attempts < 50 else None

    with pytest.raises((asyncssh.PermissionDenied, asyncssh.ConnectionLost, asyncssh.DisconnectError)):
        await asyncssh.connect(
            "127.0.0.1",
            h.broker.ssh_port,
            username=session.id,
            client_factory=Client,
            client_keys=None,
            preferred_auth="password",
            **h.ssh_options(),
        )
    assert attempts <= 7


# -- channel cap -----------------------------------------------------------------------------
async def test_hub_api_channels_capped_per_connection(make_broker):
    hold = await _hold_server()
    h = await make_broker(hub_server=hold, penalty_threshold=0, max_hub_api_channels=64)
    session, secret = await h.session()
    conn, _ = await h.enrol(session.id, secret)
    streams = [await conn.open_connection("127.0.0.1", h.hub_api_port) for _ in range(64)]
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", h.hub_api_port)
    # the control channel is not a hub-API channel and still opens
    await conn.open_connection(CONTROL_HOST, CONTROL_PORT)
    _, w = streams.pop()
    w.close()
    for _ in range(50):
        await asyncio.sleep(0.05)
        try:
            streams.append(await conn.open_connection("127.0.0.1", h.hub_api_port))
            break
        except asyncssh.ChannelOpenError:
            continue
    else:
        raise AssertionError("a closed channel did not free its slot")
    conn.close()


# -- log injection ---------------------------------------------------------------------------
HOSTILE_NAMES = [
    "a" * 255,
    "rtl\u202etxt.exe",
    "emoji😀user",
    "evil\n2030-01-01 [critical ] FORGED broker line",
    "cr\rFORGED",
    "esc\x1b[31mred\x1b[0m",
    "nul\x00byte",
]


async def _login_with_raw_username(h: HostileHarness, name: str) -> str:
    """Send *name* as the SSH user name as is (asyncssh's client would SASLprep it first)."""

    class RawName(asyncssh.SSHClient):
        def connection_made(self, conn):
            conn._username = name  # what goes on the wire in USERAUTH_REQUEST

    try:
        conn = await h.connect_from(
            ATTACKER,
            username="placeholder",
            client_factory=RawName,
            password="enrol x ssh-ed25519 AAAA",
            client_keys=None,
            preferred_auth="password",
        )
        conn.close()
        return "logged in?!"
    except asyncssh.PermissionDenied:
        return "denied"  # reached the broker's check, which refused it
    except asyncssh.IllegalUserName:
        return "illegal user name"  # refused by the SSH layer (SASLprep) before the broker's code
    except (asyncssh.Error, OSError) as exc:
        return f"closed ({type(exc).__name__})"


async def test_hostile_usernames_are_escaped_in_broker_logs(make_broker):
    buf = io.StringIO()
    broker_log.configure("INFO", stream=buf)
    outcomes = {}
    try:
        h = await make_broker(penalty_threshold=0)
        for name in HOSTILE_NAMES:
            outcomes[name] = await _login_with_raw_username(h, name)
            # a session for that user too: the REST side logs the user name
            session, _ = await h.broker.create_session(name, "", f"/user/{url_escape_path(name)}/")
            await h.broker.close_session(session.id, "test")
    finally:
        broker_log.configure("INFO", stream=sys.stderr)
    assert outcomes["a" * 255] == "denied"
    assert not [n for n, o in outcomes.items() if o == "logged in?!"]
    # control characters and bidi overrides never reach broker code over SSH
    for name in HOSTILE_NAMES[1:]:
        assert outcomes[name] in ("illegal user name", "denied") or outcomes[name].startswith("closed"), outcomes
    text = buf.getvalue()
    lines = text.splitlines()
    assert len(lines) >= 2 * len(HOSTILE_NAMES), "expected the registrations and closes to be logged"
    assert not [ln for ln in lines if "FORGED" in ln and "session" not in ln], "a forged line"
    for ln in lines:
        assert ln.isprintable(), repr(ln)
    for bad in ("\u202e", "\x1b", "\x00", "\r"):
        assert bad.encode().decode("unicode_escape") not in text
    assert "a" * 256 not in text  # fields are capped
    assert "emoji😀user" in text  # printable Unicode is kept readable
    record("log injection", outcomes={repr(n)[:40]: o for n, o in outcomes.items()})
