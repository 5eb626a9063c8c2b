"""End to end on a REAL single-node Slurm: JupyterHub + CHP + broker + SlurmBrokerSpawner, the
node agent in a real Slurm job, and a real jupyterhub-singleuser.

* Slurm: if ``squeue`` does not answer, the module fixture runs ``scripts/slurm.sh start``
  (idempotent; apt-installs Slurm when missing). Every job gets the per-run job name
  ``JOB_TAG``; a fixture scancels leftovers after each test.
* ``squeue`` calls are counted by a wrapper ``squeue`` first on the hub's PATH that appends one
  line per invocation to a log file and execs the real one.
* Remote submission uses a private sshd on 127.0.0.1 (tests/sshd.py) as the "login node".
* Identity models: per-user accounts (a real account made with useradd, ``sbatch --uid/--gid``)
  and one shared service account with homes under ``home_root``; each gets its own Stack.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from devstack.stack import Stack

from e2e import Hub
from harness import running_stack, tool_path, wait_until
from slurm_cluster import JOB_TAG, SLURM_POLL_INTERVAL, hub_config, others_can_run_python, real_binary, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.timeout(900),
    pytest.mark.usefixtures("cancel_leftover_jobs"),
]

TIMINGS: dict[str, list[float]] = {}


def _job_state(job_id: str) -> str:
    """Slurm's state of the job ('' once it is purged)."""
    out = run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()
    return out


def _live_jobs() -> list[str]:
    out = run(
        real_binary("squeue"), "-h", "-n", JOB_TAG, "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING", "-o", "%i"
    ).stdout
    return out.split()


@pytest.fixture(scope="module")
def squeue_log(tmp_path_factory):
    """A wrapper squeue logging each call, in the directory of the returned log (put first on the
    PATH of the module's ``stack``)."""
    bindir = tmp_path_factory.mktemp("squeue-wrapper")
    log = bindir / "calls.log"
    log.write_text("")
    wrapper = bindir / "squeue"
    wrapper.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {log}\nexec {real_binary("squeue")} "$@"\n')
    wrapper.chmod(0o755)
    return log


def _calls(log: Path) -> list[float]:
    return [float(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]


# An admin-defined profile whose jobs cannot start for an hour (users cannot pass sbatch options).
LATER_PROFILE = (
    "c.SlurmBrokerSpawner.profiles = [{'name': 'later', 'description': 'starts in an hour', "
    "'req_options': '--begin=now+1hour'}]"
)


@pytest.fixture(scope="module")
def stack_options(slurm_cluster, squeue_log, tmp_path_factory):
    """The module's ``stack`` (conftest.py): SlurmBrokerSpawner, the squeue wrapper first on PATH."""
    workdir = str(tmp_path_factory.mktemp("slurm-stack"))
    yield dict(
        workdir=workdir,
        path=f"{squeue_log.parent}{os.pathsep}{tool_path()}",
        logs="e2e-slurm-logs",
        poll_interval=1,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, LATER_PROFILE),
    )
    spawns = TIMINGS.get("spawn", [])  # after the stack has stopped
    if spawns:
        print(
            f"\n[slurm] single spawns to ready: median {statistics.median(spawns):.1f} s over {len(spawns)}: "
            + ", ".join(f"{t:.1f}" for t in spawns)
        )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def _spawn_timed(hub: Hub, user: str, timeout: float = 180) -> float:
    t = hub.spawn(user, timeout=timeout)
    TIMINGS.setdefault("spawn", []).append(t)
    return t


# -- the basic path ----------------------------------------------------------------------------


def test_spawn_status_kernel_stop_on_slurm(hub, stack):
    user = "ada"
    t = _spawn_timed(hub, user)
    print(f"\n[slurm] spawn to ready: {t:.1f} s")
    status, body = hub.through_proxy(user, "api/status")
    assert status == 200, body
    _, result = hub.run_code(user, "1+1")
    assert result == "2"

    session = hub.session_of(user)
    job_id = session["job_id"]
    assert session["state"] == "ready" and job_id
    assert _job_state(job_id) == "RUNNING"
    assert hub.proxy_routes()[f"/user/{user}"]["target"] == session["target"]
    # the job was given only the spawner's variables, by name; the batch script holds no values
    script = run("scontrol", "write", "batch_script", job_id, "-").stdout
    assert "exec node-agent run --" in script and "--signal=B:USR1@120" in script
    assert "BROKER_ENROL_SECRET" not in script and "JUPYTERHUB_API_TOKEN" not in script
    show = run("scontrol", "show", "job", job_id).stdout
    assert "BROKER_ENROL_SECRET=" not in show and "JUPYTERHUB_API_TOKEN=" not in show

    # Slurm's walltime warning (simulated at once with scancel --signal): the agent reports it
    run("scancel", "--batch", "--signal=USR1", job_id, check=True)
    wait_until(
        lambda: hub.broker(f"/api/sessions/{session['id']}")[1].get("walltime_warning"),
        15,
        what="walltime warning in the broker's session",
    )

    hub.stop(user)
    assert f"/user/{user}" not in hub.proxy_routes()
    wait_until(lambda: _job_state(job_id) in ("", "CANCELLED", "COMPLETED"), 20, what="job to leave squeue")
    assert job_id not in _live_jobs()
    assert hub.broker(f"/api/sessions/{session['id']}")[1]["state"] == "closed"


