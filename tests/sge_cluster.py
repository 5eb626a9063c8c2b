"""The project's single-host Grid Engine cell for the Grid Engine end-to-end tests
(test_e2e_sge.py).

``sge_cluster`` (module fixture): as root, runs ``scripts/sge.sh start`` (else needs a running cell)
(idempotent; apt-installs Son of Grid Engine when missing; needs root, else the test is skipped).
It runs beside the project's Slurm and never touches it. Every job of a test run gets the job
name :data:`JOB_TAG`; ``qdel_leftover_jobs`` deletes them after each test of a module that uses it.
conftest.py registers this module as a plugin, so its fixtures need no import.
:func:`hub_config` is the part of a hub's config that makes a Stack's GridEngineBrokerSpawner
use them.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import real_binary, run

REPO = Path(__file__).resolve().parent.parent
SGE_SH = REPO / "scripts" / "sge.sh"
JOB_TAG = f"e2e-sge-{uuid.uuid4().hex[:8]}"
GE_POLL_INTERVAL = 1.0
QUEUE = "all.q"


def ge_env() -> dict[str, str]:
    """The environment Grid Engine's clients need (Debian's wrappers default to the same)."""
    return {**os.environ, "SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


def ge(*argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Grid Engine client (qstat, qdel, qmod, ...) from the system, output captured."""
    return subprocess.run(
        [real_binary(argv[0]), *argv[1:]], capture_output=True, text=True, check=check, timeout=timeout, env=ge_env()
    )


def qstat_answers() -> bool:
    try:
        return ge("qstat", timeout=10).returncode == 0
    except (subprocess.TimeoutExpired, OSError, pytest.skip.Exception):
        return False


def tagged_jobs() -> list[str]:
    """Ids of this run's jobs (job name :data:`JOB_TAG`) that qstat lists, in any state."""
    out = ge("qstat", "-xml", "-u", "*").stdout
    try:
        root = ET.fromstring(out)
    except ET.ParseError:
        return []
    return [el.findtext("JB_job_number") or "" for el in root.iter("job_list") if el.findtext("JB_name") == JOB_TAG]


def qdel_tagged() -> None:
    """Delete this run's jobs."""
    ids = tagged_jobs()
    if ids:
        ge("qdel", *ids)


@pytest.fixture(scope="module")
def sge_cluster() -> Iterator[None]:
    # as root: always `sge.sh start` (idempotent, ~7 s): it also restarts an execd that died while
    # the qmaster still answers (the queue instance is then "unknown" and nothing ever starts),
    # and returns once a real job has run
    if os.geteuid() == 0 or not qstat_answers() or ge("qconf", "-sq", QUEUE).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("Grid Engine is not running and starting it needs root")
        r = run("bash", str(SGE_SH), "start", timeout=900)
        assert r.returncode == 0, f"sge.sh start failed:\n{r.stdout}\n{r.stderr}"
    assert qstat_answers()
    ge("qmod", "-e", QUEUE)  # a test that disabled it and died
    yield
    qdel_tagged()


@pytest.fixture
def qdel_leftover_jobs(sge_cluster: None) -> Iterator[None]:
    yield
    ge("qmod", "-e", QUEUE)
    qdel_tagged()


def hub_config(workdir: str, extra: str = "") -> str:
    """GridEngineBrokerSpawner settings for a Stack in *workdir*: :data:`JOB_TAG` as the job name,
    job output (and the secrets files) in ``<workdir>/sge-out``, the queue :data:`QUEUE`, a
    30-minute h_rt with a 2-minute warning, :data:`GE_POLL_INTERVAL`, this checkout first on the
    job's PYTHONPATH; *extra* lines appended."""
    out_dir = os.path.join(workdir, "sge-out")
    os.makedirs(out_dir, exist_ok=True)
    os.chmod(out_dir, 0o1777)
    return "\n".join(
        [
            f"c.GridEngineBrokerSpawner.req_job_name = {JOB_TAG!r}",
            f"c.GridEngineBrokerSpawner.req_output_dir = {out_dir!r}",
            f"c.GridEngineBrokerSpawner.req_partition = {QUEUE!r}",
            'c.GridEngineBrokerSpawner.req_runtime = "30:00"',
            "c.GridEngineBrokerSpawner.req_walltime_warning = 120",
            f"c.GridEngineBrokerSpawner.ge_poll_interval = {GE_POLL_INTERVAL}",
            # the job imports this checkout's node_agent (the venv's editable install may point elsewhere)
            f"c.GridEngineBrokerSpawner.req_prologue = {'export PYTHONPATH=' + str(REPO)!r}",
            extra,
        ]
    )
