"""Shared-account isolation checks of ``node-agent launch`` (node_agent/isolation.py).

The checks are pure functions of the HPC config, the user's paths and the job environment; the
``node-agent launch`` runs here are real processes. Where a run gets as far as starting the
container, ``container.runtime`` is a small script standing in for Apptainer that records its
argv, working directory and environment (Apptainer itself is exercised by
tests/test_e2e_isolation.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from node_agent import hpc_config as hc
from node_agent import isolation as iso
from node_agent import launch as la

REPO = Path(__file__).resolve().parent.parent


def cfg(scratch: str = "/s", **sections) -> hc.HpcConfig:
    data: dict = {"storage": {"scratch_dir": scratch}, "container": {"image": "/img/cpu.sif"}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return hc.config_from_dict(data)


def problems(config: hc.HpcConfig, user: str = "alice", env=None) -> list[iso.Problem]:
    return iso.check(config, config.user_paths(user), env or {})


def options(ps: list[iso.Problem]) -> list[str]:
    return [p.option for p in ps]


# ---- the checks ------------------------------------------------------------------------------


def test_default_config_passes():
    c = cfg()
    assert c.isolation.shared_account and not c.isolation.allow_weak
    assert problems(c) == []
    assert problems(cfg(container={"contain": "containall"})) == []


@pytest.mark.parametrize(
    "mode, lacks", [("contain", "no PID namespace"), ("none", "no PID namespace and no private /tmp")]
)
def test_contain_without_pid_namespace_is_a_problem(mode, lacks):
    ps = problems(cfg(container={"contain": mode}))
    assert options(ps) == ["container.contain"]
    assert lacks in ps[0].reason and "/proc/PID/environ" in ps[0].reason
    assert '"contain-pid" or "containall"' in ps[0].reason


def test_per_user_accounts_and_no_container_are_not_checked():
    assert (
        problems(cfg(container={"contain": "none", "binds": ["{home_root}"]}, isolation={"shared_account": False}))
        == []
    )
    assert problems(hc.config_from_dict({"container": {"enabled": False}})) == []


@pytest.mark.parametrize(
    "bind, what",
    [
        ("{home_root}", "holds every user's home"),
        ("{home_root}:/homes:ro", "holds every user's home"),
        ("{scratch_dir}:/scratch", "holds every user's home"),  # an ancestor of the home root
        ("/:/host", "holds every user's home"),
        ("{home_root}/bob", "inside another user's home"),
        ("{home_root}/bob/notebooks:/nb", "inside another user's home"),
        ("{scratch_dir}/overlays", "holds every user's overlay image"),
        ("{scratch_dir}/overlays/bob.img:/bob.img", "other users' overlay images"),
    ],
)
def test_binds_exposing_other_users_are_problems(bind, what):
    for option in ("binds", "extra_binds"):
        ps = problems(cfg(container={option: [bind]}))
        assert options(ps) == [f"container.{option}"], ps
        assert what in ps[0].reason, ps[0].reason


@pytest.mark.parametrize(
    "bind",
    [
        "{home}",
        "{home}/data:/data",
        "{home_root}/{user}:/mine",
        "/opt/sw:/opt/sw:ro",
        "{scratch_dir}/shared:/shared:ro",
        "{scratch_dir}/overlays/{user}.img:/img",
    ],
)
def test_own_and_unrelated_binds_pass(bind):
    assert problems(cfg(container={"binds": [bind]})) == []


def test_overlay_dir_is_free_when_overlays_are_off():
    assert problems(cfg(overlay={"enabled": False}, container={"binds": ["{scratch_dir}/overlays"]})) == []


def test_symlink_to_the_home_root_is_resolved(tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "homes" / "bob").mkdir(parents=True)
    link = tmp_path / "innocent"
    link.symlink_to(scratch / "homes")
    ps = problems(cfg(str(scratch), container={"binds": [f"{link}:/data"]}))
    assert options(ps) == ["container.binds"] and "every user's home" in ps[0].reason
    link2 = tmp_path / "bobs"
    link2.symlink_to(scratch / "homes" / "bob")
    assert options(problems(cfg(str(scratch), container={"binds": [str(link2)]}))) == ["container.binds"]


def test_nbgrader_and_webdav_binds_are_checked():
    ps = problems(
        cfg(nbgrader={"exchange_dir": "{home_root}/exchange", "config_file": "{home_root}/bob/nbgrader_config.py"})
    )
    assert options(ps) == ["nbgrader.exchange_dir", "nbgrader.config_file"]
    assert problems(cfg(nbgrader={"exchange_dir": "{scratch_dir}/exchange"})) == []
    ps = problems(
        cfg(
            webdav={
                "enabled": True,
                "mount_point": "{home_root}/dav-{user}",
                "mount_command": ["mount", "{mount_point}"],
            }
        )
    )
    assert options(ps) == ["webdav.mount_point"]


@pytest.mark.parametrize(
    "args, what",
    [
        (["--bind", "/s/homes:/h"], "every user's home"),
        (["--bind=/opt:/opt,/s/homes/bob:/b"], "another user's home"),
        (["-B", "/s"], "every user's home"),
        (["-B/s/homes/bob"], "another user's home"),
        (["--mount", "type=bind,src=/s/homes,dst=/h"], "every user's home"),
        (["--mount=type=bind,source=/s/homes/bob,destination=/b"], "another user's home"),
        (["--overlay", "/s/overlays/bob.img:ro"], "other users' overlay images"),
        (["-o", "/s/overlays"], "every user's overlay image"),
        (["--workdir", "/scratch/w"], "/scratch/w/tmp the /tmp of every job"),
        (["-W/scratch/w"], "/scratch/w/tmp the /tmp of every job"),
        (["--home", "/s/homes:/home/x"], "would replace the user's own home"),
    ],
)
def test_extra_args_are_checked(args, what):
    ps = problems(cfg(container={"extra_args": args}))
    assert ps and set(options(ps)) == {"container.extra_args"}, ps
    assert any(what in p.reason for p in ps), ps


def test_harmless_extra_args_pass():
    assert (
        problems(
            cfg(container={"extra_args": ["--writable-tmpfs", "--env", "A=-B/s/homes", "--bind", "/opt:/opt", "--ipc"]})
        )
        == []
    )


@pytest.mark.parametrize(
    "name, value, what",
    [
        ("APPTAINER_BIND", "/opt,/s/homes:/h", "every user's home"),
        ("SINGULARITY_BINDPATH", "/s/homes/bob", "another user's home"),
        ("APPTAINER_OVERLAY", "/s/overlays/bob.img", "other users' overlay images"),
        ("APPTAINER_WORKDIR", "/scratch/w", "/tmp of every job"),
        ("SINGULARITY_WORKDIR", "/scratch/w", "/tmp of every job"),
    ],
)
def test_runtime_environment_is_checked(name, value, what):
    ps = problems(cfg(), env={name: value})
    assert options(ps) == [f"${name} (job environment)"], ps
    assert what in ps[0].reason


def test_private_dirs_env():
    assert iso.private_dirs_env(cfg()) == {"APPTAINERENV_NODE_AGENT_RUNTIME_DIR": "/tmp", "APPTAINERENV_TMPDIR": "/tmp"}
    assert iso.private_dirs_env(cfg(container={"runtime": "/opt/bin/singularity"})) == {
        "SINGULARITYENV_NODE_AGENT_RUNTIME_DIR": "/tmp",
        "SINGULARITYENV_TMPDIR": "/tmp",
    }
    assert iso.private_dirs_env(cfg(isolation={"shared_account": False})) == {}
    assert iso.private_dirs_env(hc.config_from_dict({"container": {"enabled": False}})) == {}


def test_bad_isolation_values_name_the_option():
    with pytest.raises(hc.HpcConfigError, match=r"isolation.allow_weak: must be true or false"):
        hc.config_from_dict({"container": {"image": "/i"}, "isolation": {"allow_weak": "yes"}})
    with pytest.raises(
        hc.HpcConfigError,
        match=r"isolation.shared: unknown option \(did you "
        r"mean 'isolation.shared_account'\?\)",
    ):
        hc.config_from_dict({"container": {"image": "/i"}, "isolation": {"shared": True}})


# ---- node-agent launch -----------------------------------------------------------------------

FAKE_RUNTIME = """#!{python}
# stands in for apptainer: records what launch hands it, then exits 0
import json, os, sys
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}},
          open(os.environ["RECORD"], "w"))
