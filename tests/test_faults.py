"""Faults, end to end: real JupyterHub + CHP + broker + node agents + jupyterhub-singleuser.

- the broker killed (-9) with several sessions live: agents reconnect with jitter, routes come
  back, no session is lost and kernel state survives;
- the hub restarted: the spawner's state is reloaded and the server stays usable;
- the node agent SIGKILLed / the notebook server SIGKILLed: the session closes with a reason,
  the route goes, the hub's poll sees it;
- SIGTERM to the broker during a large download: it exits 0, leaves no destroyed tasks, keeps
  the sessions live in its store and flushes the byte counters;
- a compute node's network cut (network namespace, link down 10 s; 30 s with
  RELIABILITY_FULL=1): the broker notices the half-open connection within keepalive x count,
  the agent reconnects when the link returns, same port, the route works, the kernel survives.

Sizes: RELIABILITY_FULL=1 runs more sessions and longer cuts.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import sqlite3
import threading
import time
import urllib.request

import pytest

from e2e import Hub, alive
from harness import running_stack, tool_path, wait_until
from reliability import NodeNetwork, have_netns, record, size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FAST_AGENT = (
    'c.Spawner.environment = {"NODE_AGENT_HEARTBEAT": "2", "NODE_AGENT_KEEPALIVE": "2", '
    '"NODE_AGENT_RECONNECT_CAP": "4"}\n'
)


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(
        name="faults",
        logs="faults-logs",
        poll_interval=2,
        reconcile_interval=1.0,
        extra_broker_args=["--Broker.keepalive_interval=2", "--Broker.keepalive_count_max=3"],
        extra_hub_config=FAST_AGENT,
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def spawn_all(hub: Hub, users: list[str], timeout: float = 180) -> None:
    """Start several servers at once and wait for all of them."""
    for u in users:
        if hub.api(hub.user_path(u))[0] == 404:
            assert hub.api(hub.user_path(u), "POST")[0] == 201
        status, body = hub.api(hub.user_path(u) + "/server", "POST")
        assert status in (201, 202), (status, body)
    deadline = time.monotonic() + timeout
    pending = set(users)
    while pending and time.monotonic() < deadline:
        for u in list(pending):
            _, info = hub.api(hub.user_path(u))
            if info.get("servers", {}).get("", {}).get("ready"):
                pending.discard(u)
        time.sleep(0.3)
    assert not pending, f"not ready: {pending}"


def job_output(hub: Hub, job_id: str) -> str:
    with open(os.path.join(hub.job_dir(job_id), "output.log"), errors="replace") as f:
        return f.read()


def agent_pid(hub: Hub, job_id: str) -> int:
    """The node-agent process of a job (``node-agent run`` below the job's script)."""
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if any(a.endswith(b"node-agent") for a in argv[:2]) and b"run" in argv[:3]:
            pid = int(path.split("/")[2])
            if _job_of_pid(hub, pid) == job_id:
                return pid
    raise AssertionError(f"no node-agent process for job {job_id}")


def _job_of_pid(hub: Hub, pid: int) -> str | None:
    """Walk up the parents until a localbatch job wrapper (its cwd/argv name the job dir)."""
    spool = os.path.join(hub.stack.workdir, "spool")
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            return None
        m = re.search(re.escape(spool) + r"/(\d+)/", argv)
        if m:
            return m.group(1)
        pid = ppid
    return None


def route_works(hub: Hub, user: str) -> bool:
    return hub.through_proxy(user, "api/status")[0] == 200


# -- broker kill -9 with several sessions -----------------------------------------------------
def test_broker_kill9_with_several_sessions(hub, stack):
    users = [f"k9u{i}" for i in range(size(3, 6))]
    spawn_all(hub, users)
    kernels, before = {}, {}
    for i, u in enumerate(users):
        kernels[u], _ = hub.run_code(u, f"v = {i} * 1000 + 7\nv")
        before[u] = hub.session_of(u)
    outputs_before = {u: len(job_output(hub, before[u]["job_id"])) for u in users}

    stack.stop_service("broker", signal.SIGKILL)
    down = size(4, 10)
    time.sleep(down)  # agents retry with capped, jittered backoff meanwhile
    t0 = time.monotonic()
    stack.start_broker()
    for u in users:
        wait_until(lambda u=u: route_works(hub, u), 60, interval=0.3, what=f"route of {u} after broker restart")
    back_after = time.monotonic() - t0
    delays: dict[str, list[float]] = {}
    for u in users:
        after = hub.session_of(u)
        assert (after["id"], after["port"], after["state"]) == (before[u]["id"], before[u]["port"], "ready")
        assert after["agent_connected"]
        _, result = hub.run_code(u, "v", kernel_id=kernels[u])
        assert result == str(users.index(u) * 1000 + 7), "kernel state lost"
        tail = job_output(hub, before[u]["job_id"])[outputs_before[u] :]
        delays[u] = [float(x) for x in re.findall(r"retrying .*delay=([0-9.]+)", tail)]
        assert delays[u], f"{u}: agent did not log its retries:\n{tail}"
        assert max(delays[u]) <= 4.0 + 1e-6, "delay above the configured cap"
    # jitter: the agents did not retry in lock-step
    # (delays are logged to 0.01 s, so two agents may share one value by chance, not a sequence)
    sequences = [tuple(d[:3]) for d in delays.values()]
    assert len(set(sequences)) == len(sequences) and len({d[0] for d in delays.values()}) > 1, delays
    record(
        "broker kill -9",
        sessions=len(users),
        down_s=down,
        all_routes_back_s=round(back_after, 2),
        retry_delays={u: d[:6] for u, d in delays.items()},
    )
    for u in users:
        hub.stop(u)


# -- hub restart ------------------------------------------------------------------------------
def test_hub_restart_reloads_spawner_state(hub, stack):
    user = "hubrs"
    hub.spawn(user)
    kernel, _ = hub.run_code(user, "w = 'still here'\nw")
    session = hub.session_of(user)
    stack.stop_service("hub")
    assert route_works(hub, user), "the notebook does not depend on the hub being up"
    t0 = time.monotonic()
    stack.start_hub()
    _, info = hub.api(hub.user_path(user))
    assert info["servers"][""]["ready"], info
    assert hub.run_code(user, "w", kernel_id=kernel)[1] == "'still here'"
    assert hub.session_of(user)["id"] == session["id"]  # the same broker session, not a new spawn
    assert "Updating route" not in stack.log_text("hub")[-20000:]
    record("hub restart", hub_back_s=round(time.monotonic() - t0, 2))
    hub.stop(user)  # stop() works: it needed the reloaded session id and job id
    closed = hub.broker(f"/api/sessions/{session['id']}")[1]
    assert closed["state"] == "closed"


# -- agent and server killed ------------------------------------------------------------------
def _wait_gone(hub: Hub, user: str, session_id: str, timeout: float = 30) -> float:
    t0 = time.monotonic()
    wait_until(
        lambda: not hub.api(hub.user_path(user))[1].get("servers"),
        timeout,
        interval=0.2,
        what=f"hub poll to notice {user}'s server is gone",
    )
    noticed = time.monotonic() - t0
    s = hub.broker(f"/api/sessions/{session_id}")[1]
    assert s["state"] == "closed" and s["end_reason"], s
    assert f"/user/{user}" not in hub.proxy_routes()
    return noticed


def test_agent_sigkill_ends_the_job_and_the_session(hub, stack):
    user = "agentk"
    hub.spawn(user)
    session = hub.session_of(user)
    server = hub.server_pid(session["job_id"])
    pid = agent_pid(hub, session["job_id"])
    os.kill(pid, signal.SIGKILL)
    noticed = _wait_gone(hub, user, session["id"])
    wait_until(lambda: not alive(server), 15, what="the orphaned server to be cleaned up with the job")
    s = hub.broker(f"/api/sessions/{session['id']}")[1]
    record("agent SIGKILL", hub_noticed_s=round(noticed, 2), end_reason=s["end_reason"])


def test_singleuser_crash_closes_session_with_reason(hub, stack):
    user = "srvk"
    hub.spawn(user)
    session = hub.session_of(user)
    os.kill(hub.server_pid(session["job_id"]), signal.SIGKILL)
    noticed = _wait_gone(hub, user, session["id"])
    s = hub.broker(f"/api/sessions/{session['id']}")[1]
    assert "server exited with status" in s["end_reason"], s
    assert s["exit_status"] not in (None, 0), s
    wait_until(
        lambda: (
            os.path.exists(os.path.join(hub.job_dir(session["job_id"]), "exit_status"))
            or "server exited" in job_output(hub, session["job_id"])
        ),
        15,
        what="job end",
    )
    assert "server exited" in job_output(hub, session["job_id"])
    record(
        "singleuser SIGKILL", hub_noticed_s=round(noticed, 2), end_reason=s["end_reason"], exit_status=s["exit_status"]
    )


# -- SIGTERM during a large transfer ----------------------------------------------------------
def test_broker_sigterm_during_large_transfer_is_graceful(hub, stack):
    user = "bigdl"
    hub.spawn(user)
    session = hub.session_of(user)
    big = os.path.join(stack.workdir, "notebooks", "big.bin")
    with open(big, "wb") as f:
        f.truncate(size(300, 1000) * 1024 * 1024)
    got = {"bytes": 0, "error": None}
    started = threading.Event()

    def download() -> None:
        req = urllib.request.Request(
            stack.public_url + hub.prefix(user) + "files/big.bin",
            headers={"Authorization": f"token {stack.admin_token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    got["bytes"] += len(chunk)
                    if got["bytes"] > 20 << 20:
                        started.set()
        except Exception as exc:  # noqa: BLE001 - the broker goes away mid-stream
            got["error"] = repr(exc)
        started.set()

    t = threading.Thread(target=download, daemon=True)
    t.start()
    assert started.wait(60) and got["bytes"] > 20 << 20, got
    proc = stack.procs["broker"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(20)
    stop_s = time.monotonic() - t0
    stack.procs.pop("broker")
    t.join(5)  # the client sees the stream cut (or a read timeout); it is not what we test
    log = stack.log_text("broker")
    assert rc == 0, log[-3000:]
    for bad in ("Task was destroyed", "Traceback", "Exception in callback", "was never awaited"):
        assert bad not in log, f"{bad!r} in broker log:\n{log[-3000:]}"
    assert "broker stopped" in log
    db = sqlite3.connect(os.path.join(stack.broker_state, "broker.sqlite"))
    state, bytes_out = db.execute("SELECT state, bytes_out FROM sessions WHERE id=?", (session["id"],)).fetchone()
    db.close()
    assert state == "ready", "the session must stay live across a broker stop"
    assert bytes_out >= got["bytes"] * 0.9, (bytes_out, got)  # counters flushed at stop
    stack.start_broker()
    wait_until(lambda: route_works(hub, user), 60, interval=0.3, what="route after broker restart")
    record(
        "broker SIGTERM mid-transfer",
        downloaded_mib=got["bytes"] >> 20,
        stop_s=round(stop_s, 2),
        exit_status=rc,
        bytes_out_flushed=bytes_out,
    )
    os.unlink(big)
    hub.stop(user)


# -- network cut (network namespace) ----------------------------------------------------------
@pytest.fixture(scope="module")
def node_stack(tmp_path_factory):
    if not have_netns():
        pytest.skip("needs root and `ip netns`")
    net = NodeNetwork(7).create()
    keepalive, count = 1, 3
    try:
        with running_stack(
            str(tmp_path_factory.mktemp("netcut")),
            path=tool_path(),
            logs="netcut-logs",
            poll_interval=2,
            reconcile_interval=1.0,
            broker_ssh_host=net.hub_ip,
            extra_broker_args=[f"--Broker.keepalive_interval={keepalive}", f"--Broker.keepalive_count_max={count}"],
            extra_hub_config=FAST_AGENT
            + "c.LocalBrokerSpawner.agent_command = "
            + repr(" ".join(net.prefix()) + " node-agent run --")
            + "\n",
        ) as s:
            s.net = net  # type: ignore[attr-defined]
            s.keepalive_bound = keepalive * (count + 1)  # type: ignore[attr-defined]
            try:
                yield s
            finally:
                net.link(True)  # before the stack stops
    finally:
        net.destroy()


def test_node_network_cut_and_half_open_detection(node_stack):
    stack, net = node_stack, node_stack.net
    hub = Hub(stack)
    user = "netcut"
    hub.spawn(user)
    kernel, _ = hub.run_code(user, "n = 'survives the cut'\nn")
    before = hub.session_of(user)
    assert before["node_reported"], before  # the agent said hello (its node name, as reported)
    cut = size(10, 30)
    net.link(False)
    t0 = time.monotonic()
    wait_until(
        lambda: not hub.session_of(user)["agent_connected"],
        stack.keepalive_bound + 5,
        interval=0.1,
        what="broker to notice the half-open agent connection",
    )
    detected = time.monotonic() - t0
    assert detected <= stack.keepalive_bound + 1.5, detected
    remaining = cut - (time.monotonic() - t0)
    if remaining > 0:
        time.sleep(remaining)
    assert hub.session_of(user)["state"] == "ready", "a cut network does not end the session"
    net.link(True)
    t1 = time.monotonic()
    wait_until(lambda: hub.session_of(user)["agent_connected"], 60, interval=0.2, what="agent to reconnect")
    reconnected = time.monotonic() - t1
    after = hub.session_of(user)
    assert (after["id"], after["port"]) == (before["id"], before["port"])
    wait_until(lambda: route_works(hub, user), 20, interval=0.3, what="route after the cut")
    assert hub.run_code(user, "n", kernel_id=kernel)[1] == "'survives the cut'"
    record(
        "node network cut",
        cut_s=cut,
        half_open_detected_s=round(detected, 2),
        bound_s=stack.keepalive_bound,
        reconnected_after_link_up_s=round(reconnected, 2),
    )
    hub.stop(user)
