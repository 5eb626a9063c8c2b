"""End to end through ``node-agent launch`` (no-container mode) on the local backend:
maintenance mode refuses a spawn at once with the configured message, an allowed user gets a
working server with the home directory the launcher created."""

from __future__ import annotations

import os
import time

import pytest

from e2e import Hub, launch_hub_config
from harness import running_stack, tool_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MESSAGE = "Cluster maintenance until 14:00 - please come back later"

HPC_CONFIG = """
[maintenance]
enabled = true
message = "{message}"
allowed_users = ["zoe"]

[storage]
scratch_dir = "{scratch}"
home_root = "{scratch}/homes"
create_home = true

[logging]
enabled = true
dir = "{scratch}/log"

[overlay]
enabled = false

[container]
enabled = false
inner_command = ["node-agent", "run"]
"""


@pytest.fixture(scope="module")
def launch_stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("launch")
    scratch = work / "scratch"
    scratch.mkdir()
    config = work / "hpc-config.toml"
    config.write_text(HPC_CONFIG.format(message=MESSAGE, scratch=scratch))
    with running_stack(
        str(work / "stack"),
        path=tool_path(),
        extra_hub_config=launch_hub_config(config) + "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}\n",
    ) as s:
        s.scratch = str(scratch)
        yield s


def test_maintenance_message_reaches_the_user_at_once(launch_stack):
    hub = Hub(launch_stack)
    user = "maint"
    assert hub.api(hub.user_path(user), "POST")[0] == 201
    t0 = time.monotonic()
    status, _ = hub.api(hub.user_path(user) + "/server", "POST")
    assert status == 202  # still pending: the job has just been submitted
    events = hub.progress_events(user)
    elapsed = time.monotonic() - t0
    assert events[-1].get("failed"), events
    assert MESSAGE in events[-1]["message"], events[-1]
    assert elapsed < 10, f"maintenance took {elapsed:.1f}s to surface"
    messages = [e["message"] for e in events]
    assert any("Submitting the batch job" in m for m in messages), messages
    assert hub.session_of(user)["state"] == "closed"


def test_allowed_user_spawns_through_launch(launch_stack):
    hub = Hub(launch_stack)
    hub.spawn("zoe")
    status, _ = hub.through_proxy("zoe", "api/status")
    assert status == 200
    assert os.path.isdir(os.path.join(launch_stack.scratch, "homes", "zoe"))
    hub.stop("zoe")
