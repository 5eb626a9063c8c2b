"""Tests of the embedded local batch system and LocalBatchSpawner.

Everything here runs real processes (the CLI, the job wrapper, bash, sleep) and checks
them through /proc; nothing is mocked. The only stand-ins are the JupyterHub user and hub
objects handed to LocalBatchSpawner, as batchspawner's own tests do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hub_plugin import localbatch

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m hub_plugin.localbatch ARGS` from the repo root."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "hub_plugin.localbatch", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=30,
    )


@pytest.fixture
def spool(tmp_path):
    """A spool directory; every job left in it is killed at teardown."""
    d = tmp_path / "spool"
    yield d
    if d.is_dir():
        for job in d.iterdir():
            if job.name.isdigit():
                cli("cancel", "--spool", str(d), "--grace", "0", job.name)


def submit(spool: Path, script: str, env: dict | None = None) -> str:
    r = cli("submit", "--spool", str(spool), stdin=script, env=env)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9]+\n", r.stdout), r.stdout
    return r.stdout.strip()


def query(spool: Path, job_id: str) -> str:
    r = cli("query", "--spool", str(spool), job_id)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    return lines[0]


def cancel(spool: Path, job_id: str, *extra: str) -> None:
    r = cli("cancel", "--spool", str(spool), *extra, job_id)
    assert r.returncode == 0, r.stderr


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_state(spool: Path, job_id: str, prefix: str) -> str:
    last = []

    def check():
        last[:] = [query(spool, job_id)]
        return last[0].startswith(prefix)

    try:
        wait_for(check, what=f"job {job_id} {prefix}")
    except AssertionError:
        raise AssertionError(f"job {job_id}: wanted {prefix}, last state {last}") from None
    return last[0]


def job_pid(spool: Path, job_id: str) -> int:
    return localbatch.load_job(spool / job_id)["pid"]


def alive(pid: int) -> bool:
    return localbatch.is_alive(pid)


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), what=str(path)))


# --------------------------------------------------------------------------- CLI


def test_submit_query_cancel_running_job(spool):
    job_id = submit(spool, "sleep 300\n")
    assert (spool / job_id / "script").read_text() == "sleep 300\n"
    assert (os.stat(spool / job_id).st_mode & 0o777) == 0o700
    assert (os.stat(spool).st_mode & 0o777) == 0o700
    assert wait_state(spool, job_id, "RUNNING") == f"RUNNING {HOST}"

    pid = job_pid(spool, job_id)
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # its own session
    wait_for(lambda: localbatch.session_members(pid), what="job processes")

    cancel(spool, job_id)
    assert localbatch.session_members(pid) == []
    assert not alive(pid)
    assert query(spool, job_id) == "CANCELLED"
    cancel(spool, job_id)  # idempotent
    assert query(spool, job_id) == "CANCELLED"


def test_job_ids_are_unique_and_increasing(spool):
    ids = [submit(spool, "true\n") for _ in range(3)]
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert len(set(ids)) == 3


def test_exit_status_is_reported(spool):
    failing = submit(spool, "echo to-log; exit 3\n")
    ok = submit(spool, "exit 0\n")
    assert wait_state(spool, failing, "FAILED") == "FAILED 3"
    assert wait_state(spool, ok, "COMPLETED") == "COMPLETED 0"
    assert (spool / failing / "output.log").read_text() == "to-log\n"
    # Cancelling an ended job changes nothing.
    cancel(spool, failing)
    cancel(spool, ok)
    assert query(spool, failing) == "FAILED 3"
    assert query(spool, ok) == "COMPLETED 0"


@pytest.mark.parametrize("job_id", ["4242", "../x", "", "1; true"])
def test_unknown_job_id(spool, job_id):
    submit(spool, "true\n")
    for command in ("query", "cancel"):
        r = cli(command, "--spool", str(spool), job_id)
        assert r.returncode == 1
        assert r.stdout == ""
        assert "unknown job id" in r.stderr


def test_query_in_missing_spool_is_unknown(tmp_path):
    r = cli("query", "--spool", str(tmp_path / "nope"), "1")
    assert r.returncode == 1 and "unknown job id" in r.stderr


def test_submit_returns_at_once(spool):
    t0 = time.monotonic()
    job_id = submit(spool, "sleep 300\n")
    elapsed = time.monotonic() - t0
    assert elapsed < 0.8, f"submit took {elapsed:.2f}s"
    assert wait_state(spool, job_id, "RUNNING")


def test_secret_only_in_environment(spool, tmp_path):
    secret = "s3cr3t-" + os.urandom(8).hex()
    seen = tmp_path / "seen"
    env = dict(os.environ, LB_TEST_SECRET=secret)
    script = f'printf %s "$LB_TEST_SECRET" > {seen}\nsleep 300\n'
    job_id = submit(spool, script, env=env)
    assert wait_for(lambda: seen.exists() and seen.read_text(), what="job output") == secret

    assert secret not in (spool / job_id / "script").read_text()
    for f in (spool / job_id).iterdir():
        assert secret not in f.read_text(errors="replace"), f
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            data = cmdline.read_bytes()
        except OSError:
            continue
        assert secret.encode() not in data, cmdline


def test_cancel_kills_double_forked_children(spool, tmp_path):
    orphan = tmp_path / "orphan.pid"
    regrouped = tmp_path / "regrouped.pid"
    script = (
        # An orphan: its parent (a subshell) exits at once; it stays in the process group.
        f"bash -c 'sleep 300 & echo $! > {orphan}'\n"
        # A child that moved to its own process group (still in the job's session).
        f"{sys.executable} -c 'import os, time; os.setpgid(0, 0); "
        f'open("{regrouped}", "w").write(str(os.getpid())); time.sleep(300)\' &\n'
        "sleep 300\n"
    )
    job_id = submit(spool, script)
    pids = [read_pid(orphan), read_pid(regrouped)]
    job = job_pid(spool, job_id)
    assert all(alive(p) for p in pids)
    assert os.getpgid(pids[0]) == job
    assert os.getpgid(pids[1]) != job and os.getsid(pids[1]) == job

    cancel(spool, job_id)
    assert not any(alive(p) for p in pids)
    assert query(spool, job_id) == "CANCELLED"


def test_cancel_escalates_to_sigkill(spool, tmp_path):
    ready = tmp_path / "ready"
    script = f"trap '' TERM\ntouch {ready}\nwhile :; do sleep 0.1; done\n"
    job_id = submit(spool, script)
    wait_for(ready.exists, what="trap installed")
    pid = job_pid(spool, job_id)
    t0 = time.monotonic()
    cancel(spool, job_id, "--grace", "0.5")
    assert 0.5 <= time.monotonic() - t0 < 5
    assert localbatch.session_members(pid) == []
    assert query(spool, job_id) == "CANCELLED"


def test_leftovers_are_cleaned_up_when_script_ends(spool, tmp_path):
    bg = tmp_path / "bg.pid"
    job_id = submit(spool, f"sleep 300 &\necho $! > {bg}\nexit 0\n")
    pid = read_pid(bg)
    assert wait_state(spool, job_id, "COMPLETED") == "COMPLETED 0"
    wait_for(lambda: not alive(pid), what="leftover killed")


def test_job_killed_outside_reports_failed(spool):
    """The wrapper dies without recording a status; its zombie must not look alive."""
    job_id = submit(spool, "sleep 300\n")
    wait_state(spool, job_id, "RUNNING")
    os.killpg(job_pid(spool, job_id), signal.SIGKILL)
    assert wait_state(spool, job_id, "FAILED") == "FAILED -1"


def test_zombie_is_not_alive():
    child = subprocess.Popen(["true"])
    try:
        wait_for(lambda: localbatch.read_stat(child.pid)[0] == "Z", what="zombie")
        assert not localbatch.is_alive(child.pid)
    finally:
        child.wait()


def test_recycled_pid_is_not_the_job():
    st = localbatch.read_stat(os.getpid())
    assert localbatch.is_alive(os.getpid(), st[3])
    assert not localbatch.is_alive(os.getpid(), st[3] + 1)


def test_spool_writable_by_others_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    r = cli("submit", "--spool", str(d), stdin="true\n")
    assert r.returncode == 1 and "writable" in r.stderr
    assert list(d.iterdir()) == []


# --------------------------------------------------------------------------- spawner


def make_spawner(spool: Path, **kw):
    """A LocalBatchSpawner with stand-in JupyterHub user and hub objects."""
    from hub_plugin.local import LocalBatchSpawner

    user = SimpleNamespace(name="lbtestuser", url="/user/lbtestuser/", escaped_name="lbtestuser")
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    return LocalBatchSpawner(
        user=user,
        hub=hub,
        spool_dir=str(spool),
        batchspawner_singleuser_cmd="",
        **kw,
    )


@pytest.mark.asyncio
async def test_spawner_submit_query_cancel(spool, tmp_path):
    from batchspawner.batchspawner import JobStatus

    seen = tmp_path / "token"
    token = "tok-" + os.urandom(8).hex()
    spawner = make_spawner(
        spool,
        cmd=["sh", "-c", f"'printf %s \"$JUPYTERHUB_API_TOKEN\" > {seen}; exec sleep 300'"],
        cancel_grace=1.0,
    )
    spawner.api_token = token
    env = spawner.get_env()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)

    job_id = await spawner.submit_batch_script()
    assert re.fullmatch(r"[0-9]+", job_id)
    assert spawner.job_id == job_id
    assert wait_for(lambda: seen.exists() and seen.read_text(), what="job started") == token
    assert token not in (spool / job_id / "script").read_text()

    assert await spawner.query_job_status() == JobStatus.RUNNING
    assert spawner.state_gethost() == HOST
    assert await spawner.poll() is None

    pid = job_pid(spool, job_id)
    await spawner.cancel_batch_job()
    assert localbatch.session_members(pid) == []
    assert await spawner.query_job_status() == JobStatus.NOTFOUND
    assert spawner.job_status == "CANCELLED"
    assert await spawner.poll() == 1
    assert spawner.job_id == ""


@pytest.mark.asyncio
async def test_spawner_sees_failed_job_and_unknown_id(spool):
    from batchspawner.batchspawner import JobStatus

    spawner = make_spawner(spool, cmd=["exit", "3"])
    job_id = await spawner.submit_batch_script()
    wait_state(spool, job_id, "FAILED")
    assert await spawner.query_job_status() == JobStatus.NOTFOUND
    assert spawner.job_status == "FAILED 3"

    spawner.job_id = "999999"
    assert await spawner.query_job_status() == JobStatus.NOTFOUND
    assert "unknown job id" in spawner.job_status
