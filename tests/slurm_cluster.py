"""The project's single-node Slurm for the Slurm end-to-end tests (test_e2e_slurm.py,
test_e2e_slurm_netns.py).

``slurm_cluster`` (module fixture): if ``squeue`` does not answer, runs ``scripts/slurm.sh
start`` (idempotent; apt-installs Slurm when missing; needs root, else the test is skipped).
Every job of a test run gets the job name :data:`JOB_TAG`; ``cancel_leftover_jobs`` scancels
them after each test of a module that uses it (``pytest.mark.usefixtures``). conftest.py
registers this module as a plugin, so its fixtures need no import. :func:`hub_config` is the part of
a hub's config that makes a Stack's SlurmBrokerSpawner use them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
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
