"""End to end on a REAL Grid Engine (Debian's Son of Grid Engine 8.1.9, single-host cell from
scripts/sge.sh): JupyterHub + CHP + broker + GridEngineBrokerSpawner, the node agent in a real
Grid Engine job, and a real jupyterhub-singleuser.

* The cell: if ``qstat`` does not answer, the module fixture runs ``scripts/sge.sh start``
  (idempotent; apt-installs the packages when missing). It runs beside the project's Slurm.
  Every job gets the per-run job name ``JOB_TAG``; a fixture deletes leftovers after each test.
* ``qstat`` and ``qsub`` calls are recorded by wrappers first on the hub's PATH that append one
  line per invocation (time and arguments: the command line) to a log file and exec the real one.
"""

from __future__ import annotations

import glob
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from e2e import Hub
from harness import tool_path, wait_until
from sge_cluster import GE_POLL_INTERVAL, QUEUE, ge, hub_config, tagged_jobs
from slurm_cluster import real_binary

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.sge,
    pytest.mark.timeout(900),
    pytest.mark.usefixtures("qdel_leftover_jobs"),
]


def _job_state(job_id: str) -> str:
    """Grid Engine's state letters of the job ('' once it has left qstat)."""
    for line in ge("qstat", "-u", "*").stdout.splitlines()[2:]:
        fields = line.split()
        if fields and fields[0] == job_id:
            return fields[4]
    return ""


@pytest.fixture(scope="module")
def call_log(tmp_path_factory):
    """Wrappers ``qstat`` and ``qsub`` logging each call ("<epoch> <command> <args>") to the
    returned file; their directory goes first on the PATH of the module's ``stack``."""
    bindir = tmp_path_factory.mktemp("ge-wrappers")
    log = bindir / "calls.log"
    log.write_text("")
    for cmd in ("qstat", "qsub"):
        wrapper = bindir / cmd
        wrapper.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {cmd} $*" >> {log}\nexec {real_binary(cmd)} "$@"\n')
        wrapper.chmod(0o755)
    return log


def _calls(log: Path, cmd: str) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text().splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[1] == cmd:
            out.append((float(parts[0]), parts[2] if len(parts) > 2 else ""))
    return out


@pytest.fixture(scope="module")
def stack_options(sge_cluster, call_log, tmp_path_factory):
    """The module's ``stack`` (conftest.py): GridEngineBrokerSpawner, the wrappers first on PATH."""
    workdir = str(tmp_path_factory.mktemp("sge-stack"))
    os.chmod(workdir, 0o755)
    return dict(
        workdir=workdir,
        path=f"{call_log.parent}{os.pathsep}{tool_path()}",
        logs="e2e-sge-logs",
        poll_interval=1,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.gridengine.GridEngineBrokerSpawner",
        extra_hub_config=hub_config(
            workdir,
            # qsub runs with the job's PATH (req_path first): name the wrapper by its path
            f"c.GridEngineBrokerSpawner.batch_submit_cmd = {str(call_log.parent / 'qsub') + ' -terse'!r}\n"
            f"c.GridEngineBrokerSpawner.qstat_command = {str(call_log.parent / 'qstat')!r}",
        ),
    )


@pytest.fixture(scope="module")
def hub(stack):
    return Hub(stack)


def _out_dir(stack) -> str:
    return os.path.join(stack.workdir, "sge-out")


# -- the basic path ----------------------------------------------------------------------------


def test_spawn_status_kernel_stop_on_grid_engine(hub, stack):
    user = "ada"
    t = hub.spawn(user, timeout=180)
    print(f"\n[sge] spawn to ready: {t:.1f} s")
    status, body = hub.through_proxy(user, "api/status")
    assert status == 200, body
    _, result = hub.run_code(user, "1+1")
    assert result == "2"

    session = hub.session_of(user)
    job_id = session["job_id"]
    assert session["state"] == "ready" and job_id
    assert _job_state(job_id) == "r"
    assert hub.proxy_routes()[f"/user/{user}"]["target"] == session["target"]

    t0 = time.monotonic()
    hub.stop(user)
    assert f"/user/{user}" not in hub.proxy_routes()
    wait_until(lambda: _job_state(job_id) == "", 30, what="job to leave qstat")
    print(f"\n[sge] stop -> job gone from qstat in {time.monotonic() - t0:.1f} s")
    assert ge("qstat", "-j", job_id).returncode != 0  # unknown to Grid Engine now
    assert hub.broker(f"/api/sessions/{session['id']}")[1]["state"] == "closed"