def test_pending_job_shows_reason_and_is_cancelled_on_stop(hub, stack):
    user = "pat"
    hub.api(hub.user_path(user), "POST")
    # a job that cannot start for an hour: the admin's profile puts it into "#SBATCH {{options}}"
    status, body = hub.api(hub.user_path(user) + "/server", "POST", {"profile": "later"})
    assert status == 202, (status, body)
    messages = hub.progress_messages(user, "pending", 30)
    pending = [m for m in messages if "pending" in m][0]
    assert "BeginTime" in pending and "estimated start" in pending, pending
    job_id = pending.split()[1]
    assert _job_state(job_id) == "PENDING"

    t0 = time.monotonic()
    hub.stop(user)
    wait_until(lambda: _job_state(job_id) in ("", "CANCELLED"), 15, what="pending job cancelled")
    print(f"\n[slurm] stop of a pending job: cancelled after {time.monotonic() - t0:.1f} s")
    assert hub.session_of(user)["state"] == "closed"


def test_external_scancel_is_noticed_and_route_removed(hub, stack):
    user = "sam"
    _spawn_timed(hub, user)
    job_id = hub.session_of(user)["job_id"]
    assert f"/user/{user}" in hub.proxy_routes()
    run("scancel", job_id, check=True)
    took = hub.wait_server_and_route_gone(user)
    print(f"\n[slurm] external scancel -> server gone and route removed in {took:.1f} s")
    assert hub.session_of(user)["state"] == "closed"
    assert hub.through_proxy(user, "api/status")[0] != 200


def test_hub_restart_keeps_running_server(hub, stack):
    user = "hal"
    _spawn_timed(hub, user)
    session = hub.restart_hub_keeps_server(user)
    assert _job_state(session["job_id"]) == "RUNNING"
    hub.stop(user)
    wait_until(lambda: _job_state(session["job_id"]) in ("", "CANCELLED"), 20, what="job cancelled after stop")


def test_twenty_sessions_one_squeue_per_interval(hub, stack, squeue_log):
    """20 concurrent real jupyterhub-singleuser servers in Slurm jobs for a minute.

    The hub polls every spawner each second (Stack poll_interval=1): stock batchspawner would
    run ~20 squeue per second; the shared poller runs at most one per slurm_poll_interval.
    """
    users = [f"u{i:02d}" for i in range(20)]
    calls_before = len(_calls(squeue_log))
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(users)) as pool:
        times = list(pool.map(lambda u: hub.spawn(u, timeout=300), users))
    spawn_wall = time.monotonic() - t0
    spawn_calls = len(_calls(squeue_log)) - calls_before
    for u in users:
        assert hub.through_proxy(u, "api/status")[0] == 200, u

    window = 60.0
    start = time.time()
    time.sleep(window)
    end = time.time()
    in_window = [c for c in _calls(squeue_log) if start <= c <= end]
    # one periodic squeue per interval; +2 for the window's two edges (a query just before it
    # ends and one just after it starts can both fall inside)
    allowed = window / SLURM_POLL_INTERVAL + 2
    print(
        f"\n[slurm] 20 concurrent spawns: wall {spawn_wall:.1f} s, per spawn median "
        f"{statistics.median(times):.1f} s (max {max(times):.1f}); squeue calls during spawning: {spawn_calls}; "
        f"steady {window:.0f} s: {len(in_window)} squeue calls (allowed <= {allowed:.0f}; "
        f"stock batchspawner would need ~{20 * window:.0f})"
    )
    assert len(in_window) <= allowed
    assert len(in_window) >= window / SLURM_POLL_INTERVAL / 2  # it does poll
    live = _live_jobs()
    assert len(live) == 20
    for u in users:
        assert hub.through_proxy(u, "api/status")[0] == 200, u

    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(hub.stop, users))
    wait_until(lambda: not _live_jobs(), 30, what="all 20 jobs gone from squeue")


# -- remote submission through a login node -------------------------------------------------


@pytest.fixture(scope="module")
def remote_stack(slurm_cluster, sshd, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("slurm-remote-stack"))
    extra = sshd.hub_config()
    with running_stack(
        workdir,
        path=tool_path(),
        logs="e2e-slurm-remote-logs",
        poll_interval=2,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, extra),
    ) as s:
        yield s


