"""Every decision of broker.policy (pure functions, deny by default)."""

from __future__ import annotations

import dataclasses

import pytest

from broker.policy import Decision, decide_direct, decide_remote_forward
from wire.contract import CONTROL_HOST, CONTROL_PORT

HUB = ("127.0.0.1", 8081)


@pytest.mark.parametrize(
    "host, port, authenticated, has_forward, allowed, reason_part",
    [
        ("127.0.0.1", 0, True, False, True, "allowed"),
        ("localhost", 0, True, False, True, "allowed"),
        ("127.0.0.1", 8888, True, False, False, "fixed port 8888"),
        ("localhost", 1, True, False, False, "fixed port 1"),
        ("127.0.0.1", 65535, True, False, False, "fixed port"),
        ("", 0, True, False, False, "not loopback"),
        ("0.0.0.0", 0, True, False, False, "not loopback"),
        ("::", 0, True, False, False, "not loopback"),
        ("10.0.0.1", 0, True, False, False, "not loopback"),
        ("::1", 0, True, False, False, "not loopback"),
        ("127.0.0.2", 0, True, False, False, "not loopback"),
        ("localhost.example.org", 0, True, False, False, "not loopback"),
        ("127.0.0.1", 0, True, True, False, "already has its forward"),
        ("localhost", 0, True, True, False, "already has its forward"),
        ("127.0.0.1", 0, False, False, False, "not authenticated"),
        ("0.0.0.0", 8888, False, True, False, "not authenticated"),
    ],
)
def test_remote_forward(host, port, authenticated, has_forward, allowed, reason_part):
    d = decide_remote_forward(host, port, authenticated=authenticated, has_forward=has_forward)
    assert isinstance(d, Decision)
    assert d.allowed is allowed
    assert bool(d) is allowed
    assert reason_part in d.reason


@pytest.mark.parametrize(
    "host, port, authenticated, has_control, allowed, reason_part",
    [
        # the configured hub API, exactly (host case-insensitive)
        ("127.0.0.1", 8081, True, False, True, "allowed"),
        ("127.0.0.1", 8081, True, True, True, "allowed"),
        # the control channel, once
        (CONTROL_HOST, CONTROL_PORT, True, False, True, "allowed"),
        (CONTROL_HOST, CONTROL_PORT, True, True, False, "control channel already open"),
        # everything else
        (CONTROL_HOST, 2, True, False, False, "not the hub API"),
        (CONTROL_HOST, 0, True, False, False, "not the hub API"),
        ("127.0.0.1", 8080, True, False, False, "not the hub API"),
        ("127.0.0.1", 8001, True, False, False, "not the hub API"),  # the CHP API
        ("127.0.0.1", 22, True, False, False, "not the hub API"),
        ("localhost", 8081, True, False, False, "not the hub API"),  # not the configured spelling
        ("127.0.0.2", 8081, True, False, False, "not the hub API"),
        ("10.0.0.1", 8081, True, False, False, "not the hub API"),
        ("", 8081, True, False, False, "not the hub API"),
        ("example.org", 443, True, False, False, "not the hub API"),
        # unauthenticated: nothing, not even the hub API or the control channel
        ("127.0.0.1", 8081, False, False, False, "not authenticated"),
        (CONTROL_HOST, CONTROL_PORT, False, False, False, "not authenticated"),
    ],
)
def test_direct(host, port, authenticated, has_control, allowed, reason_part):
    d = decide_direct(host, port, authenticated=authenticated, hub_api=HUB, has_control=has_control)
    assert d.allowed is allowed
    assert bool(d) is allowed
    assert reason_part in d.reason


@pytest.mark.parametrize(
    "hub_api, host, port, allowed",
    [
        (("Hub.Example.ORG", 443), "hub.example.org", 443, True),
        (("hub.example.org", 443), "HUB.EXAMPLE.ORG", 443, True),
        (("hub.example.org", 443), "hub.example.org", 80, False),
        (("hub.example.org", 443), "hub.example.org.evil", 443, False),
        (("10.1.2.3", 8081), "10.1.2.3", 8081, True),
        (("10.1.2.3", 8081), "10.1.2.30", 8081, False),
    ],
)
def test_direct_other_hub_addresses(hub_api, host, port, allowed):
    d = decide_direct(host, port, authenticated=True, hub_api=hub_api, has_control=False)
    assert d.allowed is allowed


def test_decision_is_immutable():
    d = decide_remote_forward("127.0.0.1", 0, authenticated=True, has_forward=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.allowed = False  # type: ignore[misc]
