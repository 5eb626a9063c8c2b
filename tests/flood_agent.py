"""A hostile agent for tests/test_control_channel.py, run as its own process.

It logs in as one session (enrolment first, then its bound key), asks for its tunnel like an
agent does, and floods the control channel. Running it in its own process keeps its CPU work
(building and encrypting megabytes of messages) out of the test's own measurements.

Environment: FLOOD_HOST, FLOOD_PORT, FLOOD_HOST_KEY (OpenSSH public key), FLOOD_SESSION,
FLOOD_SECRET, FLOOD_HEARTBEATS (default 200000), FLOOD_READIES (default 6000).

Protocol: prints ``{"enrolled": true}`` once logged in; then for each line read on stdin it runs
one round and prints one JSON line: per flooding connection, whether the broker closed it
(``closed``) and how long that took (``seconds``), and how many bytes the flooder got to write
before the end (``written``). EOF on stdin ends it.

Round: connection 1 sends ``hello`` then FLOOD_HEARTBEATS heartbeats; connection 2 sends
``hello`` then FLOOD_READIES ``ready`` messages. Each connection is given 30 s to be closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import asyncssh

from wire.contract import CONTROL_HOST, CONTROL_PORT, PROTOCOL_VERSION

CONTROL = (CONTROL_HOST, CONTROL_PORT)
CHUNK = 32 * 1024


def _opts() -> dict:
    key = asyncssh.import_public_key(os.environ["FLOOD_HOST_KEY"])
    return dict(known_hosts=([key], [], []), agent_path=None, config=None, connect_timeout=30)


async def _flood(conn: asyncssh.SSHClientConnection, payload: bytes) -> dict:
    """Send *payload* on a control channel until the broker closes the connection."""
    await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
    _reader, writer = await conn.open_connection(*CONTROL)
    written = 0
    started = time.monotonic()

    async def send() -> None:
        nonlocal written
        writer.write(
            json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "node": "flood", "job_id": "1"}).encode() + b"\n"
        )
        for i in range(0, len(payload), CHUNK):
            writer.write(payload[i : i + CHUNK])
            written += min(CHUNK, len(payload) - i)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        await asyncio.wait_for(conn.wait_closed(), 30)
        closed = True
    except asyncio.TimeoutError:
        closed = False
    seconds = time.monotonic() - started
    sender.cancel()
    try:
        await sender
    except (asyncio.CancelledError, asyncssh.Error, OSError):
        pass
    conn.close()
    return {"closed": closed, "seconds": round(seconds, 4), "written": written}


async def main() -> int:
    host, port = os.environ["FLOOD_HOST"], int(os.environ["FLOOD_PORT"])
    sid = os.environ["FLOOD_SESSION"]
    heartbeats = b'{"type": "heartbeat"}\n' * int(os.environ.get("FLOOD_HEARTBEATS", "200000"))
    readies = b'{"type": "ready"}\n' * int(os.environ.get("FLOOD_READIES", "6000"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
    conn = await asyncssh.connect(
        host,
        port,
        username=sid,
        password=f"enrol {os.environ['FLOOD_SECRET']} {pub}",
        client_keys=None,
        preferred_auth="password",
        **_opts(),
    )
    conn.close()
    await conn.wait_closed()
    print(json.dumps({"enrolled": True}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return 0
        result = {}
        for name, payload in (("heartbeats", heartbeats), ("readies", readies)):
            conn = await asyncssh.connect(
                host, port, username=sid, client_keys=[key], preferred_auth="publickey", **_opts()
            )
            result[name] = await _flood(conn, payload)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
