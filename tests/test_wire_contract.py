"""The wire contract's protocol check (wire/contract.py): which versions the broker serves and
what it tells the others. Pure; the refusal on a live connection is in test_control_channel.py,
and on the spawn page in test_e2e_protocol.py."""

from __future__ import annotations

import pytest

from wire.contract import OLDEST_PROTOCOL, PROTOCOL_VERSION, protocol_refusal

ACCEPTS = f"(accepts {OLDEST_PROTOCOL}\u2013{PROTOCOL_VERSION})"


def test_the_current_and_the_previous_version_are_served():
    assert OLDEST_PROTOCOL == PROTOCOL_VERSION - 1
    assert protocol_refusal(PROTOCOL_VERSION) is None
    assert protocol_refusal(OLDEST_PROTOCOL) is None


def test_older_agents_are_told_to_rebuild_the_image():
    old = OLDEST_PROTOCOL - 1
    assert protocol_refusal(old) == f"agent protocol {old} is too old for this broker {ACCEPTS}: rebuild the image"
    assert protocol_refusal(-5) == f"agent protocol -5 is too old for this broker {ACCEPTS}: rebuild the image"


def test_newer_agents_are_told_to_upgrade_the_hub():
    new = PROTOCOL_VERSION + 1
    assert protocol_refusal(new) == f"agent protocol {new} is too new for this broker {ACCEPTS}: upgrade the hub"


@pytest.mark.parametrize("announced", [None, "2", str(PROTOCOL_VERSION), True, False, 2.0, [PROTOCOL_VERSION]])
def test_no_integer_version_is_refused(announced):
    reason = protocol_refusal(announced)
    assert reason == f"the agent announced no protocol version; this broker {ACCEPTS[1:-1]}: rebuild the image"
