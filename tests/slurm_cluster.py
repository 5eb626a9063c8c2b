"""The project's single-node Slurm for the Slurm end-to-end tests (test_e2e_slurm.py,
test_e2e_slurm_netns.py).

``slurm_cluster`` (module fixture): if ``squeue`` does not answer, runs ``scripts/slurm.sh
start`` (idempotent; apt-installs Slurm when missing; needs root, else the test is skipped).
Every job of a test run gets the job name :data:`JOB_TAG`; ``cancel_leftover_jobs`` scancels
them after each test of a module that uses it (``pytest.mark.usefixtures``). conftest.py
registers this module as a plugin, so its fixtures need no import. :func:`hub_config` is the part of
a hub's config that makes a Stack's SlurmBrokerSpawner use them.

:class:`NsCluster` is a second, private Slurm with slurmdbd + MariaDB (``SLURM_ACCOUNTING=1
scripts/slurm.sh``) in its own mount+network namespace, for tests that need accounting
(test_accounting.py, test_slurm_accounts.py) without touching the shared cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_SH = REPO / "scripts" / "slurm.sh"
JOB_TAG = f"e2e-slurm-{uuid.uuid4().hex[:8]}"
SLURM_POLL_INTERVAL = 1.0


def real_binary(cmd: str) -> str:
    """The system's *cmd* (not a wrapper earlier on PATH); skips the test if it is not installed."""
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        if os.access(os.path.join(d, cmd), os.X_OK):
            return os.path.join(d, cmd)
    found = shutil.which(cmd)
    if not found:
        pytest.skip(f"{cmd} not installed")
    return found


def run(*argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run *argv*, output captured as text."""
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def squeue_answers() -> bool:
    try:
        return run(real_binary("squeue"), "-h", "-o", "%i", timeout=10).returncode == 0
    except (subprocess.TimeoutExpired, OSError, pytest.skip.Exception):
        return False


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    if not squeue_answers():
        if os.geteuid() != 0:
            pytest.skip("Slurm is not running and starting it needs root")
        r = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"slurm.sh start failed:\n{r.stdout}\n{r.stderr}"
    assert squeue_answers()
    yield
    run(real_binary("scancel"), "-n", JOB_TAG)


@pytest.fixture
def cancel_leftover_jobs(slurm_cluster: None) -> Iterator[None]:
    yield
    run(real_binary("scancel"), "-n", JOB_TAG)


def hub_config(workdir: str, extra: str = "", out_dir: str = "") -> str:
    """SlurmBrokerSpawner settings for a Stack in *workdir*: :data:`JOB_TAG` as the job name,
    job output in *out_dir* (default ``<workdir>/slurm-out``, made writable for the job's user),
    a 30-minute walltime, :data:`SLURM_POLL_INTERVAL`; *extra* lines appended."""
    out_dir = out_dir or os.path.join(workdir, "slurm-out")
    os.makedirs(out_dir, exist_ok=True)
    os.chmod(out_dir, 0o1777)  # the job's user writes its output here
    return "\n".join(
        [
            f"c.SlurmBrokerSpawner.req_job_name = {JOB_TAG!r}",
            f"c.SlurmBrokerSpawner.req_output_dir = {out_dir!r}",
            'c.SlurmBrokerSpawner.req_runtime = "30"',
            "c.SlurmBrokerSpawner.req_walltime_warning = 120",
            f"c.SlurmBrokerSpawner.slurm_poll_interval = {SLURM_POLL_INTERVAL}",
            extra,
        ]
    )


class NsCluster:
    """SLURM_ACCOUNTING=1 scripts/slurm.sh in a private mount+net namespace (own munge, /etc/slurm, ports)."""

    def __init__(self, base: str):
        self.base = base
        self.holder: subprocess.Popen | None = None

    def ns(
        self, *argv: str, timeout: float = 120, env: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        assert self.holder is not None
        cmd = [
            "nsenter",
            "-t",
            str(self.holder.pid),
            "-m",
            "-n",
            "--",
            "env",
            *[f"{k}={v}" for k, v in (env or {}).items()],
            *argv,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return r

    def start(self) -> None:
        # install slurmdbd and MariaDB first, from the host: the namespace has no network
        r = subprocess.run(
            ["bash", str(SLURM_SH), "install"],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, SLURM_ACCOUNTING="1"),
        )
        assert r.returncode == 0, f"slurm.sh install failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        self.ns("ip", "link", "set", "lo", "up")
        # slurmdbd binds with getaddrinfo(AI_ADDRCONFIG): it needs one non-loopback address
        self.ns("ip", "addr", "add", "10.254.0.1/32", "dev", "lo")
        for d in ("/etc/slurm", "/run/munge", "/run/mysqld", "/var/log/munge", "/var/lib/munge"):
            # a mount point must exist: /run/mysqld does only where MariaDB ran once (the
            # empty directory left on the host is what MariaDB's own start would create)
            self.ns("mkdir", "-p", d)
            self.ns("mount", "-t", "tmpfs", "tmpfs", d)
        self.ns("chown", "munge:munge", "/run/munge", "/var/log/munge", "/var/lib/munge")
        self.ns("chmod", "0755", "/run/munge")
        self.ns(
            "bash",
            str(SLURM_SH),
            "start",
            timeout=300,
            env={"SLURM_ACCOUNTING": "1", "SLURM_BASE": self.base, "SLURM_PROCTRACK": "linuxproc"},
        )

    def stop(self) -> None:
        if self.holder is None:
            return
        try:
            self.ns(
                "bash",
                str(SLURM_SH),
                "stop",
                "--clean",
                timeout=120,
                check=False,
                env={"SLURM_ACCOUNTING": "1", "SLURM_BASE": self.base},
            )
        finally:
            self.holder.kill()
            self.holder.wait()


@contextmanager
def accounting_cluster() -> Iterator[NsCluster]:
    """A started :class:`NsCluster` in a fresh base directory, stopped and removed on exit.
    Skips the test without root, unshare or nsenter."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("needs root, unshare and nsenter")
    base = tempfile.mkdtemp(prefix="slurm-acct-", dir="/tmp")
    os.chmod(base, 0o755)  # MariaDB runs as mysql: pytest's tmp_path (0700) is out of its reach
    cluster = NsCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
