"""A notebook job that waits in Slurm's queue longer than JupyterHub's default ``start_timeout``
still starts once the scheduler lets it, when ``c.Spawner.start_timeout`` is sized for queue
waits (examples/production/jupyterhub_config.py), and the progress page shows why it waits and where it stands in the queue.

Real JupyterHub, CHP, broker and Slurm (a devstack Stack with SlurmBrokerSpawner). The job is
submitted held (an admin's ``req_options = "--hold"``: Slurm's reason JobHeldUser), stays held
for longer than JupyterHub's own default ``Spawner.start_timeout`` (60 s, read from JupyterHub),
and is then released with ``scontrol release``. The hub's other timeouts are shrunk (poll every
second, one squeue a second); the hold is not: it is what the test is about.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from jupyterhub.spawner import Spawner

from e2e import Hub
from harness import running_stack, tool_path, wait_until
from slurm_cluster import hub_config, real_binary, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("cancel_leftover_jobs"),
]

#: JupyterHub's own default (what a site that does not size start_timeout gets)
JUPYTERHUB_DEFAULT_START_TIMEOUT = Spawner.class_traits()["start_timeout"].default_value


def test_a_job_held_longer_than_the_default_start_timeout_starts_when_released(slurm_cluster, tmp_path):
    hold = JUPYTERHUB_DEFAULT_START_TIMEOUT + 5
    workdir = str(tmp_path / "stack")
    extra = "\n".join(
        [
            'c.SlurmBrokerSpawner.req_options = "--hold"',  # the admin's setting: jobs start held
            f"c.Spawner.start_timeout = {hold * 3}",  # sized for the queue wait
        ]
    )
    with running_stack(
        workdir,
        path=tool_path(),
        logs="e2e-queue-wait-logs",
        poll_interval=1,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, extra),
    ) as stack:
        hub = Hub(stack)
        user = "quinn"
        assert hub.api(hub.user_path(user), "POST")[0] == 201
        t0 = time.monotonic()
        status, body = hub.api(hub.user_path(user) + "/server", "POST")
        assert status == 202, (status, body)
        messages = hub.progress_messages(user, "JobHeldUser", 60)
        held = [m for m in messages if "JobHeldUser" in m][0]
        job_id = held.split()[1]
        assert re.search(r"; position \d+ of \d+ waiting in partition \w+", held), held
        assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%T %r").stdout.split() == [
            "PENDING",
            "JobHeldUser",
        ]

        # the whole time it is held, the last progress message is that reason, and the spawn waits
        later: list[str] = []
        reader = threading.Thread(
            target=lambda: hub.progress_messages(user, "ready", hold + 120, into=later), daemon=True
        )
        reader.start()
        time.sleep(max(0.0, t0 + hold - time.monotonic()))
        _, info = hub.api(hub.user_path(user))
        assert info["servers"][""]["pending"] == "spawn", info
        assert "JobHeldUser" in later[-1], later
        assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%T").stdout.strip() == "PENDING"
        waited = time.monotonic() - t0
        assert waited > JUPYTERHUB_DEFAULT_START_TIMEOUT

        run(real_binary("scontrol"), "release", job_id, check=True)
        wait_until(
            lambda: hub.api(hub.user_path(user))[1].get("servers", {}).get("", {}).get("ready"),
            120,
            interval=0.5,
            what="the released job's server to be ready",
        )
        print(
            f"\n[queue wait] held {waited:.0f} s (> JupyterHub's default {JUPYTERHUB_DEFAULT_START_TIMEOUT} s), "
            f"ready {time.monotonic() - t0 - waited:.1f} s after the release"
        )
        reader.join(30)
        assert any("ready" in m.lower() for m in later), later
        assert hub.through_proxy(user, "api/status")[0] == 200
        assert hub.session_of(user)["job_id"] == job_id
        hub.stop(user)
