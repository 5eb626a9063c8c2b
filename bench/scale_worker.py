"""One client process of the scale benchmark: a share of the simulated agents.

``python -m bench.scale_worker SPEC.json``; SPEC holds the broker's SSH port and host key, the
connect concurrency and this worker's agents as ``[session_id, secret, source_address]``.
Each agent binds its client socket to its own 127.x.y.z source address (a node of its own, as on
a real cluster), so the broker's per-source pre-auth cap applies per agent, as it would in
production; the total cap still applies to all of them together.

Protocol on stdout (one JSON object a line) / stdin (one word a line):
  -> {"event": "established", "ok": N, "failed": F, "s": T}
  <- "storm"      the broker was killed: drop every connection and reconnect with the agent's
                  key (jittered backoff, capped at 2 s); deadline in the spec
  -> {"event": "reconnected", "ok": N, "s": T}
  <- "exit"
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from typing import Any

import asyncssh


class SimAgent:
    def __init__(self, sid: str, secret: str, src: str, port: int, host_key: asyncssh.SSHKey):
        self.sid = sid
        self.secret = secret
        self.src = src
        self.port = port
        self.host_key = host_key
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.conn: asyncssh.SSHClientConnection | None = None
        self.enrolled = False

    async def connect(self) -> None:
        opts: dict[str, Any] = dict(
            username=self.sid,
            known_hosts=([self.host_key], [], []),
            agent_path=None,
            config=None,
            encryption_algs=["aes128-gcm@openssh.com"],
            connect_timeout=30,
            local_addr=(self.src, 0),
        )
        if self.enrolled:
            opts.update(client_keys=[self.key], preferred_auth="publickey")
        else:
            pub = " ".join(self.key.export_public_key("openssh").decode().split()[:2])
            opts.update(client_keys=None, preferred_auth="password", password=f"enrol {self.secret} {pub}")
        conn = await asyncssh.connect("127.0.0.1", self.port, **opts)
        self.enrolled = True
        try:
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
        except BaseException:
            conn.abort()
            raise
        self.conn = conn

    async def connect_retrying(self, deadline: float) -> bool:
        attempt = 0
        while time.monotonic() < deadline:
            try:
                await self.connect()
                return True
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(2.0, 0.25 * 2**attempt)))
        return False


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


async def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    host_key = asyncssh.import_public_key(spec["host_key"])
    agents = [SimAgent(sid, secret, src, spec["port"], host_key) for sid, secret, src in spec["agents"]]
    sem = asyncio.Semaphore(spec["concurrency"])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def first(a: SimAgent) -> bool:
        async with sem:
            return await a.connect_retrying(time.monotonic() + spec["deadline_s"])

    t0 = time.monotonic()
    ok = await asyncio.gather(*(first(a) for a in agents))
    emit(event="established", ok=sum(ok), failed=len(ok) - sum(ok), s=round(time.monotonic() - t0, 2))
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "storm":
            for a in agents:
                if a.conn is not None:
                    a.conn.abort()
                    a.conn = None
            await asyncio.sleep(0)
            t0 = time.monotonic()
            deadline = t0 + spec["deadline_s"]
            ok = await asyncio.gather(*(a.connect_retrying(deadline) for a in agents))
            emit(event="reconnected", ok=sum(ok), s=round(time.monotonic() - t0, 2))
        elif line in ("exit", ""):
            for a in agents:
                if a.conn is not None:
                    a.conn.abort()
            return


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(sys.argv[1]))
