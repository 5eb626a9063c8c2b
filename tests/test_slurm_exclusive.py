"""SlurmBrokerSpawner keeps other users off the node of a shared-account job without a container.

With ``submit_as = "service"`` every user's job runs as one Unix account; without a container
nothing on a shared node stops one user's notebook from reading another's environment. Such
jobs go to Slurm with ``--exclusive`` (``node_exclusivity``), and the options form says so.

The batch scripts are rendered by the spawner's real code; submission runs through the real
submit path (LocalRunner) with ``batch_submit_cmd`` pointing at a small script that stands in
for ``sbatch`` (no Slurm daemons run here) and records its arguments and the script it reads.
JupyterHub's user/hub objects are stand-ins, as in tests/test_backends.py, and the options
form reads a fixed ``sinfo`` answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from hub_plugin.slurm import DEFAULT_BATCH_SCRIPT, SlurmBrokerSpawner

SINFO = "debug*|1:00:00|4|8000|(null)|up\n"
FORM_NOTE = "Your server gets a node to itself"


def make(name: str = "root", **kw) -> SlurmBrokerSpawner:
    user = SimpleNamespace(name=name, url=f"/user/{name}/", escaped_name=name)
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    sp = SlurmBrokerSpawner(user=user, hub=hub, cmd=["jupyterhub-singleuser"], req_homedir="/tmp", **kw)
    sp._broker_env = {"BROKER_ENROL_SECRET": "x" * 32, "BROKER_SESSION_ID": "s1"}
    return sp


async def script_of(sp: SlurmBrokerSpawner) -> str:
    subvars = sp.get_req_subvars()
    subvars["cmd"] = sp.cmd_formatted_for_batch()
    return await sp._get_batch_script(**subvars)


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.asyncio
async def test_service_account_without_container_gets_exclusive_node():
    sp = make()
    assert (sp.submit_as, sp.node_exclusivity, sp.agent_command) == ("service", "node", "node-agent run --")
    script = await script_of(sp)
    assert "#SBATCH --exclusive" in sbatch_lines(script), script
    assert "--exclusive=user" not in script  # the shared account is ONE Slurm user


@pytest.mark.asyncio
async def test_turned_off_no_exclusive():
    script = await script_of(make(node_exclusivity="off"))
    assert not any("--exclusive" in line for line in sbatch_lines(script)), script
    assert "exclusive" not in script


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kw",
    [
        {"agent_command": "node-agent launch --config /etc/node-agent/hpc.toml --"},
        {"jobs_in_container": True},
        {"submit_as": "user"},
    ],
)
async def test_not_needed_with_a_container_or_per_user_accounts(kw):
    script = await script_of(make(**kw))
    assert "--exclusive" not in script, script


@pytest.mark.asyncio
async def test_launch_without_container_can_be_declared():
    sp = make(agent_command="node-agent launch --config /x --", jobs_in_container=False)
    assert "#SBATCH --exclusive" in sbatch_lines(await script_of(sp))


@pytest.mark.asyncio
async def test_mcs_labels_per_user():
    a, b = make("a.b", node_exclusivity="mcs"), make("a_b", node_exclusivity="mcs")
    la, lb = a.mcs_label(), b.mcs_label()
    assert la != lb and la.startswith("jupyterhub-a.b-") and lb.startswith("jupyterhub-a_b-")
    assert f"#SBATCH --exclusive=mcs --mcs-label={la}" in sbatch_lines(await script_of(a))
    odd = make("Zoë Ünal/../x", node_exclusivity="mcs").mcs_label()
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in odd), odd


FAKE_SBATCH = """#!{python}
import json, sys
json.dump({{"argv": sys.argv[1:], "script": sys.stdin.read()}}, open({record!r}, "w"))
print("4242")
"""


def fake_sbatch(tmp_path: Path) -> tuple[str, Path]:
    record = tmp_path / "sbatch.json"
    exe = tmp_path / "sbatch"
    exe.write_text(FAKE_SBATCH.format(python=sys.executable, record=str(record)))
    exe.chmod(0o755)
    return f"{exe} --parsable", record


@pytest.mark.asyncio
async def test_submitted_script_carries_it_and_users_cannot_remove_it(tmp_path):
    cmd, record = fake_sbatch(tmp_path)
    sp = make(batch_submit_cmd=cmd)
    sp.user_options_allowed += ",node_exclusive"  # even when an admin allows the key
    sp.user_options = {"node_exclusive": "", "partition": "debug"}
    assert await sp.submit_batch_script() == "4242"
    sent = json.loads(record.read_text())
    assert "#SBATCH --exclusive" in sbatch_lines(sent["script"]), sent["script"]
    assert "#SBATCH --partition=debug" in sent["script"]
    assert "--exclusive" not in sent["argv"]  # once, in the script


@pytest.mark.asyncio
async def test_site_batch_script_without_the_line_gets_it_on_the_command_line(tmp_path):
    cmd, record = fake_sbatch(tmp_path)
    own = DEFAULT_BATCH_SCRIPT.replace("{% if node_exclusive %}#SBATCH {{node_exclusive}}\n{% endif %}", "")
    assert own != DEFAULT_BATCH_SCRIPT
    await make(batch_submit_cmd=cmd, batch_script=own).submit_batch_script()
    sent = json.loads(record.read_text())
    assert "--exclusive" in sent["argv"] and "--exclusive" not in sent["script"], sent
    await make(batch_submit_cmd=cmd, batch_script=own, node_exclusivity="off").submit_batch_script()
    assert "--exclusive" not in json.loads(record.read_text())["argv"]


def form_spawner(**kw) -> SlurmBrokerSpawner:
    sp = make(**kw)
    sp.run_command = mock.AsyncMock(return_value=SINFO)  # stands in for sinfo
    return sp


@pytest.mark.asyncio
async def test_options_form_says_so_when_it_applies():
    html = await form_spawner().render_options_form()
    assert FORM_NOTE in html and "one cluster account" in html
    assert 'class="alert alert-info hpc-note"' in html
    for kw in ({"node_exclusivity": "off"}, {"submit_as": "user"}, {"jobs_in_container": True}):
        html = await form_spawner(**kw).render_options_form()
        assert "hpc-note" not in html and 'name="partition"' in html, kw
    html = await form_spawner(node_exclusivity="mcs").render_options_form()
    assert "shares its node only with your own jobs" in html


@pytest.mark.asyncio
async def test_job_tells_launch_when_the_hub_counts_on_a_container(tmp_path):
    """The hub's promise reaches `node-agent launch` (which refuses to run such a job without a
    container: tests/test_isolation.py) under the name launch reads, exported to the job."""
    from hub_plugin import slurm
    from node_agent import isolation

    assert slurm.EXPECT_CONTAINER_ENV == isolation.EXPECT_CONTAINER_ENV
    cmd, record = fake_sbatch(tmp_path)
    launch = make(agent_command="node-agent launch --config /x --", batch_submit_cmd=cmd)
    assert launch.get_env()[slurm.EXPECT_CONTAINER_ENV] == "1"
    await launch.submit_batch_script()
    export = [a for a in json.loads(record.read_text())["argv"] if a.startswith("--export=")]
    assert slurm.EXPECT_CONTAINER_ENV in export[0].split("=", 1)[1].split(","), export
    for sp in (
        make(),
        make(agent_command="node-agent launch --config /x --", jobs_in_container=False),
        make(agent_command="node-agent launch --config /x --", submit_as="user"),
    ):
        assert slurm.EXPECT_CONTAINER_ENV not in sp.get_env()
