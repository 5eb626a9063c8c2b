"""systemd's readiness protocol (``sd_notify``) without a library.

A unit with ``Type=notify`` starts the broker with ``NOTIFY_SOCKET`` set to a unix datagram
socket (a path, or an abstract name written ``@name``). :func:`notify` sends one datagram of
``KEY=VALUE`` lines to it: the broker sends ``READY=1`` once its REST API and SSH server answer
(systemd then starts the units ordered after it, e.g. the hub) and ``STOPPING=1`` when it begins a
graceful stop. Without ``NOTIFY_SOCKET`` (not under systemd) it does nothing. A failure to send is
returned, never raised: readiness reporting must not stop the broker.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

READY = "READY=1"
STOPPING = "STOPPING=1"


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send *state* (e.g. :data:`READY`, ``"STATUS=serving"``) to ``NOTIFY_SOCKET``.

    Returns True if it was sent, False when there is no socket or sending failed.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
