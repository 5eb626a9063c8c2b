"""Part 3: many simulated agents against one broker subprocess.

Each simulated agent is a lightweight asyncssh client in this process: it enrols with its
session's one-time secret (password auth, as the real agent does), asks for the one remote
forward (127.0.0.1, port 0) and opens nothing else. Measured: time to establish all of them
(bounded concurrency), the broker's RSS from /proc before and after, and a reconnect storm:
kill -9 the broker, start it again on the same state and ports, and time until the REST API
shows every session ``agent_connected`` again (clients reconnect with their key, jittered
capped backoff like the real agent's).
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import time
from typing import Any, Callable

import aiohttp
import asyncssh

from .procs import BrokerProc, ChpProc, Procs, rss_mib


class SimAgent:
    def __init__(self, sid: str, secret: str, port: int, host_key: asyncssh.SSHKey):
        self.sid = sid
        self.secret = secret
        self.port = port
        self.host_key = host_key
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.conn: asyncssh.SSHClientConnection | None = None
        self.enrolled = False

    async def connect(self) -> None:
        opts: dict[str, Any] = dict(username=self.sid, known_hosts=([self.host_key], [], []), agent_path=None,
                                    config=None, encryption_algs=["aes128-gcm@openssh.com"], connect_timeout=30)
        if self.enrolled:
            opts.update(client_keys=[self.key], preferred_auth="publickey")
        else:
            pub = " ".join(self.key.export_public_key("openssh").decode().split()[:2])
            opts.update(client_keys=None, preferred_auth="password", password=f"enrol {self.secret} {pub}")
        conn = await asyncssh.connect("127.0.0.1", self.port, **opts)
        self.enrolled = True
        await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
        self.conn = conn

    async def reconnect(self, deadline: float) -> bool:
        attempt = 0
        while time.monotonic() < deadline:
            try:
                await self.connect()
                return True
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.25 * 2 ** attempt)))
        return False


async def _count_connected(session: aiohttp.ClientSession, broker: BrokerProc) -> int:
    async with session.get(broker.url + "/api/sessions", headers={"Authorization": f"Bearer {broker.token}"}) as r:
        body = await r.json()
    return sum(1 for s in body["sessions"] if s.get("agent_connected"))


async def _run(tmp: str, n: int, procs: Procs, log: Callable[[str], None]) -> dict[str, Any]:
    chp = ChpProc(procs, "chp-scale")
    chp.start()
    broker = BrokerProc(procs, os.path.join(tmp, "broker-scale"), chp.api_url, chp.token, name="broker-scale")
    broker.start()
    assert broker.proc is not None
    time.sleep(0.5)
    rss0 = rss_mib(broker.proc.pid)
    agents: list[SimAgent] = []
    headers = {"Authorization": f"Bearer {broker.token}"}
    sem = asyncio.Semaphore(50)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        t0 = time.monotonic()
        host_key = None

        async def create(i: int) -> None:
            nonlocal host_key
            async with sem:
                async with http.post(broker.url + "/api/sessions", headers=headers,
                                     json={"user": f"sim{i}", "server_name": "", "routespec": f"/user/sim{i}/"}) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"create session: {r.status} {body}")
            host_key = host_key or asyncssh.import_public_key(body["ssh"]["host_key"])
            agents.append(SimAgent(body["id"], body["secret"], broker.ssh_port, host_key))

        await asyncio.gather(*(create(i) for i in range(n)))
        t_create = time.monotonic() - t0
        log(f"  {n} sessions created through REST in {t_create:.1f} s")

        async def connect(a: SimAgent) -> None:
            async with sem:
                await a.connect()

        t0 = time.monotonic()
        await asyncio.gather(*(connect(a) for a in agents))
        t_est = time.monotonic() - t0
        connected = await _count_connected(http, broker)
        await asyncio.sleep(1.0)
        rss1 = rss_mib(broker.proc.pid)
        log(f"  {n} agents enrolled + forwarding in {t_est:.1f} s; {connected} connected; broker RSS {rss0:.0f} -> {rss1:.0f} MiB")

        # reconnect storm
        os.kill(broker.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        broker.proc.wait(10)
        procs.procs.pop("broker-scale", None)
        for a in agents:
            if a.conn is not None:
                a.conn.abort()
        await asyncio.sleep(0)
        deadline = time.monotonic() + 180
        tasks = [asyncio.ensure_future(a.reconnect(deadline)) for a in agents]
        broker.start()
        t_up = time.monotonic()
        n_ok = 0
        while time.monotonic() < deadline:
            try:
                n_ok = await _count_connected(http, broker)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                n_ok = 0
            if n_ok >= n:
                break
            await asyncio.sleep(0.2)
        t_all = time.monotonic()
        await asyncio.gather(*tasks, return_exceptions=True)
        rss2 = rss_mib(broker.proc.pid)
        log(f"  storm: all {n_ok}/{n} reconnected {t_all - t_up:.1f} s after restart ({t_all - t_kill:.1f} s after kill -9); RSS {rss2:.0f} MiB")
        for a in agents:
            if a.conn is not None:
                a.conn.abort()
    return {"n": n, "sessions_create_s": round(t_create, 2), "establish_s": round(t_est, 2), "connect_concurrency": 50,
            "connected": connected, "broker_rss_idle_mib": round(rss0, 1), "broker_rss_mib": round(rss1, 1),
            "rss_per_agent_kib": round((rss1 - rss0) * 1024 / n, 1), "reconnect_storm_s": round(t_all - t_up, 2),
            "reconnect_storm_from_kill_s": round(t_all - t_kill, 2), "reconnected": n_ok,
            "broker_rss_after_storm_mib": round(rss2, 1)}


def run(tmp: str, n: int, procs: Procs, log: Callable[[str], None]) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * n + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the broker inherits it
    return asyncio.run(_run(tmp, n, procs, log))
