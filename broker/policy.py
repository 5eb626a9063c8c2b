"""The SSH request policy: every request an agent makes is decided here, deny by default.

These are pure functions of the request and the authenticated session, so the whole policy
is unit-testable without a network. The broker's SSH server calls them and acts on the
:class:`Decision`.
"""

from __future__ import annotations

import dataclasses

from wire.contract import CONTROL_HOST, CONTROL_PORT

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost"})


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


ALLOW = Decision(True, "allowed")


def deny(reason: str) -> Decision:
    return Decision(False, reason)


def decide_remote_forward(listen_host: str, listen_port: int, *, authenticated: bool, has_forward: bool) -> Decision:
    """May the agent request a remote (hub-side) forward?

    Only one per connection, only on loopback, and only with port 0: the broker alone picks
    the hub-side port (the session's stable port), never the agent.
    """
    if not authenticated:
        return deny("not authenticated")
    if has_forward:
        return deny("session already has its forward")
    if listen_port != 0:
        return deny(f"fixed port {listen_port} requested; the broker assigns the port")
    if listen_host not in LOOPBACK_NAMES:
        return deny(f"bind address {listen_host!r} is not loopback")
    return ALLOW


def decide_direct(
    dest_host: str,
    dest_port: int,
    *,
    authenticated: bool,
    hub_api: tuple[str, int],
    has_control: bool,
) -> Decision:
    """May the agent open a direct channel to (dest_host, dest_port)?

    Allowed: the configured hub API address (exactly), and one control channel
    (:data:`wire.contract.CONTROL_HOST`, :data:`~wire.contract.CONTROL_PORT`).
    """
    if not authenticated:
        return deny("not authenticated")
    if (dest_host, dest_port) == (CONTROL_HOST, CONTROL_PORT):
        if has_control:
            return deny("control channel already open")
        return ALLOW
    if (dest_host.lower(), dest_port) == (hub_api[0].lower(), hub_api[1]):
        return ALLOW
    return deny("destination is not the hub API")
