"""The project's single-node Slurm for the Slurm end-to-end tests (test_e2e_slurm.py,
test_e2e_slurm_netns.py).

``slurm_cluster`` (module fixture): if ``squeue`` does not answer, runs ``scripts/slurm.sh
start`` (idempotent; apt-installs Slurm when missing; needs root, else the test is skipped).
Every job of a test run gets the job name :data:`JOB_TAG`; ``cancel_leftover_jobs`` scancels
them after each test of a module that uses it (``pytest.mark.usefixtures``). conftest.py
registers this module as a plugin, so its fixtures need no import. :func:`hub_config` is the part of
a hub's config that makes a Stack's SlurmBrokerSpawner use them. ``accounts`` (module fixture):
a hub service account, a notebook user in the users' group and the shipped sudoers file for
them (per-user submission through sudo); :func:`others_can_reach` / :func:`others_can_run_python`
let such accounts traverse the test's directories and run this interpreter.

:class:`NsCluster` is a second, private Slurm with slurmdbd + MariaDB (``SLURM_ACCOUNTING=1
scripts/slurm.sh``) in its own mount+network namespace, for tests that need accounting
(test_accounting.py, test_slurm_accounts.py) without touching the shared cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the administration tools (useradd, visudo, runuser: not on every PATH)
SBIN = "/usr/sbin/"
#: the shipped sudoers file for per-user submission (submit_as = "sudo")
SUDOERS = REPO / "examples" / "production" / "sudoers"
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


def _ancestors(path: str) -> list[str]:
    """The existing directories from / down to *path* (or its directory), outermost first."""
    out = []
    p = os.path.abspath(path)
    if not os.path.isdir(p):
        p = os.path.dirname(p)
    while True:
        if os.path.isdir(p):
            out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            return out[::-1]
        p = parent


@contextlib.contextmanager
def others_can_reach(*targets: str) -> Iterator[None]:
    """Let normal users traverse every directory down to *targets*, for the block's duration:
    grant o+x (no listing) where it is missing, and restore the modes afterwards."""
    restored: list[tuple[str, int]] = []
    try:
        for target in targets:
            for parent in _ancestors(target):
                mode = os.stat(parent).st_mode & 0o7777
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
                    restored.append((parent, mode))
        yield
    finally:
        for parent, mode in reversed(restored):
            os.chmod(parent, mode)


def others_can_run_python() -> contextlib.AbstractContextManager[None]:
    """Let normal users run this interpreter and import the checkout (:func:`others_can_reach`):
    on these machines the venv's python links into /root/.pyenv (/root is 0700), and a clone may
    sit in a 0700 directory (mktemp -d)."""
    return others_can_reach(os.path.realpath(sys.executable), str(REPO), *sys.path)


class Accounts(SimpleNamespace):
    service: str
    user: str
    group: str
    sudo_log: Path
    out_dir: Path


@pytest.fixture(scope="module")
def accounts(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accounts]:
    """A service account (the hub's), a notebook user in the users' group, the shipped sudoers
    file for them, and sudo logging to a file of the test's."""
    tag = uuid.uuid4().hex[:6]
    acc = Accounts(
        service=f"jhsvc{tag}",
        user=f"jhusr{tag}",
        group=f"jhusers{tag}",
        sudo_log=tmp_path_factory.mktemp("sudo") / "sudo.log",
        out_dir=Path(f"/tmp/{JOB_TAG}-sudo-out"),
    )
    os.chmod(acc.sudo_log.parent, 0o755)
    acc.out_dir.mkdir(exist_ok=True)
    acc.out_dir.chmod(0o1777)
    rule = SUDOERS.read_text().replace("%jupyterhub-users", f"%{acc.group}")
    rule = rule.replace("\njupyterhub ALL=", f"\n{acc.service} ALL=")
    assert f"\n{acc.service} ALL=(JUPYTERHUB_USERS) NOPASSWD: JUPYTERHUB_BATCH" in rule
    files = [f"/etc/sudoers.d/zz-test-{tag}", f"/etc/sudoers.d/zz-test-{tag}-log"]
    try:
        run(SBIN + "groupadd", acc.group, check=True)
        run(SBIN + "useradd", "-m", "-p", "*", "-s", "/bin/bash", acc.service, check=True)
        run(SBIN + "useradd", "-m", "-p", "*", "-s", "/bin/bash", "-G", acc.group, acc.user, check=True)
        for path, text in zip(files, [rule, f"Defaults:{acc.service} logfile={acc.sudo_log}\n"], strict=True):
            Path(path + ".new").write_text(text)
            r = run(SBIN + "visudo", "-cf", path + ".new")
            assert r.returncode == 0, r.stdout + r.stderr
            os.chmod(path + ".new", 0o440)
            os.rename(path + ".new", path)
        yield acc
    finally:
        for path in files:
            for p in (path, path + ".new"):
                if os.path.exists(p):
                    os.unlink(p)
        for name in (acc.user, acc.service):
            run("pkill", "-KILL", "-u", name)
        time.sleep(0.3)
        for name in (acc.user, acc.service):
            run(SBIN + "userdel", "-r", name)
        run(SBIN + "groupdel", acc.group)
        subprocess.run(["rm", "-rf", str(acc.out_dir)])