def _job_environ(job_id: str) -> dict[str, str]:
    """The environment of the job's node agent (a process whose JOB_ID is the job's)."""
    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            raw = Path(environ).read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("JOB_ID") == job_id and env.get("JUPYTERHUB_API_TOKEN"):
            return env
    raise AssertionError(f"no process of job {job_id} with a JUPYTERHUB_API_TOKEN")


def test_secret_in_no_qstat_j_script_or_command_line(hub, stack, call_log):
    user = "sec"
    hub.spawn(user, timeout=180)
    job_id = hub.session_of(user)["job_id"]
    env = _job_environ(job_id)
    secret_values = [env["JUPYTERHUB_API_TOKEN"]] + [env[k] for k in ("BROKER_ENROL_SECRET",) if env.get(k)]
    assert all(len(v) >= 16 for v in secret_values)

    qstat_j = ge("qstat", "-j", job_id).stdout
    assert "env_list:" in qstat_j and "JUPYTERHUB_ENV_FILE=" in qstat_j  # variables went by -v ...
    assert "JUPYTERHUB_SERVICE_PREFIX=" in qstat_j
    scripts = [p for p in glob.glob(f"/var/spool/gridengine/*/job_scripts/{job_id}") if os.path.isfile(p)]
    scripts += glob.glob(f"/var/spool/gridengine/execd/*/job_scripts/{job_id}")
    assert scripts, "the spooled job script"
    script = Path(scripts[0]).read_text()
    assert "exec node-agent run --" in script and "#$ -l h_rt=0:30:00" in script
    command_lines = "\n".join(args for _, args in _calls(call_log, "qsub") + _calls(call_log, "qstat"))
    assert "-v " in command_lines and "JUPYTERHUB_ENV_FILE" in command_lines
    for value in secret_values:  # ... but no secret: not in qstat -j, the script or a command line
        assert value not in qstat_j
        assert value not in script
        assert value not in command_lines
    # the secrets file was read and deleted by the job
    assert not glob.glob(os.path.join(_out_dir(stack), ".jupyterhub-env-*"))
    hub.stop(user)


def test_pending_job_shows_reason_and_is_cancelled_on_stop(hub, stack):
    user = "pat"
    ge("qmod", "-d", QUEUE, check=True)
    try:
        hub.api(hub.user_path(user), "POST")
        status, body = hub.api(hub.user_path(user) + "/server", "POST")
        assert status == 202, (status, body)
        messages = hub.progress_messages(user, "pending", 30)
        pending = [m for m in messages if "pending" in m][0]
        assert "disabled" in pending, pending  # the scheduler's reason, from qstat -j
        job_id = pending.split()[1]
        assert _job_state(job_id) == "qw"
        assert glob.glob(os.path.join(_out_dir(stack), ".jupyterhub-env-*"))  # waits for the job

        t0 = time.monotonic()
        hub.stop(user)
        wait_until(lambda: _job_state(job_id) == "", 15, what="pending job deleted")
        print(f"\n[sge] stop of a pending job: deleted after {time.monotonic() - t0:.1f} s")
        assert hub.session_of(user)["state"] == "closed"
        assert not glob.glob(os.path.join(_out_dir(stack), ".jupyterhub-env-*"))  # stop() removed it
    finally:
        ge("qmod", "-e", QUEUE)


def test_external_qdel_is_noticed_and_route_removed(hub, stack):
    user = "sam"
    hub.spawn(user, timeout=180)
    job_id = hub.session_of(user)["job_id"]
    assert f"/user/{user}" in hub.proxy_routes()
    ge("qdel", job_id, check=True)
    took = hub.wait_server_and_route_gone(user)
    print(f"\n[sge] external qdel -> server gone and route removed in {took:.1f} s")
    assert hub.session_of(user)["state"] == "closed"
    assert hub.through_proxy(user, "api/status")[0] != 200


def test_hub_restart_keeps_running_server(hub, stack):
    user = "hal"
    hub.spawn(user, timeout=180)
    session = hub.restart_hub_keeps_server(user)
    assert _job_state(session["job_id"]) == "r"
    hub.stop(user)
    wait_until(lambda: _job_state(session["job_id"]) == "", 30, what="job deleted after stop")


