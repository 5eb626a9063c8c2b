"""broker.sdnotify: systemd's notify protocol over a real unix datagram socket."""

from __future__ import annotations

import os
import socket

from broker import sdnotify


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_ready_and_stopping_reach_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with _listener(path) as sock:
        assert sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1"
        assert sdnotify.notify(sdnotify.STOPPING, {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_name(tmp_path):
    name = f"broker-test-{os.getpid()}-{id(tmp_path)}"
    with _listener("\0" + name) as sock:
        assert sdnotify.notify("STATUS=serving", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=serving"


def test_without_or_with_a_dead_socket_nothing_is_sent_and_nothing_raised(tmp_path):
    assert not sdnotify.notify(sdnotify.READY, {})
    assert not sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": "relative/path"})
    assert not sdnotify.notify(sdnotify.READY, {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
