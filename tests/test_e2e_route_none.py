"""``c.Broker.route_publisher_class = "none"`` end to end: the broker keeps only the ports and
publishes no routes; real JupyterHub's own ConfigurableHTTPProxy class adds the route when the
spawner returns, to the same target (real CHP, broker, node agent, jupyterhub-singleuser)."""

from __future__ import annotations

import time

import pytest

from broker.proxy import ROUTE_TAG_KEY

from e2e import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHECK_INTERVAL = 2


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): the broker publishes no routes."""
    return dict(
        name="route-none",
        logs="e2e-route-none-logs",
        last_activity_interval=CHECK_INTERVAL,
        poll_interval=2,
        extra_broker_args=["--Broker.route_publisher_class=none"],
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def test_the_hub_adds_the_route_the_broker_keeps_the_port(hub, stack):
    user = "zoe"
    hub.spawn(user)
    session = hub.session_of(user)
    route = hub.proxy_routes()[f"/user/{user}"]
    assert route["target"] == session["target"]
    assert ROUTE_TAG_KEY not in route  # the hub's route, not the broker's
    assert hub.through_proxy(user, "api/status")[0] == 200
    _, result = hub.run_code(user, "1+1")
    assert result == "2"
    # the hub's route check keeps it as it is
    time.sleep(CHECK_INTERVAL * 3)
    assert hub.proxy_routes()[f"/user/{user}"]["target"] == route["target"]
    for word in ("Adding missing route", "Updating route", "Deleting stale route"):
        assert word not in stack.log_text("hub")
    for word in ("route added", "route restored", "route deleted"):
        assert word not in stack.log_text("broker")
    hub.stop(user)
    assert f"/user/{user}" not in hub.proxy_routes()
    assert hub.session_of(user)["state"] == "closed"