def test_remote_submission_ten_spawns_one_ssh_connection(remote_stack, sshd):
    hub = Hub(remote_stack)
    accepted0 = sshd.accepted()
    users = [f"r{i}" for i in range(10)]
    with ThreadPoolExecutor(len(users)) as pool:
        times = list(pool.map(lambda u: hub.spawn(u, timeout=240), users))
    print(f"\n[slurm] 10 spawns via login node: median {statistics.median(times):.1f} s, max {max(times):.1f} s")
    for u in users:
        assert hub.through_proxy(u, "api/status")[0] == 200, u
        assert _job_state(hub.session_of(u)["job_id"]) == "RUNNING"
    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(hub.stop, users))
    wait_until(lambda: not _live_jobs(), 30, what="all jobs cancelled over SSH")
    time.sleep(0.3)
    # sbatch x10, squeue, scancel x10: all over ONE SSH connection
    assert sshd.accepted() - accepted0 == 1, sshd.accepted() - accepted0
    # the job environment went over the channel: no secret in sshd's DEBUG3 log
    log = sshd.log.read_text(errors="replace")
    assert "BROKER_ENROL_SECRET=" not in log and "JUPYTERHUB_API_TOKEN=" not in log


# -- identity models ---------------------------------------------------------------------------


def _identity_stack(tmp_path_factory, name: str, extra: str) -> AbstractContextManager[Stack]:
    workdir = str(tmp_path_factory.mktemp(name))
    # outside pytest's 0700 tmp tree: the job's (non-root) user must write its output here
    out_dir = f"/tmp/{JOB_TAG}-{name}-out"
    os.makedirs(out_dir, exist_ok=True)
    # the Stack's notebook_dir is inside its 0700 work dir: serve the job's cwd (the home) instead
    extra += '\nc.Spawner.notebook_dir = ""'
    return running_stack(
        workdir,
        path=tool_path(),
        logs=f"e2e-slurm-{name}-logs",
        poll_interval=2,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, extra, out_dir=out_dir),
    )


@pytest.fixture(scope="module")
def unix_user():
    """A real Unix account (useradd), removed afterwards."""
    import pwd
    import sys

    name = "jh" + uuid.uuid4().hex[:8]
    run("useradd", "-m", "-p", "*", "-s", "/bin/bash", name, check=True)
    # The job runs the venv's python and imports the checkout: a normal user needs to traverse
    # every directory above them (for the test's duration only).
    try:
        with others_can_run_python():
            if (
                run(
                    "runuser", "-u", name, "--", sys.executable, "-c", "import jupyterhub, broker, node_agent"
                ).returncode
                != 0
            ):
                pytest.fail(f"{sys.executable} cannot be run by a normal user here")
            yield pwd.getpwnam(name)
    finally:
        run("pkill", "-KILL", "-u", name)
        time.sleep(0.5)
        run("userdel", "-r", name)


def test_per_user_accounts_jobs_run_as_the_user(slurm_cluster, unix_user, tmp_path_factory):
    """submit_as='user': sbatch --uid=<name>; the job, the agent and the kernel run as that uid."""
    stack_running = _identity_stack(tmp_path_factory, "per-user", 'c.SlurmBrokerSpawner.submit_as = "user"')
    try:
        with stack_running as stack:
            hub = Hub(stack)
            user = unix_user.pw_name
            hub.spawn(user, timeout=180)
            job_id = hub.session_of(user)["job_id"]
            assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%u").stdout.strip() == user
            _, result = hub.run_code(user, "import os; (os.getuid(), os.getgid(), os.environ['HOME'], os.getcwd())")
            assert result == repr((unix_user.pw_uid, unix_user.pw_gid, unix_user.pw_dir, unix_user.pw_dir))
            assert os.path.exists(f"/tmp/{JOB_TAG}-per-user-out/jupyterhub-{user}-{job_id}.log")
            hub.stop(user)
            wait_until(lambda: _job_state(job_id) in ("", "CANCELLED"), 20, what="job cancelled")
    finally:
        shutil.rmtree(f"/tmp/{JOB_TAG}-per-user-out", ignore_errors=True)


def test_shared_service_account_homes_under_root(slurm_cluster, tmp_path_factory):
    """submit_as='service' + home_root: every job runs as the hub's account, each user in
    home_root/<name> (created 0700 by the job on first use)."""
    home_root = f"/tmp/{JOB_TAG}-homes"
    os.makedirs(home_root, exist_ok=True)
    stack_running = _identity_stack(tmp_path_factory, "service", f"c.SlurmBrokerSpawner.home_root = {home_root!r}")
    try:
        with stack_running as stack:
            hub = Hub(stack)
            users = ["svc-a", "svc-b"]
            for u in users:
                hub.spawn(u, timeout=180)
            me = run("id", "-un").stdout.strip()
            for u in users:
                job_id = hub.session_of(u)["job_id"]
                assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%u").stdout.strip() == me
                _, result = hub.run_code(u, "import os; (os.environ['HOME'], os.getcwd())")
                home = os.path.join(home_root, u)
                assert result == repr((home, home))
                assert os.stat(home).st_mode & 0o777 == 0o700
            for u in users:
                hub.stop(u)
    finally:
        shutil.rmtree(home_root, ignore_errors=True)
        shutil.rmtree(f"/tmp/{JOB_TAG}-service-out", ignore_errors=True)
