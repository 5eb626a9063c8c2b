"""Load, end to end: many concurrent HTTP clients through CHP and the broker's tunnels, and a slow
reader of a large download (flow control keeps the broker's memory bounded).

CI size: 200 clients for 15 s; RELIABILITY_FULL=1: 1,000 clients for 60 s. The broker's RSS is
read from /proc/<broker pid>/status before and after.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import aiohttp
import pytest

from devstack.stack import Stack

from e2e import Hub
from reliability import record, rss_kib, size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(name="load", logs="load-logs", poll_interval=10, reconcile_interval=2.0)


@pytest.fixture(scope="module")
def hub(stack):
    h = Hub(stack)
    users = ["load1", "load2"]
    for u in users:
        h.spawn(u)
    h.users = users  # type: ignore[attr-defined]
    yield h
    for u in users:
        h.stop(u)


async def _clients(stack: Stack, users: list[str], n: int, seconds: float) -> dict:
    """n concurrent clients, each on its own connection, GET in a loop for *seconds*."""
    stats = {"ok": 0, "errors": 0, "kinds": {}, "latencies": []}
    headers = {"Authorization": f"token {stack.admin_token}"}
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(i: int) -> None:
        url = stack.public_url + Hub.prefix(users[i % len(users)]) + "api/status"
        conn = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as http:
            await asyncio.sleep(i * 0.005)  # ramp up over ~n*5 ms
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    async with http.get(url) as r:
                        await r.read()
                        if r.status == 200:
                            stats["ok"] += 1
                            stats["latencies"].append(time.monotonic() - t0)
                        else:
                            stats["errors"] += 1
                            stats["kinds"][str(r.status)] = stats["kinds"].get(str(r.status), 0) + 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    stats["errors"] += 1
                    k = type(exc).__name__
                    stats["kinds"][k] = stats["kinds"].get(k, 0) + 1

    await asyncio.gather(*[client(i) for i in range(n)])
    return stats


def test_many_concurrent_clients_through_chp_and_tunnels(hub, stack):
    n, seconds = size(200, 1000), size(15, 60)
    broker_pid = stack.procs["broker"].pid
    for u in hub.users:  # warm up (token cache in the servers, CHP routes)
        assert hub.through_proxy(u, "api/status")[0] == 200
    before = rss_kib(broker_pid)
    t0 = time.monotonic()
    stats = asyncio.run(_clients(stack, hub.users, n, seconds))
    took = time.monotonic() - t0
    time.sleep(1)
    after = rss_kib(broker_pid)
    lat = sorted(stats["latencies"])
    p50 = lat[len(lat) // 2] if lat else None
    p99 = lat[int(len(lat) * 0.99)] if lat else None
    record(
        "load: concurrent clients",
        clients=n,
        seconds=seconds,
        requests_ok=stats["ok"],
        errors=stats["errors"],
        error_kinds=stats["kinds"],
        req_per_s=round(stats["ok"] / took),
        p50_ms=round(p50 * 1000, 1) if p50 else None,
        p99_ms=round(p99 * 1000, 1) if p99 else None,
        broker_rss_before_kib=before,
        broker_rss_after_kib=after,
    )
    assert stats["errors"] == 0, stats["kinds"]
    assert stats["ok"] >= n, "every client completed at least one request"
    assert after - before < size(64, 160) * 1024, f"broker RSS grew {before} -> {after} KiB"
    for u in hub.users:
        s = hub.session_of(u)
        assert s["state"] == "ready" and s["agent_connected"]


def test_slow_reader_does_not_grow_broker_memory(hub, stack):
    user = hub.users[0]
    big = os.path.join(stack.workdir, "notebooks", "slow.bin")
    file_mib = 300
    with open(big, "wb") as f:
        f.truncate(file_mib << 20)
    broker_pid = stack.procs["broker"].pid
    before = rss_kib(broker_pid)
    seconds = size(10, 30)
    samples = []
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", stack.public_port))
    s.sendall(
        (
            f"GET {Hub.prefix(user)}files/slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: token {stack.admin_token}\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    got = 0
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append(rss_kib(broker_pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(1)  # 1 byte per millisecond: ~1 KB/s
            if not chunk:
                break
            got += 1
            time.sleep(0.001)
    finally:
        stop.set()
        sampler.join()
        s.close()
    peak = max(samples + [before])
    record(
        "load: slow reader",
        file_mib=file_mib,
        seconds=seconds,
        bytes_read=got,
        broker_rss_before_kib=before,
        broker_rss_peak_kib=peak,
    )
    assert got > 0
    # without flow control the broker would buffer the file (300 MiB) from the fast agent side
    assert peak - before < 32 * 1024, f"broker RSS grew {before} -> {peak} KiB with a slow reader"
    os.unlink(big)
    # the session is healthy afterwards
    assert hub.through_proxy(user, "api/status")[0] == 200


def test_real_agent_enrols_during_slowloris(hub, stack):
    """200 idle pre-auth connections from 127.0.0.2 while a real job's agent (127.0.0.1) enrols.
    127.0.0.2 is throttled at its cap (64): 32 more wait, the rest are closed (broker/limits.py)."""
    idle = []
    refused_at_once = 0
    try:
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", stack.ssh_port), timeout=5, source_address=("127.0.0.2", 0))
            idle.append(c)
        time.sleep(2.0)  # (the kernel hands silent connections over after TCP_DEFER_ACCEPT, 1 s)
        for c in idle:  # which ones did the broker drop straight away (over the cap and waiting room)?
            c.setblocking(False)
            try:
                refused_at_once += c.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                refused_at_once += 1
        t0 = time.monotonic()
        hub.spawn("during-slowloris")
        spawn_s = time.monotonic() - t0
    finally:
        for c in idle:
            c.close()
    assert refused_at_once >= 200 - 64 - 32 - 3, "beyond the cap (64) and waiting room (32) the rest are closed"
    assert hub.through_proxy("during-slowloris", "api/status")[0] == 200
    record(
        "slowloris vs real agent",
        idle_connections=200,
        refused_at_once=refused_at_once,
        spawn_to_ready_s=round(spawn_s, 2),
    )
    hub.stop("during-slowloris")


def test_agent_retries_unix_connect_while_the_server_backlog_is_full(tmp_path):
    """A burst larger than the server's listen backlog: unix sockets refuse at once (no queueing
    like TCP); the agent retries briefly instead of failing the channel (a 503 through CHP)."""
    from node_agent.agent import Agent

    path = str(tmp_path / "s.sock")

    async def main() -> int:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(2)
        srv.setblocking(False)
        agent = Agent.__new__(Agent)
        agent.sock_path = path

        async def accept_slowly() -> None:  # a busy server: accepts a few per 50 ms
            loop = asyncio.get_running_loop()
            accepted = []
            while len(accepted) < 40:
                await asyncio.sleep(0.05)
                for _ in range(4):
                    try:
                        accepted.append(srv.accept()[0])
                    except BlockingIOError:
                        break
            del loop
            for c in accepted:
                c.close()

        acceptor = asyncio.ensure_future(accept_slowly())
        results = await asyncio.gather(*[agent._to_server() for _ in range(40)], return_exceptions=True)
        acceptor.cancel()
        srv.close()
        return sum(not isinstance(r, BaseException) for r in results)

    assert asyncio.run(main()) == 40
