"""Bytes a client sends before its tunnel channel is open are not lost (issue 14).

The agent's hub-API relay (:class:`wire.hubrelay.FilteredRelay`) and the broker's session
listeners (:class:`wire.tunnel.SessionListener`) accept a TCP connection, then open an SSH
channel for it. On the site topology that open takes a round trip to the broker plus the
broker's connect to the hub, and the notebook server's first request (``GET /hub/api``) could
arrive first. On Debian 12's Python 3.11.2 — the interpreter of the shipped image, where the
agent runs — asyncio starts reading a new connection even when ``connection_made`` paused it,
so those bytes were delivered with no channel to take them and dropped: the request never
reached the hub and the spawn hung until ``Spawner.start_timeout``.

Each scenario runs as a subprocess under both the test's interpreter and ``/usr/bin/python3``
(Debian 12's, the one that showed the loss; the image is built from the same Debian release)
with real parts: an asyncssh server whose channel opens take 0.5 s (a real ``asyncio.sleep``
before it connects on, standing in for the round trip), an HTTP server as the hub, and the
relay/listener attached to a real asyncssh client connection. The client writes its request at
once and must get the hub's answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = str(Path(__file__).resolve().parents[1])
DEBIAN_PYTHON = "/usr/bin/python3"  # Debian 12: 3.11.2, as in singularity/cpu.sif
OPEN_DELAY = 0.5


def _site_packages() -> str:
    import asyncssh

    return str(Path(asyncssh.__file__).resolve().parents[1])


async def _scenario(kind: str) -> bytes:
    import asyncssh
    from asyncssh.forward import SSHForwarder

    from wire.hubapi import HubApiPolicy
    from wire.hubrelay import FilteredRelay
    from wire.tunnel import SessionListener, Tunnel

    async def hub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    class SlowOpen(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn

        def begin_auth(self, username: str) -> bool:
            return False

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> object:
            async def open_later() -> SSHForwarder:
                await asyncio.sleep(OPEN_DELAY)
                return await self.conn.forward_connection(dest_host, dest_port)

            return open_later()

    hub_server = await asyncio.start_server(hub, "127.0.0.1", 0)
    hub_port = hub_server.sockets[0].getsockname()[1]
    ssh = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], server_factory=SlowOpen
    )
    conn = await asyncssh.connect("127.0.0.1", ssh.get_port(), username="agent", known_hosts=None)
    if kind == "filtered":
        listener: SessionListener = FilteredRelay(
            "s", HubApiPolicy(max_body=0, rate=0), lambda denial: None, wait_timeout=5
        )
    else:
        listener = SessionListener("s", wait_timeout=5)
    port = await listener.start(0)
    listener.attach(Tunnel(conn, "127.0.0.1", hub_port))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hub/api HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), OPEN_DELAY + 5)
    except asyncio.TimeoutError:
        return b"(no answer)"
    finally:
        writer.close()
        await listener.close()
        conn.close()
        ssh.close()
        hub_server.close()


def _run(interpreter: str, kind: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, _site_packages()]))
    r = subprocess.run([interpreter, __file__, kind], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


INTERPRETERS = [pytest.param(sys.executable, id="test-python"), pytest.param(DEBIAN_PYTHON, id="debian-python")]


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize("kind", ["filtered", "plain"])
def test_request_sent_before_the_channel_opens_reaches_the_hub(interpreter: str, kind: str) -> None:
    """The agent's hub-API relay (filtered) and a broker session listener (plain): the request
    written right after connecting, while the channel open is still on its way, gets the hub's
    answer."""
    assert os.path.exists(interpreter), f"{interpreter} (Debian 12's python3) is part of the test machine"
    out = _run(interpreter, kind)
    assert out.startswith("HTTP/1.1 200 OK") and out.endswith("ok"), out


if __name__ == "__main__":
    sys.stdout.write(asyncio.run(_scenario(sys.argv[1])).decode("latin-1"))