"""


def launch_conf(tmp_path: Path, container: str = "", isolation: str = "") -> Path:
    image = tmp_path / "cpu.sif"
    image.write_text("")
    runtime = tmp_path / "fake-apptainer"
    runtime.write_text(FAKE_RUNTIME.format(python=sys.executable))
    runtime.chmod(0o755)
    conf = tmp_path / "hpc.toml"
    conf.write_text(
        textwrap.dedent(f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        enabled = false
        [container]
        runtime = "{runtime}"
        image = "{image}"
    """)
        + textwrap.dedent(container)
        + ("\n[isolation]\n" + textwrap.dedent(isolation) if isolation else "")
    )
    return conf


def run_launch(args, tmp_path: Path, env_extra=None):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NODE_AGENT", "JUPYTERHUB", "APPTAINER", "SINGULARITY"))
    }
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "JUPYTERHUB_USER": "alice",
            "RECORD": str(tmp_path / "record.json"),
            **(env_extra or {}),
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "node_agent.launch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize("mode", ["contain", "none"])
def test_launch_refuses_shared_account_without_pid_namespace(tmp_path, mode):
    conf = launch_conf(tmp_path, f'contain = "{mode}"\n')
    r = run_launch(["--config", str(conf), "--", "jupyterhub-singleuser"], tmp_path)
    assert r.returncode == la.EX_CONFIG == 78, r.stderr
    assert f"hpc config error ({conf}): container.contain: '{mode}' gives the job no PID namespace" in r.stderr
    assert "set isolation.allow_weak = true to start anyway" in r.stderr
    assert not (tmp_path / "record.json").exists()  # the runtime never ran
    assert not (tmp_path / "scratch" / "homes" / "alice").exists()  # nothing created
    dry = run_launch(["--config", str(conf), "--dry-run", "--", "x"], tmp_path)
    assert dry.returncode == 78 and "container.contain" in dry.stderr and not dry.stdout


