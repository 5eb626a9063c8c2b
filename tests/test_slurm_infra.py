"""Slurm infrastructure against REAL components: the shared squeue poller and the login-node runner.

* Slurm: the project's single-node cluster. If ``squeue`` does not answer, the session fixture
  runs ``scripts/slurm.sh start`` (which apt-installs Slurm if needed) and stops it afterwards.
* sshd (tests/sshd.py): a private OpenSSH server on 127.0.0.1 (free port, own config, host key and
  authorized_keys, UsePAM no, LogLevel DEBUG3 into a log file we inspect). openssh-server is
  apt-installed if missing. It plays the cluster's login node (same machine, same Slurm).

Jobs are ``sbatch --wrap 'sleep 300'`` style, named with a per-run tag; a fixture scancels every
job this module submitted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from hub_plugin.remote import LocalRunner, LoginNodeRunner, RunnerError
from hub_plugin.slurm_poller import GONE, SlurmJobPoller, SlurmQueryError

pytestmark = pytest.mark.asyncio
slurm = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SLURM_SH = REPO / "scripts" / "slurm.sh"
JOB_TAG = f"infra-test-{uuid.uuid4().hex[:8]}"
NODE = socket.gethostname().split(".")[0]
# quotes, spaces, $(), backticks, backslash and a newline: exercises the quoting end to end
SECRET = "s3cr3t-" + uuid.uuid4().hex + " '\"$(id)`id`\\ \nline2"


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def _squeue_answers() -> bool:
    if not shutil.which("squeue"):
        return False
    try:
        return _sh("squeue", "-h", "-o", "%i", check=False, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# -- Slurm -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster():
    """Make sure Slurm answers; start it with scripts/slurm.sh when it does not."""
    started = False
    if not _squeue_answers():
        if os.geteuid() != 0:
            pytest.skip("Slurm is not running and starting it needs root")
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"slurm.sh start failed:\n{r.stdout}\n{r.stderr}"
        print(f"\n[slurm] started in {time.monotonic() - t0:.1f} s")
        started = True
    assert _squeue_answers()
    yield
    if started:
        subprocess.run(["bash", str(SLURM_SH), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def jobs(slurm_cluster, tmp_path):
    """Submit test jobs (`jobs.submit(...)`); all of them are scancelled at teardown."""

    class Jobs:
        ids: list[str] = []

        def submit(self, *extra: str, wrap: str = "sleep 300") -> str:
            r = _sh("sbatch", "--parsable", "-J", JOB_TAG, "-o", "/dev/null", *extra, "--wrap", wrap)
            job_id = r.stdout.strip().split(";")[0]
            self.ids.append(job_id)
            return job_id

    j = Jobs()
    j.ids = []
    yield j
    _sh("scancel", "-n", JOB_TAG, check=False)
    if j.ids:
        _sh("scancel", *j.ids, check=False)


# -- sshd: tests/sshd.py (shared with test_e2e_slurm.py) --------------------------------------


@pytest_asyncio.fixture
async def login_runner(sshd):
    r = sshd.runner()
    yield r
    await r.close()


# -- helpers -------------------------------------------------------------------------------------


async def _wait_state(poller: SlurmJobPoller, job_id: str, states: set[str], timeout: float = 30):
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = await poller.status(job_id, fresh=True)
        if info.state in states:
            return info
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {states}; last {info}")


# -- poller --------------------------------------------------------------------------------------


@slurm
async def test_poller_one_squeue_per_interval_for_20_jobs(jobs):
    ids = [jobs.submit() for _ in range(20)]
    interval = 0.5
    async with SlurmJobPoller(interval=interval) as poller:
        for j in ids:
            poller.watch(j)
        # 20 "spawners" ask for their first answer at once: one coalesced query answers all
        first = await asyncio.gather(*(poller.status(j) for j in ids))
        assert poller.squeue_calls == 1
        assert all(i.state != GONE for i in first), first

        # now every spawner asks 10x per second for 3 s; squeue still runs once per interval
        calls0, t0 = poller.squeue_calls, time.monotonic()
        duration = 3.0

        async def spawner(job_id):
            while time.monotonic() - t0 < duration:
                info = await poller.status(job_id)
                assert info.job_id == job_id and info.state != GONE
                await asyncio.sleep(0.1)

        await asyncio.gather(*(spawner(j) for j in ids))
        elapsed = time.monotonic() - t0
        calls = poller.squeue_calls - calls0
        print(f"\n[poller] 20 jobs, {elapsed:.2f} s, interval {interval} s: {calls} squeue calls")
        assert calls <= elapsed / interval + 1
        assert calls >= 2  # it does poll periodically

        # all 20 are running at once on this small node (OverSubscribe)
        running = {i.job_id for i in (await poller.refresh()).values() if i.state == "RUNNING"}
        deadline = time.monotonic() + 20
        while len(running) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            running = {i.job_id for i in (await poller.refresh()).values() if i.state == "RUNNING"}
        assert running == set(ids)


@slurm
async def test_poller_idle_runs_no_squeue_and_coalesces_forced_refresh(jobs):
    async with SlurmJobPoller(interval=0.2) as poller:
        await asyncio.sleep(0.6)
        await poller.refresh()  # nothing watched: nothing to ask
        assert poller.squeue_calls == 0

        job = jobs.submit()
        poller.watch(job)
        await poller.status(job)
        before = poller.squeue_calls
        # 50 concurrent forced refreshes while idle share one query (plus at most the
        # periodic one that may already be running)
        await asyncio.gather(*(poller.refresh() for _ in range(50)))
        assert poller.squeue_calls - before <= 2

        poller.unwatch(job)
        await asyncio.sleep(0.3)
        calls = poller.squeue_calls
        await asyncio.sleep(0.8)
        assert poller.squeue_calls == calls  # unwatched again: silent


@slurm
async def test_poller_pending_running_cancelled_gone(jobs):
    held = jobs.submit("--hold")
    running = jobs.submit()
    async with SlurmJobPoller(interval=0.5) as poller:
        poller.watch(held)
        poller.watch(running)

        info = await poller.status(held)
        assert info.state == "PENDING"
        assert info.reason == "JobHeldUser"
        assert info.node is None and info.is_pending

        info = await _wait_state(poller, running, {"RUNNING"})
        assert info.node == NODE
        assert info.reason is None
        assert info.start_time is not None

        _sh("scancel", running, held)
        for j in (running, held):
            info = await _wait_state(poller, j, {"CANCELLED", GONE}, timeout=15)
            assert info.is_finished

        # an id Slurm has never heard of (squeue exits 1 "Invalid job id"): GONE
        unknown = await poller.status("987654321")
        assert unknown.state == GONE


@slurm
async def test_poller_through_login_node_runner(jobs, sshd, login_runner):
    job = jobs.submit()
    async with SlurmJobPoller(login_runner, interval=0.5) as poller:
        poller.watch(job)
        info = await _wait_state(poller, job, {"RUNNING"})
        assert info.node == NODE
        assert login_runner.connections_opened == 1


# -- login-node runner -------------------------------------------------------------------------


@slurm
async def test_ten_submissions_share_one_ssh_connection(jobs, sshd, login_runner):
    accepted0 = sshd.accepted()
    script = f"#!/bin/bash\n#SBATCH -J {JOB_TAG}\n#SBATCH -o /dev/null\nsleep 300\n"
    results = await asyncio.gather(*(login_runner.run(["sbatch", "--parsable"], input=script) for _ in range(10)))
    for status, out, err in results:
        assert status == 0, err
        jobs.ids.append(out.strip())
    ids = [out.strip() for _, out, _ in results]
    assert len(set(ids)) == 10 and all(i.isdigit() for i in ids)
    assert login_runner.connections_opened == 1
    await asyncio.sleep(0.2)  # let sshd flush its log
    assert sshd.accepted() - accepted0 == 1
    # the jobs really exist
    out = _sh("squeue", "-h", "-o", "%i", "-j", ",".join(ids)).stdout.split()
    assert sorted(out) == sorted(ids)


async def test_exit_status_stdout_stderr_and_input(login_runner):
    r = await login_runner.run(["sh", "-c", 'cat; echo "to err $1" >&2; exit 3', "sh", "a b'c"], input="x\ny")
    assert r == (3, "x\ny", "to err a b'c\n")
    r = await login_runner.run(["/nonexistent/command"])
    assert r.exit_status == 127


@slurm
async def test_secret_env_never_on_command_lines_logs_or_script(jobs, sshd, login_runner, tmp_path):
    env = {"HUB_TEST_SECRET": SECRET}
    needle = SECRET.split()[0]  # the random part: cannot occur by accident

    # 1. while a remote command holding the secret runs, no process's command line shows it
    seen_cmdlines: list[str] = []
    stop = asyncio.Event()

    async def watch_ps():
        while not stop.is_set():
            p = await asyncio.create_subprocess_exec("ps", "-eww", "-o", "args=", stdout=asyncio.subprocess.PIPE)
            out, _ = await p.communicate()
            seen_cmdlines.append(out.decode(errors="replace"))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_ps())
    try:
        r = await login_runner.run(["bash", "-c", 'sleep 1.5; printf %s "$HUB_TEST_SECRET" | sha256sum'], env=env)
    finally:
        stop.set()
        await watcher
    assert r.exit_status == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(SECRET.encode()).hexdigest()  # delivered intact
    assert len(seen_cmdlines) >= 5
    assert any("sleep 1.5" in c for c in seen_cmdlines)  # we did look while it ran
    assert not any(needle in c for c in seen_cmdlines)

    # 2. a job submitted with the secret in its environment: it arrives, the script has no trace
    out_file = tmp_path / "job.out"
    script = f'#!/bin/bash\n#SBATCH -J {JOB_TAG}\n#SBATCH -o {out_file}\nprintf %s "$HUB_TEST_SECRET" | sha256sum\n'
    r = await login_runner.run(["sbatch", "--parsable", "--export=HUB_TEST_SECRET"], input=script, env=env)
    assert r.exit_status == 0, r.stderr
    job_id = r.stdout.strip()
    jobs.ids.append(job_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (out_file.exists() and out_file.read_text().strip()):
        await asyncio.sleep(0.2)
    assert out_file.read_text().split()[0] == hashlib.sha256(SECRET.encode()).hexdigest()
    batch_script = _sh("scontrol", "write", "batch_script", job_id, "-").stdout
    assert "HUB_TEST_SECRET" in batch_script and needle not in batch_script
    show_job = _sh("scontrol", "show", "job", job_id, check=False).stdout
    assert needle not in show_job

    # 3. sshd (at LogLevel DEBUG3) never logged it
    await asyncio.sleep(0.2)
    log = sshd.log.read_text(errors="replace")
    assert "Accepted publickey" in log
    assert needle not in log


async def test_reconnect_after_connection_killed(sshd, login_runner):
    r = await login_runner.run(["true"])
    assert r.exit_status == 0 and login_runner.connections_opened == 1
    assert sshd.kill_sessions() >= 1
    await asyncio.sleep(0.3)
    r = await login_runner.run(["echo", "back"])
    assert r == (0, "back\n", "")
    assert login_runner.connections_opened == 2
    # concurrent calls right after another drop still open exactly one new connection
    sshd.kill_sessions()
    await asyncio.sleep(0.3)
    results = await asyncio.gather(*(login_runner.run(["echo", str(i)]) for i in range(10)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
    assert login_runner.connections_opened == 3


async def test_host_key_is_verified(sshd, tmp_path):
    # pinned key works
    async with sshd.runner(known_hosts=None, host_keys=[sshd.host_pub]) as r:
        assert (await r.run(["true"])).exit_status == 0
    # a wrong pinned key fails fast, without retries
    other = tmp_path / "other"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other))
    wrong = (tmp_path / "other.pub").read_text()
    async with sshd.runner(known_hosts=None, host_keys=[wrong]) as r:
        t0 = time.monotonic()
        with pytest.raises(RunnerError, match="refused"):
            await r.run(["true"])
        assert time.monotonic() - t0 < 5
        assert r.connections_opened == 0
    with pytest.raises(ValueError):
        LoginNodeRunner("127.0.0.1", client_keys=[str(sshd.client_key)])


async def test_local_runner_same_interface():
    r = await LocalRunner().run(["sh", "-c", 'cat; printf %s "$X" >&2'], input="in", env={"X": "y z"})
    assert r == (0, "in", "y z")


@slurm
async def test_poller_user_mode(jobs):
    job = jobs.submit()
    async with SlurmJobPoller(interval=0.5, user="root") as poller:
        poller.watch(job)
        info = await _wait_state(poller, job, {"RUNNING"})
        assert info.node == NODE
        # answers only for watched ids, even though squeue -u lists more
        assert set((await poller.refresh()).keys()) == {job}


class FakeRunner:
    """Scripted squeue: lets the error paths run without Slurm."""

    def __init__(self):
        self.fail = False
        self.calls = 0

    async def run(self, argv, input=None, env=None, timeout=None):
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.fail:
            return (1, "", "slurm_load_jobs error: Unable to contact slurm controller\n")
        ids = argv[argv.index("-j") + 1].split(",")
        return (0, "".join(f"{i}|RUNNING|n1|n1|2026-01-01T00:00:00\n" for i in ids if i != "2"), "")


async def test_poller_errors_keep_last_answer_and_raise_on_forced_refresh():
    runner = FakeRunner()
    async with SlurmJobPoller(runner, interval=0.1) as poller:
        poller.watch("1")
        poller.watch("2")
        assert (await poller.status("1")).state == "RUNNING"
        assert (await poller.status("2")).state == GONE  # missing from output
        runner.fail = True
        with pytest.raises(SlurmQueryError, match="Unable to contact"):
            await poller.refresh()
        await asyncio.sleep(0.3)  # periodic failures are logged, not raised
        assert (await poller.status("1")).state == "RUNNING"  # last known answer
        runner.fail = False
        assert (await poller.status("1", fresh=True)).state == "RUNNING"
        # coalescing: 30 concurrent fresh requests during a running query -> at most 2 queries
        calls = runner.calls
        await asyncio.gather(*(poller.status("1", fresh=True) for _ in range(30)))
        assert runner.calls - calls <= 2
    with pytest.raises(SlurmQueryError):
        await poller.refresh()  # closed
