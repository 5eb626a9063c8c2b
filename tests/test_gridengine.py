"""Grid Engine's pure parts: qstat/qconf parsing, the job script and what qsub is given.

The end-to-end behaviour on a real cell is in test_e2e_sge.py; these run without one. The
spawner is built with stand-in JupyterHub user/hub objects (as in test_backends.py), and its
command runner is a recorder, because here only the text handed to qsub is under test.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from hub_plugin.gridengine import ENV_FILE_VAR, GridEngineBrokerSpawner
from hub_plugin.gridengine_poller import ge_phase, parse_qstat_j_reasons, parse_qstat_xml
from hub_plugin.gridengine_queues import format_ge_time, parse_ge_time, parse_qconf_sq, parse_qconf_sql
from hub_plugin.job_poller import JobQueryError
from hub_plugin.remote import CommandResult

QSTAT_XML = """<?xml version='1.0'?>
<job_info>
  <queue_info>
    <job_list state="running">
      <JB_job_number>7</JB_job_number><JB_name>jupyterhub</JB_name><state>r</state>
      <JAT_start_time>2026-11-30T19:40:01</JAT_start_time><queue_name>all.q@node3</queue_name>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>8</JB_job_number><state>qw</state><queue_name></queue_name>
    </job_list>
    <job_list state="pending">
      <JB_job_number>9</JB_job_number><state>hqw</state>
    </job_list>
    <job_list state="pending">
      <JB_job_number>10</JB_job_number><state>dqw</state>
    </job_list>
  </job_info>
</job_info>
"""

QSTAT_J = """==============================================================
job_number:                 8
exec_file:                  job_scripts/8
env_list:                   TERM=NONE
scheduling info:            queue instance "all.q@vm" dropped because it is disabled
                            All queues dropped because of overload or full
==============================================================
job_number:                 9
owner:                      root
scheduling info:            (Collecting of scheduler job information is turned off)
"""

QCONF_SQ = """qname                 all.q
hostlist              @allhosts
slots                 1,[node1=4],[node2=16]
h_rt                  08:00:00
h_vmem                INFINITY
qname                 long.q
hostlist              node9
slots                 8
h_rt                  INFINITY
h_vmem                4G
"""


def test_qstat_xml_states_nodes_and_phases():
    jobs = parse_qstat_xml(QSTAT_XML, seen_at=5.0)
    assert jobs["7"].is_running and jobs["7"].node == "node3" and jobs["7"].start_time is not None
    assert jobs["8"].is_pending and jobs["8"].reason is None and jobs["8"].node is None
    assert jobs["9"].is_pending and jobs["9"].reason == "on hold"
    assert jobs["10"].is_finished
    assert [ge_phase(s) for s in ("Eqw", "t", "dr", "S")] == ["pending", "running", "running", "running"]
    with pytest.raises(JobQueryError, match="no valid XML"):
        parse_qstat_xml("error: commlib error")


def test_qstat_j_reasons_per_job():
    reasons = parse_qstat_j_reasons(QSTAT_J)
    assert reasons == {
        "8": 'queue instance "all.q@vm" dropped because it is disabled; All queues dropped because of overload or full'
    }


def test_queues_from_qconf():
    assert parse_qconf_sql("all.q\nlong.q\n\n") == ["all.q", "long.q"]
    parts = parse_qconf_sq(QCONF_SQ, parallel=True)
    assert [(p.name, p.max_time, p.cpus, p.memory_mb) for p in parts] == [
        ("all.q", 8 * 3600, 16, 0),
        ("long.q", None, 8, 4096),
    ]
    assert [p.cpus for p in parse_qconf_sq(QCONF_SQ, parallel=False)] == [1, 1]
    assert parse_ge_time("1:30:00") == 5400 and parse_ge_time("90") == 90 and parse_ge_time("INFINITY") is None
    assert format_ge_time(135) == "0:02:15" and format_ge_time(30 * 3600) == "30:00:00"
    with pytest.raises(ValueError):
        parse_ge_time("2 hours")


class Recorder:
    """Stands in for the command runner: records argv, stdin and env; answers like qsub -terse."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def run(self, argv, input=None, env=None, timeout=None):
        self.calls.append({"argv": list(argv), "input": input, "env": dict(env or {})})
        return CommandResult(0, "42\n" if "qsub" in argv[0] else "", "")


def _spawner(**kw: Any) -> tuple[GridEngineBrokerSpawner, Recorder]:
    user = SimpleNamespace(name="ada", url="/user/ada/", escaped_name="ada")
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    sp = GridEngineBrokerSpawner(
        user=user, hub=hub, cmd=["jupyterhub-singleuser"], req_output_dir="/shared/out", req_runtime="2:00:00", **kw
    )
    rec = Recorder()
    sp.api_token = "hub-api-token-" + "t" * 24
    sp._broker_env = {"BROKER_ENROL_SECRET": "enrol-" + "s" * 32, "BROKER_SESSION_ID": "s1"}
    return sp, rec


@pytest.mark.asyncio
async def test_submit_passes_names_and_writes_secrets_to_a_private_file(monkeypatch):
    sp, rec = _spawner()
    monkeypatch.setattr(type(sp), "runner", property(lambda self: rec))
    job_id = await sp.submit_batch_script()
    assert job_id == "42"
    write, qsub = rec.calls
    # the secrets file: created by the runner, 0600, never overwritten, content over stdin
    assert write["argv"][:3] == ["sh", "-c", 'umask 077 && set -C && cat > "$1"']
    path = write["argv"][4]
    assert path.startswith("/shared/out/.jupyterhub-env-") and sp.secrets_file == path
    assert "BROKER_ENROL_SECRET=" in write["input"] and "JUPYTERHUB_API_TOKEN=" in write["input"]
    # qsub: names only on the command line, no secret in its argv, env or the script
    argv = " ".join(qsub["argv"])
    names = qsub["argv"][qsub["argv"].index("-v") + 1].split(",")
    assert ENV_FILE_VAR in names and "BROKER_SESSION_ID" in names
    assert "BROKER_ENROL_SECRET" not in names and "JUPYTERHUB_API_TOKEN" not in names
    assert qsub["env"][ENV_FILE_VAR] == path and "JUPYTERHUB_API_TOKEN" not in qsub["env"]
    for secret in ("s" * 32, "t" * 24):
        assert secret not in argv and secret not in qsub["input"] and secret not in str(qsub["env"])
    script = qsub["input"]
    assert "#$ -l h_rt=2:00:00" in script and "#$ -l s_rt=1:55:00" in script  # 300 s warning
    assert "#$ -o /shared/out/jupyterhub-ada-$JOB_ID.log" in script
    assert '. "$JUPYTERHUB_ENV_FILE"' in script and 'rm -f "$JUPYTERHUB_ENV_FILE"' in script
    assert "exec node-agent run -- jupyterhub-singleuser" in script
    assert "-pe " not in script  # no parallel environment configured


def test_job_id_and_limits():
    sp, _ = _spawner(req_walltime_warning=0, parallel_environment="smp")
    assert sp.parse_job_id("42\n") == "42" and sp.parse_job_id('Your job 43 ("x") has been submitted') == "43"
    with pytest.raises(ValueError, match="no job id"):
        sp.parse_job_id("Unable to run job: denied")
    subvars = sp.get_req_subvars()
    assert subvars["hard_runtime"] == "2:00:00" and subvars["soft_runtime"] == ""
    assert subvars["parallel_env"] == "smp"
    assert sp.walltime_enforce is False  # Grid Engine ends the job at h_rt