def test_launch_refuses_a_bind_of_the_home_root(tmp_path):
    conf = launch_conf(tmp_path, 'binds = ["{home_root}:/homes:ro"]\n')
    r = run_launch(["--config", str(conf), "--", "x"], tmp_path)
    assert r.returncode == 78, r.stderr
    assert f"container.binds: binds {tmp_path}/scratch/homes, which holds every user's home" in r.stderr
    r = run_launch(
        ["--config", str(launch_conf(tmp_path)), "--", "x"],
        tmp_path,
        {"APPTAINER_BIND": f"{tmp_path}/scratch/homes/bob:/b"},
    )
    assert r.returncode == 78 and "$APPTAINER_BIND (job environment): binds" in r.stderr


def test_allow_weak_starts_with_a_warning(tmp_path):
    conf = launch_conf(tmp_path, 'contain = "none"\n', "allow_weak = true\n")
    r = run_launch(["--config", str(conf), "--", "x"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "isolation.allow_weak: starting anyway although container.contain: 'none'" in r.stderr
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["argv"][:2] == ["exec", "--home"]  # no --contain / --pid


def test_per_user_accounts_may_run_without_pid_namespace(tmp_path):
    conf = launch_conf(tmp_path, 'contain = "contain"\n', "shared_account = false\n")
    r = run_launch(["--config", str(conf), "--", "x"], tmp_path)
    assert r.returncode == 0 and "isolation" not in r.stderr, r.stderr
    rec = json.loads((tmp_path / "record.json").read_text())
    assert "APPTAINERENV_NODE_AGENT_RUNTIME_DIR" not in rec["env"]


def test_launch_puts_socket_dir_and_tmp_in_the_private_tmp(tmp_path):
    conf = launch_conf(tmp_path)
    r = run_launch(
        ["--config", str(conf), "--", "x"],
        tmp_path,
        {"XDG_RUNTIME_DIR": "/run/user/4242", "TMPDIR": str(tmp_path), "NODE_AGENT_RUNTIME_DIR": "/shared/run"},
    )
    assert r.returncode == 0, r.stderr
    assert "isolation: shared account; own PID namespace and /tmp" in r.stderr
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["argv"][:3] == ["exec", "--contain", "--pid"]
    # inside, these win over the host's values (Apptainer's documented *ENV_ prefix)
    assert rec["env"]["APPTAINERENV_NODE_AGENT_RUNTIME_DIR"] == "/tmp"
    assert rec["env"]["APPTAINERENV_TMPDIR"] == "/tmp"
    assert rec["cwd"] == str(tmp_path / "scratch" / "homes" / "alice")  # the user's own home


def test_no_container_shared_account_warns(tmp_path):
    conf = tmp_path / "hpc.toml"
    conf.write_text(
        f'[storage]\nscratch_dir = "{tmp_path}/scratch"\n[container]\nenabled = false\ninner_command = []\n'
    )
    r = run_launch(["--config", str(conf), "--", "true"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no-container mode under a shared account" in r.stderr
    assert "the hub must keep them off the node" in r.stderr


def test_no_container_refused_when_the_hub_expected_one(tmp_path):
    """The hub (SlurmBrokerSpawner) counted on a container and so did not ask for a node to
    itself; launch configured without one must not start the server next to other users."""
    conf = tmp_path / "hpc.toml"
    conf.write_text(
        f'[storage]\nscratch_dir = "{tmp_path}/scratch"\n[container]\nenabled = false\ninner_command = []\n'
    )
    r = run_launch(["--config", str(conf), "--", "true"], tmp_path, {iso.EXPECT_CONTAINER_ENV: "1"})
    assert r.returncode == 78, r.stderr
    assert (
        f"hpc config error ({conf}): container.enabled: is false, but the hub submitted "
        f"this job expecting a container" in r.stderr
    )
    assert "c.SlurmBrokerSpawner.jobs_in_container = False" in r.stderr
    assert not (tmp_path / "scratch" / "homes" / "alice").exists()
    conf.write_text(conf.read_text() + "[isolation]\nallow_weak = true\n")
    r = run_launch(["--config", str(conf), "--", "true"], tmp_path, {iso.EXPECT_CONTAINER_ENV: "1"})
    assert r.returncode == 0 and "allow_weak: starting anyway although container.enabled" in r.stderr, r.stderr
