"""End to end on the embedded local backend: real JupyterHub, real configurable-http-proxy,
the broker, the node agent and a real jupyterhub-singleuser, all as separate processes."""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest

from e2e import Hub, alive, local_job_state
from harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LAST_ACTIVITY_INTERVAL = 4


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(
        name="stack",
        logs="e2e-local-logs",
        last_activity_interval=LAST_ACTIVITY_INTERVAL,
        poll_interval=2,
        reconcile_interval=1.0,
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def test_spawn_status_kernel_and_stop(hub, stack):
    user = "zoe"
    hub.spawn(user)
    status, body = hub.through_proxy(user, "api/status")
    assert status == 200, body
    _, result = hub.run_code(user, "1+1")
    assert result == "2"

    session = hub.session_of(user)
    assert session["state"] == "ready" and session["agent_connected"]
    assert hub.proxy_routes()[f"/user/{user}"]["target"] == session["target"]
    job_id = session["job_id"]
    server_pid = hub.server_pid(job_id)
    assert alive(server_pid)
    assert session["bytes_in"] >= 0

    hub.stop(user)
    assert f"/user/{user}" not in hub.proxy_routes()
    wait_until(lambda: not alive(server_pid), 15, what="server process to end")
    state = local_job_state(stack, job_id)
    assert not state.startswith(("RUNNING", "PENDING")), state
    closed = hub.broker(f"/api/sessions/{session['id']}")[1]
    assert closed["state"] == "closed" and closed["end_reason"]
    assert closed["bytes_in"] > 0 and closed["bytes_out"] > 0  # accounting of tunnel bytes


def test_routes_stable_across_hub_route_check_and_chp_restart(hub, stack):
    user = "50fia"
    hub.spawn(user)
    target = hub.session_of(user)["target"]
    key = f"/user/{user}"
    assert hub.proxy_routes()[key]["target"] == target
    # the hub's check_routes runs every last_activity_interval: the route must not change
    time.sleep(LAST_ACTIVITY_INTERVAL * 2.5)
    assert hub.proxy_routes()[key]["target"] == target
    assert "Updating route" not in stack.log_text("hub") and "Deleting stale route" not in stack.log_text("hub")

    stack.stop_service("proxy", signal.SIGKILL)
    stack.start_proxy()
    t0 = time.monotonic()
    wait_until(lambda: key in hub.proxy_routes(), 10, what="broker to restore the route after CHP restart")
    restored_after = time.monotonic() - t0
    assert hub.proxy_routes()[key]["target"] == target
    assert restored_after < 10
    wait_until(lambda: hub.through_proxy(user, "api/status")[0] == 200, 15, what="server reachable again")
    hub.stop(user)


def test_broker_restart_keeps_the_notebook_server(hub, stack):
    user = "秀樹"
    hub.spawn(user)
    kernel_id, _ = hub.run_code(user, "x = 6 * 7\nx")
    session = hub.session_of(user)
    server_pid = hub.server_pid(session["job_id"])

    stack.stop_service("broker", signal.SIGKILL)
    assert hub.through_proxy(user, "api/status")[0] != 200  # nothing carries the traffic now
    stack.start_broker()

    def works() -> bool:
        return hub.through_proxy(user, "api/status")[0] == 200

    wait_until(works, 40, interval=0.5, what="route working again after broker restart")
    after = hub.session_of(user)
    assert after["id"] == session["id"] and after["port"] == session["port"] and after["agent_connected"]
    assert alive(server_pid) and hub.server_pid(session["job_id"]) == server_pid  # never restarted
    _, result = hub.run_code(user, "x", kernel_id=kernel_id)
    assert result == "42"  # the kernel kept its state
    hub.stop(user)


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, _, v = item.partition(b"=")
        out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _all_cmdlines() -> list[bytes]:
    lines = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                lines.append(f.read())
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            pass
    return lines


def test_enrolment_secret_never_leaks(hub, stack):
    user = "~TestJH"
    hub.spawn(user)
    session = hub.session_of(user)
    job_dir = hub.job_dir(session["job_id"])
    import json

    job = json.load(open(os.path.join(job_dir, "job.json")))
    secret = _environ(job["pid"]).get("BROKER_ENROL_SECRET", "")
    assert len(secret) >= 40, "the job environment should carry the secret (that is how it travels)"
    needle = secret.encode()

    assert not [c for c in _all_cmdlines() if needle in c], "secret on a command line"
    for name in ("hub", "broker", "proxy"):
        assert secret not in stack.log_text(name), f"secret in the {name} log"
    for path in glob.glob(os.path.join(job_dir, "*")):
        with open(path, "rb") as f:
            assert needle not in f.read(), f"secret in {path}"
    server_env = _environ(hub.server_pid(session["job_id"]))
    assert server_env and not any(secret in v for v in server_env.values()), "secret passed on to the server"
    for db in (os.path.join(stack.broker_state, "broker.sqlite"), os.path.join(stack.workdir, "jupyterhub.sqlite")):
        with open(db, "rb") as f:
            assert needle not in f.read(), f"secret stored in {db}"
    hub.stop(user)


def test_odd_usernames_end_to_end(hub, stack):
    users = ["has@", "zoe2"]
    for u in users:
        hub.spawn(u)
    for u in users:
        status, body = hub.through_proxy(u, "api/status")
        assert status == 200, (u, body)
        assert hub.session_of(u)["user"] == u
    for u in users:
        hub.stop(u)
