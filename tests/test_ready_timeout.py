"""``BrokerSpawnerMixin.ready_timeout``: a job that runs but whose server never becomes ready
fails the spawn and is cancelled after that many seconds, however long ``Spawner.start_timeout``
is (which a site sizes for queue waits). Real hub, CHP, broker and the embedded local batch
system; the job's "agent" is a shell that only sleeps."""

from __future__ import annotations

import json
import os
import time

import pytest

from e2e import Hub, alive
from harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

READY_TIMEOUT = 12  # longer than the hub's slow_spawn_timeout (10 s): the POST answers 202 first


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): jobs that never start a server."""
    extra = "\n".join(
        [
            "c.LocalBrokerSpawner.agent_command = \"sh -c 'echo started; sleep 300' --\"",
            f"c.BrokerSpawnerMixin.ready_timeout = {READY_TIMEOUT}",
            "c.Spawner.start_timeout = 3600",
        ]
    )
    return dict(name="ready-timeout", logs="e2e-ready-timeout-logs", poll_interval=2, extra_hub_config=extra)


def test_a_running_job_without_a_server_fails_after_ready_timeout(stack):
    hub = Hub(stack)
    user = "rita"
    assert hub.api(hub.user_path(user), "POST")[0] == 201
    t0 = time.monotonic()
    assert hub.api(hub.user_path(user) + "/server", "POST")[0] == 202
    messages = hub.progress_messages(user, "ready_timeout", 60)
    took = time.monotonic() - t0
    failure = [m for m in messages if "ready_timeout" in m][0]
    assert f"ran for {READY_TIMEOUT} s without its server becoming ready" in failure, failure
    assert took < 60  # not start_timeout (an hour)
    wait_until(lambda: not hub.api(hub.user_path(user))[1].get("servers"), 30, what="the spawn to be given up")
    session = hub.session_of(user)
    assert (session["state"], session["end_reason"]) == ("closed", "server not ready in time")
    job_dir = hub.job_dir(session["job_id"])
    with open(os.path.join(job_dir, "output.log")) as f:
        assert "started" in f.read()  # the job did run
    with open(os.path.join(job_dir, "job.json")) as f:
        pid = json.load(f)["pid"]
    wait_until(lambda: not alive(pid), 20, what="the job cancelled")
    print(f"\n[ready timeout] spawn failed after {took:.1f} s (ready_timeout {READY_TIMEOUT} s)")
