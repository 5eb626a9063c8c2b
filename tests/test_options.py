"""The options form (parsing sinfo and user input, limits, profiles, the spawner hooks), the
walltime bookkeeping, and the order of the spawn progress stages (with a scripted broker)."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from batchspawner.batchspawner import JobStatus
from tornado import web

from hub_plugin import resources
from hub_plugin.options import ResourceOptionsMixin
from hub_plugin.options_form import render_form
from hub_plugin.slurm import SlurmBrokerSpawner
from hub_plugin.spawners import LocalBrokerSpawner

SINFO = """\
debug*|1:00:00|4|8000|(null)|up
long|7-00:00:00|64|256000|(null)|up
gpu|2-00:00:00|32|128000|gpu:v100:2|up
gpu|2-00:00:00|64|512000|gpu:a100:4(S:0-1)|up
old|infinite|8|1|(null)|down
"""


def parts():
    return resources.parse_sinfo(SINFO)


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,secs",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("1:00:00", 3600),
        ("2-00", 172800),
        ("1-02:30", 95400),
        ("1-00:00:01", 86401),
        ("infinite", None),
        ("UNLIMITED", None),
        ("", None),
    ],
)
def test_parse_slurm_time(text, secs):
    assert resources.parse_slurm_time(text) == secs


@pytest.mark.parametrize("bad", ["abc", "1:2:3:4", "-5", "1h"])
def test_parse_slurm_time_rejects(bad):
    with pytest.raises(ValueError):
        resources.parse_slurm_time(bad)


@pytest.mark.parametrize(
    "text,secs", [("2", 7200), ("1.5", 5400), ("0:45", 2700), ("1:30:00", 5400), ("1-00:00", 86400)]
)
def test_parse_walltime(text, secs):
    assert resources.parse_walltime(text) == secs


@pytest.mark.parametrize("bad", ["", "0", "0:00", "1:75", "soon", "-1"])
def test_parse_walltime_rejects(bad):
    with pytest.raises(ValueError):
        resources.parse_walltime(bad)


def test_memory_and_gres():
    assert resources.parse_memory_mb("4") == 4096 and resources.parse_memory_mb("512M") == 512
    assert resources.parse_memory_mb("1.5 GB") == 1536 and resources.parse_memory_mb("1T") == 1024 * 1024
    assert resources.format_memory(4096) == "4G" and resources.format_memory(1536) == "1536M"
    for bad in ("", "lots", "-1G", "4X"):
        with pytest.raises(ValueError):
            resources.parse_memory_mb(bad)
    assert resources.parse_gres_gpus("(null)") == (0, "")
    assert resources.parse_gres_gpus("gpu:2") == (2, "")
    assert resources.parse_gres_gpus("gpu:a100:4(S:0-1)") == (4, "a100")
    assert resources.parse_gres_gpus("gpu:tesla:2,mps:100") == (2, "tesla")
    assert resources.format_slurm_time(2700) == "00:45:00" and resources.format_slurm_time(90000) == "1-01:00:00"


def test_parse_sinfo_merges_node_groups():
    p = {x.name: x for x in parts()}
    assert list(p) == ["debug", "long", "gpu", "old"]
    assert p["debug"].default and p["debug"].max_time == 3600 and p["debug"].cpus == 4
    assert p["gpu"].gpus == 4 and p["gpu"].gpu_type == "a100" and p["gpu"].cpus == 64 and p["gpu"].memory_mb == 512000
    assert not p["old"].available and p["old"].max_time is None and not p["old"].memory_known
    assert "4 GPUs (a100)" in p["gpu"].summary()


def test_local_partition_is_this_machine():
    p = resources.local_partition(3600)
    assert p.name == "local" and p.cpus >= 1 and p.memory_mb > 0 and p.max_time == 3600


# -- validation ------------------------------------------------------------------------------


def test_defaults_and_normalization():
    out = resources.validate_options({}, parts())
    assert out == {
        "profile": "",
        "partition": "debug",
        "nprocs": "1",
        "memory": "",
        "ngpus": "",
        "runtime": "01:00:00",
        "image": "compute",
    }
    form = {
        "partition": ["gpu"],
        "nprocs": ["8"],
        "memory": ["16"],
        "ngpus": ["2"],
        "runtime": ["12"],
        "image": ["gpu"],
    }
    assert resources.validate_options(form, parts()) == {
        "profile": "",
        "partition": "gpu",
        "nprocs": "8",
        "memory": "16G",
        "ngpus": "2",
        "runtime": "12:00:00",
        "image": "gpu",
    }
    # REST API bodies use scalars
    assert (
        resources.validate_options({"partition": "long", "nprocs": 2, "runtime": "3-00:00"}, parts())["runtime"]
        == "3-00:00:00"
    )


@pytest.mark.parametrize(
    "form,words",
    [
        ({"partition": "nope"}, ["Partition 'nope' does not exist", "debug, long, gpu"]),
        ({"partition": "old"}, ["not available"]),
        ({"nprocs": "5"}, ["CPUs: 5 requested", "at most 4"]),
        ({"nprocs": "0"}, ["at least 1"]),
        ({"nprocs": "two"}, ["not a whole number"]),
        ({"memory": "9"}, ["Memory: 9G requested", "at most 7 GB"]),
        ({"memory": "lots"}, ["not a size"]),
        ({"ngpus": "1"}, ["GPUs: 1 requested", "has no GPUs"]),
        ({"partition": "gpu", "ngpus": "5"}, ["at most 4"]),
        ({"runtime": "2"}, ["Walltime: 2 h 00 min requested", "at most 1 h 00 min"]),
        ({"runtime": "whenever"}, ["not a duration"]),
        ({"image": "windows"}, ["Image: 'windows' is not one of"]),
        ({"image": "gpu"}, ["GPU image needs at least one GPU"]),
    ],
)
def test_invalid_choices_have_clear_messages(form, words):
    with pytest.raises(resources.OptionsError) as e:
        resources.validate_options(form, parts())
    for w in words:
        assert w in str(e.value), str(e.value)
    assert e.value.jupyterhub_message == str(e.value)


def test_unknown_memory_limit_is_not_enforced():
    out = resources.validate_options(
        {"partition": "old-up", "memory": "64"}, [resources.Partition("old-up", memory_mb=1)]
    )
    assert out["memory"] == "64G"


PROFILES = [
    {
        "name": "course",
        "display_name": "Course",
        "description": "2 CPUs, 2 h",
        "req_nprocs": "2",
        "req_runtime": "2:00:00",
        "req_partition": "long",
    },
    {"name": "gpu-small", "req_partition": "gpu", "req_ngpus": "1", "image": "gpu"},
    {"name": "too-big", "req_nprocs": "99"},
]


def test_profiles_override_fields_and_are_checked():
    out = resources.validate_options({"profile": "course", "nprocs": "64"}, parts(), profiles=PROFILES)
    assert (out["profile"], out["partition"], out["nprocs"], out["runtime"]) == ("course", "long", "2", "02:00:00")
    out = resources.validate_options({"profile": "gpu-small"}, parts(), profiles=PROFILES)
    assert (out["ngpus"], out["image"]) == ("1", "gpu")
    with pytest.raises(resources.OptionsError, match="CPUs: 99"):
        resources.validate_options({"profile": "too-big"}, parts(), profiles=PROFILES)
    with pytest.raises(resources.OptionsError, match="Unknown profile"):
        resources.validate_options({"profile": "x"}, parts(), profiles=PROFILES)
    assert resources.validate_options({"profile": "custom", "nprocs": "3"}, parts(), profiles=PROFILES)["nprocs"] == "3"
    with pytest.raises(resources.OptionsError, match="choose one of the profiles"):
        resources.validate_options({"nprocs": "3"}, parts(), profiles=PROFILES, allow_custom=False)


def test_profile_config_errors_name_the_profile():
    with pytest.raises(ValueError, match=r"profiles\[0\]"):
        resources.check_profiles([{"description": "no name"}])
    with pytest.raises(ValueError, match="unknown keys"):
        resources.check_profiles([{"name": "a", "req_cmd": "rm -rf /"}])
    with pytest.raises(ValueError, match="unique"):
        resources.check_profiles([{"name": "a"}, {"name": "a"}])


def test_render_form_escapes_and_preselects():
    p = parts() + [resources.Partition('x"><script>', cpus=1)]
    html = render_form(
        p,
        profiles=PROFILES,
        current={
            "partition": "gpu",
            "nprocs": "8",
            "memory": "16G",
            "runtime": "02:00:00",
            "image": "gpu",
            "profile": "custom",
        },
    )
    for name in ("partition", "nprocs", "memory", "ngpus", "runtime", "image", "profile"):
        assert f'name="{name}"' in html
    assert '<option value="gpu" selected>' in html and 'value="16"' in html and 'value="2:00"' in html
    assert '<script>"' not in html and "x&quot;&gt;&lt;script&gt;" in html
    assert '<option value="old" disabled>' in html


# -- the spawner hooks -----------------------------------------------------------------------


def local_spawner(**kw):
    user = mock.Mock()
    user.name = "zoe"
    user.url = "/user/zoe/"
    user.escaped_name = "zoe"
    hub = mock.Mock(
        api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/", public_host="", url="http://127.0.0.1:8081/hub/"
    )
    return LocalBrokerSpawner(user=user, hub=hub, **kw)


OptionsSlurmSpawner = SlurmBrokerSpawner  # it has the options mixin
assert issubclass(SlurmBrokerSpawner, ResourceOptionsMixin)


def slurm_spawner(sinfo=SINFO, **kw):
    kw.setdefault("form_slurm_choices", [])  # the account/QoS/reservation fields: test_slurm_choices.py
    user = mock.Mock()
    user.name = "zoe"
    s = OptionsSlurmSpawner(user=user, hub=mock.Mock(), **kw)
    s.run_command = mock.AsyncMock(return_value=sinfo)
    return s


@pytest.mark.asyncio
async def test_form_from_the_local_machine():
    s = local_spawner()
    html = await s.get_options_form()
    assert '<option value="local" selected>' in html
    with pytest.raises(resources.OptionsError, match="CPUs: 999 requested"):
        await s.run_options_from_form({"nprocs": ["999"]})


@pytest.mark.asyncio
async def test_slurm_form_uses_sinfo_once_per_cache_period():
    ResourceOptionsMixin._partition_cache.clear()
    s = slurm_spawner()
    html = await s.get_options_form()
    assert "a100" in html and "long" in html
    await s.get_options_form()
    s.run_command.assert_awaited_once_with(s.sinfo_command)
    assert s._resource_kind() == "slurm" and not s.walltime_enforce
    ResourceOptionsMixin._partition_cache.clear()
    broken = slurm_spawner()
    broken.run_command = mock.AsyncMock(side_effect=RuntimeError("slurm_load_partitions: Unable to contact"))
    assert "could not be read" in await broken.get_options_form()
    ResourceOptionsMixin._partition_cache.clear()


@pytest.mark.asyncio
async def test_apply_sets_req_traits_resets_and_sanitizes():
    ResourceOptionsMixin._partition_cache.clear()
    s = slurm_spawner(req_runtime="0:30:00", req_memory="2G")
    await s.apply_user_options(
        s, {"partition": "gpu", "nprocs": "8", "ngpus": "2", "image": "gpu", "cmd": "rm -rf ~", "options": "--uid=0"}
    )
    assert (s.req_partition, s.req_nprocs, s.req_memory, s.req_ngpus, s.req_runtime) == (
        "gpu",
        "8",
        "2G",
        "2",
        "00:30:00",
    )
    assert set(s.user_options) == {"profile", "partition", "nprocs", "memory", "ngpus", "runtime", "image"} | {
        "account",
        "qos",
        "reservation",
    }
    assert (s.user_options["account"], s.req_account) == ("", "")  # not chosen, none configured
    # the next spawn without options starts from the configuration again
    await s.apply_user_options(s, {})
    assert (s.req_partition, s.req_nprocs, s.req_ngpus, s.req_memory) == ("debug", "1", "", "2G")
    with pytest.raises(web.HTTPError) as e:
        await s.apply_user_options(s, {"runtime": "3"})
    assert e.value.status_code == 400 and "at most 1 h 00 min" in e.value.jupyterhub_message
    ResourceOptionsMixin._partition_cache.clear()


@pytest.mark.asyncio
async def test_image_reaches_env_and_launch_flag_and_walltime_the_script():
    s = local_spawner(agent_command="node-agent launch --config /etc/hpc.toml --")
    s.cmd = ["jupyterhub-singleuser"]
    await s.apply_user_options(s, {"runtime": "0:45", "image": "compute"})
    s._broker_env = {}
    env = s.get_env()
    assert env["JUPYTERHUB_IMAGE"] == "compute" and env["JUPYTERHUB_WALLTIME_SECONDS"] == "2700"
    cmd = s.cmd_formatted_for_batch()
    assert cmd.startswith("node-agent launch --no-gpu --config /etc/hpc.toml -- jupyterhub-singleuser")
    assert s.agent_command == "node-agent launch --config /etc/hpc.toml --"
    assert 'export JUPYTERHUB_WALLTIME_END="$(( $(date +%s) + 2700 ))"' in s.get_req_subvars()["prologue"]
    # node-agent run (no launcher): no flag
    s.agent_command = "node-agent run --"
    assert s.cmd_formatted_for_batch().startswith("node-agent run -- jupyterhub-singleuser")


@pytest.mark.asyncio
async def test_walltime_status_warning_notice_enforcement_and_state():
    s = local_spawner(walltime_warning_minutes=5)
    s.req_runtime = "01:00:00"
    s.note_job_started()
    st = s.walltime_status()
    assert 3590 <= st["left"] <= 3600 and not st["warning"]
    assert st["text"] in ("1 h 00 min", "59 min")
    s.job_started_at = time.time() - 3400
    assert s.walltime_status()["warning"]
    state = s.get_state()
    t = local_spawner()
    t.load_state(state)
    assert t.walltime_end() == pytest.approx(s.walltime_end())

    # poll: the broker's walltime notice is kept; the hub stops the server when time is up
    s.session_id, s.job_id = "sid", "7"
    s._configured = {}
    base_poll = mock.AsyncMock(return_value=None)
    with (
        mock.patch("hub_plugin.mixin.BrokerSpawnerMixin.poll", base_poll),
        mock.patch.object(type(s), "stop", mock.AsyncMock()) as stop,
    ):
        s.last_session = {"state": "ready", "walltime_warning": "the job is close to its time limit"}
        assert await s.poll() is None
        assert s.walltime_status()["notice"] == "the job is close to its time limit"
        s.job_started_at = time.time() - 3601
        assert await s.poll() == 0
        stop.assert_awaited_once()
    assert s.walltime_end() == 0 and s.walltime_status() == {}


# -- progress stages -------------------------------------------------------------------------


class ScriptedBroker:
    """Answers wait_session with the given states in turn."""

    def __init__(self, states, node="cn01"):
        self.states = list(states)
        self.node = node

    async def create_session(self, user, name, spec):
        return {"id": "sid", "secret": "s3cret", "ssh": {"host": "127.0.0.1", "port": 22, "host_key": "k"}}

    async def update_session(self, sid, **kw):
        pass

    async def wait_session(self, sid, state, timeout):
        st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"state": st, "node": self.node, "target": "http://127.0.0.1:4000", "end_reason": "agent exited"}

    async def close_session(self, sid, reason):
        pass


def scripted_spawner(states, job_states, tail=""):
    s = local_spawner()
    s.cmd = ["jupyterhub-singleuser"]
    broker = ScriptedBroker(states)
    jobs = list(job_states)

    async def query():
        st = jobs.pop(0) if len(jobs) > 1 else jobs[0]
        s.job_status = {JobStatus.RUNNING: "RUNNING cn01", JobStatus.PENDING: "PENDING"}.get(st, "FAILED 1")
        return st

    async def submit():
        s.job_id = "42"
        return "42"

    s.submit_batch_script = submit
    s.query_job_status = query
    s.state_gethost = lambda: "cn01" if s.job_status.startswith("RUNNING") else ""
    s.job_output_tail = mock.AsyncMock(return_value=tail)
    return s, broker


async def run_start(s, broker):
    with mock.patch.object(type(s), "broker", new=property(lambda self: broker)):
        return await s.start()


def messages(s):
    return [(e.get("progress"), e["message"]) for e in s._progress_events]


@pytest.mark.asyncio
async def test_progress_stages_in_order_with_rising_percentages():
    s, broker = scripted_spawner(
        ["registered", "registered", "connected", "ready"], [JobStatus.PENDING, JobStatus.RUNNING]
    )
    assert await run_start(s, broker) == "http://127.0.0.1:4000"
    ev = messages(s)
    texts = [m for _, m in ev]
    assert [p for p, _ in ev] == [5, 10, 20, 30, 50, 70, 100]
    assert "queued" in texts[3] and "running on cn01" in texts[4] and "Tunnel connected from cn01" in texts[5]
    assert texts[6].startswith("Server ready after")
    assert s.job_started_at > 0  # walltime clock started when the job was seen running


@pytest.mark.asyncio
async def test_tunnel_message_names_the_batch_systems_host_before_the_agents_hello():
    """The session may say 'connected' before the agent's hello named its node (seen on the
    site topology): the message then names the host the batch system reported."""
    s, broker = scripted_spawner(["registered", "connected", "ready"], [JobStatus.RUNNING])
    broker.node = ""
    await run_start(s, broker)
    texts = [m for _, m in messages(s)]
    assert any("Tunnel connected from cn01" in t for t in texts), texts


@pytest.mark.asyncio
async def test_fast_ready_still_reports_every_stage():
    s, broker = scripted_spawner(["ready"], [JobStatus.RUNNING])
    await run_start(s, broker)
    assert [p for p, _ in messages(s)] == [5, 10, 20, 50, 70, 100]
    assert "running on cn01" in messages(s)[3][1]


@pytest.mark.asyncio
async def test_job_failure_carries_state_and_log_tail():
    s, broker = scripted_spawner(
        ["registered"],
        [JobStatus.RUNNING, JobStatus.NOTFOUND],
        tail="line 1\nImportError: no module named jupyterhub\n",
    )
    with pytest.raises(RuntimeError) as e:
        await run_start(s, broker)
    msg = str(e.value)
    assert "Job 42 ended before the server was ready (FAILED 1)" in msg and "ImportError" in msg


@pytest.mark.asyncio
async def test_maintenance_and_refused_submit_messages():
    s, broker = scripted_spawner(["registered"], [JobStatus.NOTFOUND], tail="NODE-AGENT-MAINTENANCE: Back at 14:00\n")
    with pytest.raises(RuntimeError, match="^Back at 14:00$"):
        await run_start(s, broker)
    s, broker = scripted_spawner(["registered"], [JobStatus.RUNNING])
    s.submit_batch_script = mock.AsyncMock(
        side_effect=RuntimeError(
            "sbatch: error: Batch job submission failed: Requested node configuration is not available"
        )
    )
    with pytest.raises(RuntimeError, match="The batch system refused the job: sbatch: error: .*not available"):
        await run_start(s, broker)


@pytest.mark.asyncio
async def test_session_closed_before_ready_shows_reason_and_tail():
    s, broker = scripted_spawner(["registered", "closed"], [JobStatus.RUNNING], tail="Traceback: boom\n")
    with pytest.raises(RuntimeError) as e:
        await run_start(s, broker)
    assert "session ended before the server was ready (agent exited)" in str(e.value)
    assert "Traceback: boom" in str(e.value)
