"""jupyterhub-idle-culler as a hub service (docs/admin.md's configuration, with the least scopes)
against real JupyterHub, configurable-http-proxy, the broker, the node agent and
jupyterhub-singleuser, with ``--timeout=30``.

Activity reaches the hub by two paths, and each kept server here is kept by one of them alone:

* ``requests``: ``GET api/status`` through CHP every few seconds. jupyter_server does not count
  ``/api/status`` as activity, so only CHP's route data (``last_activity``, read by the hub every
  ``last_activity_interval``) says the server is used;
* ``busy``: a kernel busy with a loop that prints, and no traffic through CHP after it started
  (websocket closed): only the server's own activity reports (``POST /hub/api/users/busy/activity``
  every ``JUPYTERHUB_ACTIVITY_INTERVAL``, through the agent's hub-API relay and the tunnel) say so;
* ``idle``: nothing; it is culled: job gone, session closed, route gone.
"""

from __future__ import annotations

import datetime
import re
import time

import pytest

from e2e import Hub, local_job_running
from harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TIMEOUT = 30
CULL_EVERY = 5

CULLER_CONFIG = f"""
import sys
c.JupyterHub.services.append({{
    "name": "idle-culler",
    "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout={TIMEOUT}", "--cull-every={CULL_EVERY}"],
}})
c.JupyterHub.load_roles.append({{
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": ["idle-culler"],
}})
c.Spawner.environment = {{"NODE_AGENT_HEARTBEAT": "5", "JUPYTERHUB_ACTIVITY_INTERVAL": "5"}}
"""


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): the culler as a hub service."""
    return dict(
        name="culler",
        logs="e2e-culler-logs",
        last_activity_interval=3,
        poll_interval=2,
        reconcile_interval=1.0,
        extra_hub_config=CULLER_CONFIG,
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def server_model(hub, user: str) -> dict:
    status, model = hub.api(hub.user_path(user))
    assert status == 200, model
    return model["servers"].get("", {})


def age(timestamp: str) -> float:
    """Seconds since an ISO 8601 UTC timestamp (CHP's, the hub's or jupyter_server's)."""
    when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return time.time() - when.timestamp()


def test_idle_server_culled_busy_and_requested_kept(hub, stack):
    hub.spawn("idle")
    idle = hub.session_of("idle")
    hub.spawn("busy")
    hub.run_code("busy", "import time\nfor i in range(150):\n    print(i, flush=True)\n    time.sleep(2)", wait=False)
    hub.spawn("requests")
    kept_since = time.monotonic()
    started_log = len(stack.log_text("hub"))

    def ping() -> None:
        assert hub.through_proxy("requests", "api/status")[0] == 200

    # keep pinging until the idle server is culled, then for one more timeout and a cull round
    deadline = time.monotonic() + 3 * TIMEOUT
    while server_model(hub, "idle"):
        assert time.monotonic() < deadline, "the idle server was not culled"
        ping()
        time.sleep(3)
    culled_after = time.monotonic() - kept_since
    while (
        time.monotonic() - kept_since < 2 * TIMEOUT + 2 * CULL_EVERY
        or time.monotonic() < kept_since + culled_after + TIMEOUT
    ):
        ping()
        time.sleep(3)

    # the idle one: culled by the culler, and with it its job, session and route
    culler_log = stack.log_text("hub")
    assert re.search(r"Culling server idle \((age: [^,]*, )?inactive for", culler_log), (
        "culler did not say it culled idle"
    )
    closed = hub.broker(f"/api/sessions/{idle['id']}")[1]
    assert closed["state"] == "closed"
    wait_until(lambda: not local_job_running(stack, idle["job_id"]), 20, what="idle's job to end")
    assert "/user/idle" not in hub.proxy_routes()

    # the other two: kept, over more than twice the timeout
    for user in ("busy", "requests"):
        assert server_model(hub, user).get("ready"), f"{user} was culled"
        assert hub.session_of(user)["state"] == "ready"
        assert f"Culling server {user} " not in culler_log

    # each by its own path. 'requests': the server itself saw no activity for over a timeout (its
    # own api/status says so) while CHP's route data and so the hub's model say it is in use
    routes = hub.proxy_routes()
    status, own = hub.through_proxy("requests", "api/status")
    assert status == 200
    assert routes["/user/requests"]["user"] == "requests" and routes["/user/requests"]["server_name"] == ""
    assert age(own["last_activity"]) > TIMEOUT
    assert age(routes["/user/requests"]["last_activity"]) < 10
    assert age(server_model(hub, "requests")["last_activity"]) < TIMEOUT
    # 'busy': no traffic through CHP since the kernel started, yet the hub's model is recent, from
    # the server's activity reports through the relay
    assert age(routes["/user/busy"]["last_activity"]) > TIMEOUT
    assert age(server_model(hub, "busy")["last_activity"]) < TIMEOUT
    later_log = stack.log_text("hub")[started_log:]
    assert re.search(r"20\d POST /hub/api/users/busy/activity", later_log), "no activity report from busy"
    assert hub.through_proxy("busy", "api/status")[0] == 200
    for user in ("busy", "requests"):
        hub.stop(user)
