"""Named servers end to end (``c.JupyterHub.allow_named_servers = True``): real JupyterHub, real
configurable-http-proxy, the broker, the node agent and real jupyterhub-singleuser servers, several
per user, each with its own job, broker session and route."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hub_plugin.status_service import render_rows

from e2e import Hub, alive, local_job_running
from harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): named servers allowed."""
    return dict(
        name="named",
        logs="e2e-named-logs",
        last_activity_interval=4,
        poll_interval=2,
        reconcile_interval=1.0,
        extra_hub_config="c.JupyterHub.allow_named_servers = True\nc.JupyterHub.named_server_limit_per_user = 3\n",
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def broker_status(stack, *args: str) -> str:
    """``broker status`` (the admin's command) against the stack's broker."""
    r = subprocess.run(
        [sys.executable, "-m", "broker.app", "status", f"--BrokerApp.api_url={stack.broker_url}", *args],
        env=dict(os.environ, BROKER_API_TOKEN=stack.broker_token),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_one_user_two_named_servers(hub, stack):
    user = "zoe"
    for name in ("one", "two"):
        hub.spawn(user, server=name)
    sessions = {name: hub.session_of(user, name) for name in ("one", "two")}
    for name, s in sessions.items():
        assert hub.through_proxy(user, "api/status", server=name)[0] == 200
        assert s["state"] == "ready" and s["routespec"] == f"/user/{user}/{name}/"
        assert hub.proxy_routes()[f"/user/{user}/{name}"]["target"] == s["target"]
    # each its own job, session, port and server process
    assert len({s["id"] for s in sessions.values()}) == 2
    assert len({s["job_id"] for s in sessions.values()}) == 2
    assert len({s["port"] for s in sessions.values()}) == 2
    pids = {name: hub.server_pid(s["job_id"]) for name, s in sessions.items()}
    assert len(set(pids.values())) == 2
    _, result = hub.run_code(user, "1+1", server="two")
    assert result == "2"

    # the server name in broker status (table and JSON), on the admin page's table and in the hub's model
    rows = [line.split() for line in broker_status(stack).splitlines()]
    assert ["zoe", "one", sessions["one"]["job_id"]] in [r[:3] for r in rows]
    assert ["zoe", "two", sessions["two"]["job_id"]] in [r[:3] for r in rows]
    listed = json.loads(broker_status(stack, "--json"))
    assert {(s["user"], s["server_name"]) for s in listed} >= {("zoe", "one"), ("zoe", "two")}
    page = render_rows(listed)
    assert "<td>one</td>" in page and "<td>two</td>" in page
    status, model = hub.api(hub.user_path(user))
    assert status == 200 and {"one", "two"} <= set(model["servers"])

    # stopping one leaves the other running
    hub.stop(user, server="one")
    closed = hub.broker(f"/api/sessions/{sessions['one']['id']}")[1]
    assert closed["state"] == "closed"
    assert "/user/zoe/one" not in hub.proxy_routes()
    wait_until(lambda: not alive(pids["one"]), 15, what="server 'one' to end")
    wait_until(lambda: not local_job_running(stack, sessions["one"]["job_id"]), 15, what="job of 'one' to end")
    assert hub.through_proxy(user, "api/status", server="one")[0] != 200
    assert hub.through_proxy(user, "api/status", server="two")[0] == 200
    assert hub.session_of(user, "two")["state"] == "ready" and alive(pids["two"])
    assert local_job_running(stack, sessions["two"]["job_id"])
    _, result = hub.run_code(user, "3*3", server="two")
    assert result == "9"
    hub.stop(user, server="two")


def test_two_users_same_server_name(hub, stack):
    users = ("ana", "bob")
    for u in users:
        hub.spawn(u, server="lab")
    sessions = {u: hub.session_of(u, "lab") for u in users}
    routes = hub.proxy_routes()
    for u, s in sessions.items():
        assert hub.through_proxy(u, "api/status", server="lab")[0] == 200
        route = routes[f"/user/{u}/lab"]
        assert route["target"] == s["target"] and route["user"] == u and route["server_name"] == "lab"
    assert sessions["ana"]["id"] != sessions["bob"]["id"] and sessions["ana"]["port"] != sessions["bob"]["port"]
    assert sessions["ana"]["job_id"] != sessions["bob"]["job_id"]
    # each route leads to its own user's server: the server's environment names its user
    for u, s in sessions.items():
        with open(f"/proc/{hub.server_pid(s['job_id'])}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"JUPYTERHUB_USER"] == u.encode() and env[b"JUPYTERHUB_SERVER_NAME"] == b"lab"

    hub.stop("ana", server="lab")
    assert hub.session_of("ana", "lab")["state"] == "closed"
    assert hub.through_proxy("bob", "api/status", server="lab")[0] == 200
    assert hub.session_of("bob", "lab")["state"] == "ready"
    hub.stop("bob", server="lab")