def test_walltime_warning_reaches_agent_and_server_lives_on(hub, stack):
    """runtime 2:15 with the configured 120 s warning: h_rt=135 s, s_rt=15 s. Grid Engine sends
    SIGUSR1 to the job's process group at s_rt; the agent reports it, the server keeps running."""
    user = "wal"
    hub.spawn(user, timeout=180, options={"runtime": "0:02:15"})
    session = hub.session_of(user)
    job_id = session["job_id"]
    limits = ge("qstat", "-j", job_id).stdout
    assert "h_rt=135" in limits and "s_rt=15" in limits, limits
    t0 = time.monotonic()
    wait_until(
        lambda: hub.broker(f"/api/sessions/{session['id']}")[1].get("walltime_warning"),
        60,
        interval=0.5,
        what="walltime warning in the broker's session",
    )
    print(f"\n[sge] walltime warning seen {time.monotonic() - t0:.1f} s after ready (s_rt 15 s after start)")
    assert _job_state(job_id) == "r"
    output = Path(_out_dir(stack), f"jupyterhub-{user}-{job_id}.log").read_text()
    # the signal came while the server ran (the whole process group gets it) ...
    assert output.index("server started") < output.index("walltime warning received"), output
    assert hub.through_proxy(user, "api/status")[0] == 200  # ... and did not end it
    _, result = hub.run_code(user, "2+3")
    assert result == "5"
    hub.stop(user)


def test_ten_sessions_one_qstat_per_interval(hub, stack, call_log):
    """10 concurrent real servers in Grid Engine jobs. The hub polls every spawner each second
    (Stack poll_interval=1): stock batchspawner would run ~10 qstat per second; the shared
    poller runs one per ge_poll_interval (and no qstat -j: no job waits)."""
    users = [f"g{i:02d}" for i in range(10)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(users)) as pool:
        times = list(pool.map(lambda u: hub.spawn(u, timeout=300), users))
    spawn_wall = time.monotonic() - t0
    for u in users:
        assert hub.through_proxy(u, "api/status")[0] == 200, u

    window = 30.0
    start = time.time()
    time.sleep(window)
    end = time.time()
    in_window = [args for at, args in _calls(call_log, "qstat") if start <= at <= end]
    allowed = window / GE_POLL_INTERVAL + 2  # +2 for the window's edges
    print(
        f"\n[sge] 10 concurrent spawns: wall {spawn_wall:.1f} s, per spawn median {statistics.median(times):.1f} s "
        f"(max {max(times):.1f}); steady {window:.0f} s: {len(in_window)} qstat calls (allowed <= {allowed:.0f}; "
        f"stock batchspawner would need ~{10 * window:.0f})"
    )
    assert len(in_window) <= allowed
    assert len(in_window) >= window / GE_POLL_INTERVAL / 2  # it does poll
    assert all(args.startswith("-xml -u ") for args in in_window), in_window  # one summary, no -j
    assert len(set(tagged_jobs())) == 10

    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(hub.stop, users))
    wait_until(lambda: not tagged_jobs(), 30, what="all 10 jobs gone from qstat")


# -- the options form on Grid Engine -----------------------------------------------------------


@pytest.mark.asyncio
async def test_form_queues_and_limits_from_qconf(sge_cluster):
    """The spawner reads the queues (qconf -sql) and their slots and h_rt (qconf -sq) from the
    real cell (stand-in user/hub objects: no hub is needed for the form)."""
    from hub_plugin.gridengine import GridEngineBrokerSpawner

    user = SimpleNamespace(name="root", url="/user/root/", escaped_name="root")
    hub_ns = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    sp = GridEngineBrokerSpawner(
        user=user, hub=hub_ns, cmd=["jupyterhub-singleuser"], qconf_command=real_binary("qconf")
    )
    parts = await sp.cluster_partitions()
    queue = next(p for p in parts if p.name == QUEUE)
    slots = int(ge("qconf", "-sq", QUEUE).stdout.split("slots", 1)[1].split()[0])
    assert queue.max_time == 8 * 3600 and queue.cpus == 1 and queue.default
    form = await sp.render_options_form()
    assert f"{QUEUE}: up to 1 CPUs, max 8 h 00 min" in form, form
    sp2 = GridEngineBrokerSpawner(
        user=user,
        hub=hub_ns,
        cmd=["jupyterhub-singleuser"],
        qconf_command=real_binary("qconf"),
        parallel_environment="smp",
    )
    assert next(p for p in await sp2.cluster_partitions() if p.name == QUEUE).cpus == slots
