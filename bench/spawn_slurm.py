"""Part 4: spawn-to-ready on the real single-node Slurm: SlurmBrokerSpawner vs stock batchspawner.

Two hubs (:class:`devstack.stack.Stack`: CHP + broker + JupyterHub), both up at once on the
same cluster, spawning in turn — N rounds, each one spawn per hub, rotating which hub goes first —
through the hub's REST API (the same ``bench.spawn.spawn_once``: POST /users/NAME/server, user model
polled every 0.1 s until ``ready``; each stopped before the next), so drift in machine load hits
both alike.

* ours: ``hub_plugin.slurm.SlurmBrokerSpawner`` with its defaults (shared squeue poller every
  5 s, node agent exec'd by the batch shell, tunnel through the broker);
* stock: ``batchspawner.SlurmSpawner`` 1.3 with ``batchspawner-singleuser`` and its default
  batch script; the hub is reachable directly (everything is on 127.0.0.1; ``hub_ip`` is
  127.0.0.1 in the Stack's config). JupyterHub 6 passes no PATH into the job, so the script's
  prologue sets it (``req_prologue``); ``req_srun=''`` (no job step, like ours); ``exec_prefix=''``
  (no sudo: both submit as this account). The Stack's broker also runs there, unused.

Both use one job name per run (scancelled at the end). Skipped, with the reason, when Slurm
cannot be started.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

from .spawn import bench_interleaved
from .squeue_load import _real, slurm_up

# batchspawner looks the user up in passwd (getpwnam) even with req_homedir set: both hubs spawn
# for our own account; jobs run as it (no sudo / --uid on either side)
USER = pwd.getpwuid(os.getuid()).pw_name


def run(tmp: str, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    ok, why = slurm_up()
    if not ok:
        log(f"spawn-to-ready on Slurm: skipped: {why}")
        return {"skipped": why}
    tag = f"bench-spawn-{uuid.uuid4().hex[:6]}"
    bindir = os.path.dirname(sys.executable)
    res: dict[str, Any] = {"user": USER, "job_name": tag}
    try:
        wd = os.path.join(tmp, "stack-slurm-broker")
        out = os.path.join(wd, "slurm-out")
        os.makedirs(out, exist_ok=True)
        os.chmod(out, 0o1777)
        ours_cfg = "\n".join(
            [
                f"c.SlurmBrokerSpawner.req_job_name = {tag!r}",
                f"c.SlurmBrokerSpawner.req_output_dir = {out!r}",
                'c.SlurmBrokerSpawner.req_runtime = "30"',
                "c.SlurmBrokerSpawner.req_walltime_warning = 120",
            ]
        )
        ours_wd = wd
        wd = os.path.join(tmp, "stack-batchspawner")
        home = os.path.join(wd, "home")
        os.makedirs(home, exist_ok=True)
        stock_cfg = "\n".join(
            [
                "c.SlurmSpawner.exec_prefix = ''",
                "c.SlurmSpawner.req_srun = ''",
                f"c.SlurmSpawner.req_homedir = {home!r}",
                f"c.SlurmSpawner.req_prologue = 'export PATH={bindir}:/usr/local/bin:/usr/bin:/bin'",
                f"c.SlurmSpawner.req_options = '--job-name={tag}'",
                'c.SlurmSpawner.req_runtime = "30"',
            ]
        )
        log("spawn-to-ready on Slurm: SlurmBrokerSpawner and batchspawner.SlurmSpawner (stock), interleaved")
        res.update(
            bench_interleaved(
                {
                    "broker_slurm": (
                        ours_wd,
                        {"spawner_class": "hub_plugin.slurm.SlurmBrokerSpawner", "extra_hub_config": ours_cfg},
                    ),
                    "batchspawner": (wd, {"spawner_class": "batchspawner.SlurmSpawner", "extra_hub_config": stock_cfg}),
                },
                n,
                USER,
                log,
            )
        )
    finally:
        subprocess.run([_real("scancel"), "-n", tag], capture_output=True, timeout=60)
    return res
