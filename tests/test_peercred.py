"""The relay's owner check (wire/peercred.py, FilteredRelay(owner_uid=...)): real loopback TCP
connections read back from the kernel's /proc; another user's process is a real process of
``nobody``, and another job of the same user a real process outside the relay's PID namespace
(``unshare --pid``), where the test runs as root."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import sys

import pytest

from wire.hubapi import Denial, HubApiPolicy
from wire.hubrelay import FilteredRelay
from wire.peercred import _hex_endpoint, peer_is_ours, socket_held_here, tcp_peer

from harness import REPO


def test_hex_endpoint_matches_the_kernels_spelling():
    # on every Linux the kernel prints 127.0.0.1:8080 as the address word in host order
    word = "0100007F" if socket.htonl(1) != 1 else "7F000001"
    assert _hex_endpoint(("127.0.0.1", 8080)) == f"{word}:1F90"


def test_peer_uid_of_our_own_connection_and_of_none():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            conn, peer = server.accept()
            with conn:
                ours = conn.getsockname()
                found = tcp_peer(ours, peer)
                assert found is not None and found.uid == os.getuid()
                assert found.inode == os.fstat(client.fileno()).st_ino  # the client's own socket
                assert socket_held_here(found.inode)
                assert peer_is_ours(ours, peer, os.getuid()) == (True, os.getuid())
                assert peer_is_ours(ours, peer, os.getuid() + 1) == (False, os.getuid())
                assert tcp_peer(ours, ("127.0.0.1", 1)) is None  # no such peer
                assert tcp_peer(ours, peer, table="/nonexistent") is None
                assert peer_is_ours(ours, ("127.0.0.1", 1), os.getuid()) == (False, None)
    assert not socket_held_here(found.inode)  # closed: nobody holds it


def _relay_answer(port: int, as_user: str | None = None) -> bytes:
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1',{port}),timeout=10)\n"
        "s.sendall(b'GET /hub/api/user HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "out=b''\n"
        "while True:\n"
        "    try:\n        d=s.recv(4096)\n    except OSError:\n        break\n"
        "    if not d:\n        break\n    out+=d\n"
        "sys.stdout.buffer.write(out)\n"
    )
    argv = ["/usr/bin/python3", "-I", "-c", code]
    if as_user:
        argv = ["runuser", "-u", as_user, "--", *argv]
    return subprocess.run(argv, capture_output=True, timeout=30, cwd="/").stdout


@pytest.mark.parametrize("owner", ["another", "ours"])
def test_relay_with_an_owner_refuses_other_users(owner):
    """A connection from a uid other than the relay's owner gets 403 and is refused before the
    tunnel is waited for; the owner's own connection goes on to wait for the tunnel (none here:
    it is closed after the relay's wait)."""
    refused: list[Denial] = []
    uid = os.getuid() + 1 if owner == "another" else os.getuid()

    async def main() -> bytes:
        relay = FilteredRelay(
            "s", HubApiPolicy(api_prefix="/hub/api/"), refused.append, wait_timeout=0.5, owner_uid=uid
        )
        port = await relay.start(0)
        try:
            return await asyncio.to_thread(_relay_answer, port)
        finally:
            await relay.close()

    answer = asyncio.run(main())
    if owner == "another":
        assert answer.startswith(b"HTTP/1.1 403 Forbidden") and b"another user" in answer, answer
        assert len(refused) == 1 and refused[0].status == 403 and f"uid {os.getuid()}" in refused[0].reason
    else:
        assert answer == b"" and refused == []  # closed when no tunnel came within the wait


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_relay_refuses_a_real_process_of_another_user():
    nobody = pwd.getpwnam("nobody")
    refused: list[Denial] = []

    async def main() -> tuple[bytes, bytes]:
        relay = FilteredRelay("s", HubApiPolicy(api_prefix="/hub/api/"), refused.append, wait_timeout=0.5, owner_uid=0)
        port = await relay.start(0)
        try:
            theirs = await asyncio.to_thread(_relay_answer, port, "nobody")
            mine = await asyncio.to_thread(_relay_answer, port)
            return theirs, mine
        finally:
            await relay.close()

    theirs, mine = asyncio.run(main())
    assert theirs.startswith(b"HTTP/1.1 403") and mine == b""
    assert [d.reason for d in refused] == [f"connection from a process of another user (uid {nobody.pw_uid})"]


RELAY_IN_OWN_PID_NAMESPACE = """
import asyncio, sys
from wire.hubapi import HubApiPolicy
from wire.hubrelay import FilteredRelay

async def main():
    refused = []
    relay = FilteredRelay("s", HubApiPolicy(api_prefix="/hub/api/"), refused.append, wait_timeout=0.5, owner_uid=0)
    print(await relay.start(0), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print(repr([d.reason for d in refused]), flush=True)
    await relay.close()

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_relay_refuses_the_same_user_in_another_pid_namespace():
    """The relay in a PID namespace of its own (as in a container with contain-pid); a process of
    the same uid outside it (another job of a shared service account) is refused."""
    relay = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", RELAY_IN_OWN_PID_NAMESPACE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    try:
        port = int(relay.stdout.readline())
        answer = _relay_answer(port)
        relay.stdin.write("\n")
        relay.stdin.flush()
        reasons = relay.stdout.readline()
    finally:
        relay.kill()
        relay.wait()
    assert answer.startswith(b"HTTP/1.1 403") and b"another user" in answer, answer
    assert "connection from a process of another job (uid 0)" in reasons, reasons
