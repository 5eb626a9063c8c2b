"""Who is at the other end of a loopback TCP connection (Linux, ``/proc``).

A unix socket can ask the kernel for its peer's credentials (``SO_PEERCRED``); a TCP socket
cannot. On Linux the kernel lists every TCP socket of the network namespace in
``/proc/net/tcp`` with the uid that owns it and its inode, so for a connection accepted on
``127.0.0.1:<port>`` the peer's own entry (local address = the peer's, remote = ours) names the
peer's user and socket. Which process holds that socket shows in ``/proc/<pid>/fd`` -- for the
processes this one may inspect in its own PID namespace only.

The agent's hub-API relay serves a connection only when both hold (:func:`peer_is_ours`): the
peer socket belongs to the relay's uid, and it is held by a process the agent can see. On a
shared node that keeps out another user's processes (another uid) and, with a shared service
account, another job's (its own container's PID namespace hides them).

Stdlib only. The uid is as the reading process's user namespace sees it.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NamedTuple

TCP_TABLE = "/proc/net/tcp"
PROC = "/proc"


class PeerSocket(NamedTuple):
    uid: int
    inode: int


def _hex_endpoint(addr: tuple[str, int]) -> str:
    """``/proc/net/tcp``'s spelling of an IPv4 endpoint: the address as the kernel's 32-bit word
    in host byte order, then the port, both in upper-case hex."""
    word = int.from_bytes(socket.inet_aton(addr[0]), sys.byteorder)
    return f"{word:08X}:{addr[1]:04X}"


def tcp_peer(ours: tuple[str, int], peer: tuple[str, int], table: str = TCP_TABLE) -> PeerSocket | None:
    """The socket at *peer* that is connected to *ours* (its owner's uid and its inode); None
    when the table has no such entry (the peer already closed, another network namespace) or
    cannot be read."""
    want_local, want_remote = _hex_endpoint(peer), _hex_endpoint(ours)
    try:
        with open(table) as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                    return PeerSocket(int(fields[7]), int(fields[9]))
    except (OSError, ValueError):
        return None
    return None


def socket_held_here(inode: int, proc: str = PROC) -> bool:
    """Whether a process this one can see and inspect holds the socket *inode* (its PID
    namespace; its own uid's processes unless privileged)."""
    target = f"socket:[{inode}]"
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to inspect
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def peer_is_ours(ours: tuple[str, int], peer: tuple[str, int], uid: int) -> tuple[bool, int | None]:
    """(accepted, the peer's uid or None): the peer socket is *uid*'s and held by a process
    this one can see (module docstring)."""
    found = tcp_peer(ours, peer)
    if found is None:
        return False, None
    return found.uid == uid and socket_held_here(found.inode), found.uid
