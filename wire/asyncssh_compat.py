"""A lean data path within asyncssh: no empty ``SSH_MSG_IGNORE`` before each packet under AEAD.

asyncssh (2.24) sends, before *every* packet after key exchange, an empty ``SSH_MSG_IGNORE``
(``SSHConnection.send_packet``: ``if self._send_encryption and pkttype > MSG_KEX_LAST:
self.send_packet(MSG_IGNORE, String(b''))``). That is the old counter-measure against the
chosen-plaintext attack on SSH's CBC mode, where the IV of a packet is the last cipher block of
the one before; an ignore packet in between makes that IV unpredictable to an attacker. With the
AEAD ciphers (``aes128-gcm@openssh.com``, ``aes256-gcm@openssh.com``,
``chacha20-poly1305@openssh.com``) — the only ones the broker and the agent negotiate — each packet
has its own nonce from the sequence number, and the ignore packet defends against nothing, while it
doubles the per-packet work: two framings, two encryptions, two ``send()`` calls per channel-data
packet. OpenSSH sends no such packet.

:func:`install` patches exactly that: while a packet above ``MSG_KEX_LAST`` is sent on a connection
whose *current* send cipher is AEAD, the empty ignore packet asyncssh inserts for it is dropped.
Nothing else changes: key exchange, CBC/CTR ciphers, ``MSG_IGNORE`` packets sent for any other
reason (non-empty, or not nested in a packet send) and the receive side are asyncssh's own.

It applies only to the asyncssh versions it was tested with (:data:`TESTED`; the same range is
pinned in ``pyproject.toml``) and only when the method still has the shape it was written for. On any
other version, or shape, it logs one warning (stdlib :mod:`logging`, logger ``wire.asyncssh_compat``)
and leaves asyncssh untouched: the tunnel then works exactly as stock asyncssh, just slower.
Both the broker (server setup) and the node agent (before connecting) call :func:`install`; it is
idempotent. ``tests/test_asyncssh_compat.py`` fails loudly when asyncssh's internals change shape.
The upstream proposal (what, why, the measurement) is in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE, MSG_KEX_LAST
from asyncssh.encryption import ChachaEncryption, GCMEncryption

#: asyncssh versions this patch was tested with: lowest included, highest excluded.
TESTED = ((2, 24, 1), (2, 25))

#: The payload of the empty ``MSG_IGNORE`` asyncssh inserts (``String(b'')``).
EMPTY_STRING = b"\0\0\0\0"

#: Send ciphers for which the inserted ignore packet is dropped (asyncssh's AEAD shims).
AEAD_ENCRYPTIONS = (GCMEncryption, ChachaEncryption)

_log = logging.getLogger("wire.asyncssh_compat")

# "active" | "off: <why>" | "" (not installed yet)
_state = ""
_original_send_packet: Callable[..., None] | None = None


def parse_version(version: str) -> tuple[int, ...] | None:
    """``"2.24.1"`` -> ``(2, 24, 1)``; None for anything that is not plain dotted numbers."""
    if not re.fullmatch(r"\d+(\.\d+){1,3}", version):
        return None
    return tuple(int(x) for x in version.split("."))


def version_supported(version: str) -> bool:
    """Whether *version* of asyncssh is in the tested range :data:`TESTED`."""
    v = parse_version(version)
    return v is not None and TESTED[0] <= v < TESTED[1]


def shape_problem() -> str:
    """Why asyncssh's internals no longer look as this patch expects, or "" when they do.

    Checked at run time (cheap, no source needed): ``send_packet`` exists with the signature
    ``(self, pkttype, *args, handler=None)`` and refers to ``MSG_IGNORE`` and ``_send_encryption``;
    the AEAD shims exist. The test suite also fingerprints the method's source.
    """
    fn = _original_send_packet or getattr(SSHConnection, "send_packet", None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return "SSHConnection.send_packet is missing or not a Python function"
    if code.co_varnames[:2] != ("self", "pkttype") or code.co_kwonlyargcount != 1 or not code.co_flags & 0x04:
        return "SSHConnection.send_packet(self, pkttype, *args, handler=None) changed its signature"
    names = set(code.co_names)
    if not {"MSG_IGNORE", "_send_encryption", "send_packet"} <= names:
        return "SSHConnection.send_packet no longer inserts MSG_IGNORE as this patch expects"
    return ""


def _lean_send_packet(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap asyncssh's ``send_packet`` so the empty ignore it inserts under AEAD is dropped."""

    def send_packet(self: Any, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype > MSG_KEX_LAST and isinstance(self._send_encryption, AEAD_ENCRYPTIONS):
            # the first empty MSG_IGNORE sent while this packet is being sent is asyncssh's insert
            self._compat_drop_ignore = True
            try:
                original(self, pkttype, *args, handler=handler)
            finally:
                self._compat_drop_ignore = False
        elif pkttype == MSG_IGNORE and self._compat_drop_ignore and args == (EMPTY_STRING,):
            self._compat_drop_ignore = False
        else:
            original(self, pkttype, *args, handler=handler)

    send_packet.__doc__ = original.__doc__
    send_packet.__wrapped__ = original  # type: ignore[attr-defined]
    return send_packet


def install(version: str | None = None) -> bool:
    """Patch asyncssh once per process if its version and shape are the tested ones.

    Returns whether the patch is active. On an untested *version* (default: the installed
    ``asyncssh.__version__``) or changed internals it logs one warning and changes nothing.
    """
    global _state, _original_send_packet
    if _state:
        return _state == "active"
    version = asyncssh.__version__ if version is None else version
    problem = "" if version_supported(version) else f"asyncssh {version} is not in the tested range"
    problem = problem or shape_problem()
    if problem:
        _state = f"off: {problem}"
        low, high = (".".join(map(str, v)) for v in TESTED)
        _log.warning(
            "%s (tested: >=%s,<%s); leaving asyncssh as it is: every data packet keeps its empty MSG_IGNORE",
            problem,
            low,
            high,
        )
        return False
    _original_send_packet = SSHConnection.send_packet
    SSHConnection._compat_drop_ignore = False  # type: ignore[attr-defined]
    SSHConnection.send_packet = _lean_send_packet(_original_send_packet)  # type: ignore[method-assign]
    _state = "active"
    return True


def state() -> str:
    """``"active"``, ``"off: <why>"``, or ``""`` before :func:`install` ran."""
    return _state


def uninstall() -> None:
    """Undo :func:`install` (for tests and A/B benchmarks); a later :func:`install` starts afresh."""
    global _state, _original_send_packet
    if _original_send_packet is not None:
        SSHConnection.send_packet = _original_send_packet  # type: ignore[method-assign]
        _original_send_packet = None
    _state = ""
