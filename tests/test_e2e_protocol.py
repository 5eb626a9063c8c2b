"""End to end: an agent whose protocol version the broker does not serve is refused, and the
person who pressed Start reads why on the spawn page; an agent of the previous version works.

Real parts: JupyterHub with ``LocalBrokerSpawner``, CHP, ``broker serve`` and ``node-agent run``
with ``jupyterhub-singleuser`` in local batch jobs (the development stack). The announced version is
chosen per user with ``NODE_AGENT_TEST_PROTOCOL`` (the agent's test-only setting, passed in the job
environment by ``c.Spawner.environment``); everything else is the agent as it ships.
"""

from __future__ import annotations

import os

import pytest

from wire.contract import OLDEST_PROTOCOL, PROTOCOL_VERSION

from e2e import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: The version each test user's agent announces.
ANNOUNCED = {"ancient": OLDEST_PROTOCOL - 1, "future": PROTOCOL_VERSION + 1, "previous": OLDEST_PROTOCOL}
ACCEPTS = f"accepts {OLDEST_PROTOCOL}\u2013{PROTOCOL_VERSION}"


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(
        name="protocol",
        logs="e2e-protocol-logs",
        extra_hub_config=(
            f"_announced = {ANNOUNCED!r}\n"
            "c.Spawner.environment['NODE_AGENT_TEST_PROTOCOL'] = "
            "lambda spawner: str(_announced.get(spawner.user.name, ''))\n"
            "c.BrokerSpawnerMixin.broker_wait_interval = 0.5\n"
            "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}\n"
        ),
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def _refused_spawn(hub: Hub, user: str) -> tuple[str, dict, str]:
    """Start *user*'s server, which must fail: the spawn page's last message, the broker's
    session and the job's output."""
    assert hub.api(hub.user_path(user), "POST")[0] == 201
    status, _ = hub.api(hub.user_path(user) + "/server", "POST")
    assert status == 202
    events = hub.progress_events(user, timeout=120)
    assert events[-1].get("failed"), events
    session = hub.session_of(user)
    with open(os.path.join(hub.job_dir(session["job_id"]), "output.log"), errors="replace") as f:
        output = f.read()
    return events[-1]["message"], session, output


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("ancient", f"agent protocol {OLDEST_PROTOCOL - 1} is too old for this broker ({ACCEPTS}): rebuild the image"),
        ("future", f"agent protocol {PROTOCOL_VERSION + 1} is too new for this broker ({ACCEPTS}): upgrade the hub"),
    ],
)
def test_unsupported_protocol_is_refused_with_the_reason_on_the_spawn_page(hub, user, expected):
    message, session, output = _refused_spawn(hub, user)
    assert expected in message, message
    assert session["state"] == "closed" and session["end_reason"] == expected, session
    assert session["ready_at"] is None
    # the job log says it too, and the agent gave up (exit 77) instead of retrying
    assert f"node-agent: giving up: the broker refused this agent: {expected}" in output, output
    assert "broker unreachable; retrying" not in output, output
    assert hub.prefix(user).rstrip("/") not in hub.proxy_routes()  # no route was ever published


def test_agent_of_the_previous_protocol_is_served(hub):
    hub.spawn("previous")
    status, _ = hub.through_proxy("previous", "api/status")
    assert status == 200
    session = hub.session_of("previous")
    assert session["state"] == "ready"
    hub.stop("previous")
