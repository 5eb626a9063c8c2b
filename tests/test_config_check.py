"""Warnings at hub start for settings that would silently replace the broker's batch script or
that do nothing with the broker's spawners (hub_plugin/config_check.py)."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from hub_plugin.config_check import config_warnings
from hub_plugin.slurm import SlurmBrokerSpawner

from harness import running_stack, tool_path


def test_parent_class_batch_script_is_named_with_what_to_do():
    c = Config()
    c.SlurmSpawner.batch_script = "#!/bin/bash\n{{cmd}}\n"
    (text,) = config_warnings(c, SlurmBrokerSpawner)
    assert text.startswith("c.SlurmSpawner.batch_script replaces SlurmBrokerSpawner's batch script"), text
    assert "c.SlurmBrokerSpawner.batch_script" in text


def test_a_script_without_cmd_and_options_that_do_nothing():
    c = Config()
    c.SlurmBrokerSpawner.batch_script = "#!/bin/bash\nbatchspawner-singleuser jupyterhub-singleuser\n"
    c.BatchSpawnerBase.batch_query_cmd = "squeue -j {job_id}"
    c.SlurmSpawner.req_keepvars_extra = "FOO"
    c.JupyterHub.hub_connect_ip = "10.0.0.1"
    texts = config_warnings(c, SlurmBrokerSpawner)
    assert any(t.startswith("c.SlurmBrokerSpawner.batch_script has no {{cmd}}") for t in texts), texts
    assert any(t.startswith("c.BatchSpawnerBase.batch_query_cmd does nothing") for t in texts), texts
    assert any(t.startswith("c.SlurmSpawner.req_keepvars_extra does nothing") for t in texts), texts
    assert any(t.startswith("c.JupyterHub.hub_connect_ip does nothing") for t in texts), texts
    assert len(texts) == 4


def test_the_broker_spawner_own_settings_give_no_warning():
    c = Config()
    c.SlurmBrokerSpawner.req_partition = "interactive"
    c.SlurmBrokerSpawner.batch_script = "#!/bin/bash\nexec {{cmd}}\n"
    c.Spawner.start_timeout = 3600
    assert config_warnings(c, SlurmBrokerSpawner) == []


@pytest.mark.e2e
def test_the_hub_warns_at_start_before_any_spawn(tmp_path):
    """A real hub whose config sets c.SlurmSpawner.batch_script logs the warning while starting."""
    extra = 'c.SlurmSpawner.batch_script = "#!/bin/bash\\n{{cmd}}\\n"'
    with running_stack(
        str(tmp_path / "stack"),
        path=tool_path(),
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=extra,
    ) as stack:
        log = stack.log_text("hub")
    line = [x for x in log.splitlines() if "c.SlurmSpawner.batch_script replaces" in x]
    assert len(line) == 1, log[-3000:]
    assert "WARNING" in line[0] or " W " in line[0] or "[W " in line[0], line[0]
