"""`node-agent launch`: container command, maintenance, user names, WebDAV, real runs."""

import datetime
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from node_agent import hpc_config as hc
from node_agent import launch as la

from apptainer_image import ensure_apptainer

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-that-must-not-leak"


def cfg(**sections):
    data = {"container": {"image": "/img/cpu.sif"}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return hc.config_from_dict(data)


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run_launch(args, env_extra=None, cwd=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_AGENT", "JUPYTERHUB"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "node_agent.launch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# ---- build_container_argv -------------------------------------------------------------------


def test_cpu_argv_exact():
    c = cfg(storage={"scratch_dir": "/s"})
    argv = la.build_container_argv(c, "alice", False, ["jupyterhub-singleuser", "--debug"])
    assert argv == [
        "apptainer",
        "exec",
        "--contain",
        "--pid",
        "--home",
        "/s/homes/alice:/home/jovyan",
        "--pwd",
        "/home/jovyan",
        "--overlay",
        "/s/overlays/alice.img",
        "/img/cpu.sif",
        "node-agent",
        "run",
        "--",
        "jupyterhub-singleuser",
        "--debug",
    ]


def test_gpu_argv_uses_gpu_image_and_flag():
    c = cfg(storage={"scratch_dir": "/s"}, container={"gpu_image": "/img/gpu.sif"})
    argv = la.build_container_argv(c, "alice", True, ["cmd"])
    assert argv[:5] == ["apptainer", "exec", "--contain", "--pid", "--nv"]
    assert argv[-5:] == ["/img/gpu.sif", "node-agent", "run", "--", "cmd"]
    # without a GPU image, the compute image is used, still with --nv
    c2 = cfg(container={"gpu_flag": "--rocm", "runtime": "singularity"})
    argv2 = la.build_container_argv(c2, "alice", True, ["cmd"])
    assert argv2[0] == "singularity" and "--rocm" in argv2 and "/img/cpu.sif" in argv2
    assert "--nv" not in la.build_container_argv(c, "alice", False, ["cmd"])


def test_no_container_argv():
    c = hc.config_from_dict({"container": {"enabled": False}})
    assert la.build_container_argv(c, "alice", True, ["jupyterhub-singleuser"]) == [
        "node-agent",
        "run",
        "--",
        "jupyterhub-singleuser",
    ]
    c2 = hc.config_from_dict({"container": {"enabled": False, "inner_command": []}})
    assert la.build_container_argv(c2, "alice", False, ["a", "b c"]) == ["a", "b c"]


def test_binds_no_mount_extra_args_and_containall():
    c = cfg(
        storage={"scratch_dir": "/s"},
        overlay={"enabled": False},
        container={
            "binds": ["/opt/sw:/opt/sw:ro", "/data/{user}"],
            "extra_binds": ["{home_root}/shared:{container_home}/shared"],
            "no_mount": ["tmp", "cwd", "/etc/hosts"],
            "extra_args": ["--writable-tmpfs"],
            "contain": "containall",
            "workdir": "/work",
            "home": "/home/u",
        },
        nbgrader={"exchange_dir": "/srv/ex", "config_file": "{scratch_dir}/nbgrader_config.py"},
    )
    argv = la.build_container_argv(c, "a b", False, ["cmd"], webdav=True)
    assert argv == [
        "apptainer",
        "exec",
        "--containall",
        "--home",
        "/s/homes/a_20b:/home/u",
        "--pwd",
        "/work",
        "--bind",
        "/opt/sw:/opt/sw:ro",
        "--bind",
        "/data/a_20b",
        "--bind",
        "/s/homes/shared:/home/u/shared",
        "--bind",
        "/srv/ex:/srv/nbgrader/exchange:rw",
        "--bind",
        "/s/nbgrader_config.py:/etc/jupyter/nbgrader_config.py:ro",
        "--bind",
        "/s/homes/a_20b/WebDAV:/home/u/WebDAV",
        "--no-mount",
        "tmp,cwd,/etc/hosts",
        "--writable-tmpfs",
        "/img/cpu.sif",
        "node-agent",
        "run",
        "--",
        "cmd",
    ]


def test_missing_extra_bind_skipped_fixed_kept(tmp_path):
    c = cfg(container={"binds": ["/nonexistent/fixed"], "extra_binds": [f"{tmp_path}:/x", "/nonexistent/extra:/y"]})
    argv = la.build_container_argv(c, "u", False, ["c"], path_exists=os.path.exists)
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == ["/nonexistent/fixed", f"{tmp_path}:/x"]


def test_overlay_overrides():
    c = cfg(storage={"scratch_dir": "/s"})
    argv = la.build_container_argv(c, "u", False, ["c"], overlay="/o.img", overlay_readonly=True, home_source="/tmp/h")
    assert "/o.img:ro" in argv and "/tmp/h:/home/jovyan" in argv
    assert "--overlay" not in la.build_container_argv(c, "u", False, ["c"], overlay=None)


def test_user_args_stay_single_elements():
    c = cfg()
    inner = ["sh", "-c", "echo $HOME; rm -rf / # ; `x`", "--bind", "/etc:/x"]
    argv = la.build_container_argv(c, "u", False, inner)
    assert argv[-len(inner) :] == inner
    assert argv.index("--") > argv.index("/img/cpu.sif")


def test_gpu_detection():
    c = cfg()
    assert la.decide_gpu(c, None, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert la.decide_gpu(c, None, {"SLURM_JOB_GPUS": "3"})
    assert not la.decide_gpu(c, None, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"})
    assert not la.decide_gpu(c, None, {})
    assert not la.decide_gpu(c, False, {"CUDA_VISIBLE_DEVICES": "0"})
    assert la.decide_gpu(cfg(container={"gpu": "always"}), None, {})
    assert not la.decide_gpu(cfg(container={"gpu": "never"}), None, {"SLURM_JOB_GPUS": "1"})


def test_container_env_containall_forwards_by_environment():
    env = {"JUPYTERHUB_API_TOKEN": SECRET, "NODE_AGENT_SECRET": "x", "PATH": "/bin", "OTHER": "o"}
    c = cfg(container={"contain": "containall"})
    out = la.container_env(c, env)
    assert out["APPTAINERENV_JUPYTERHUB_API_TOKEN"] == SECRET
    assert out["APPTAINERENV_NODE_AGENT_SECRET"] == "x"
    assert "APPTAINERENV_PATH" not in out and "APPTAINERENV_OTHER" not in out
    assert la.container_env(cfg(), env) == env  # --contain --pid keeps the environment


# ---- WebDAV ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://dav.example.org/x", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https:///nohost", "host"),
        ("https://user:pw@dav.example.org/", "credentials"),
        ("https://dav.example.org/a b", "whitespace"),
        ("https://dav.example.org/\nx", "whitespace"),
        ("https://-oProxyCommand=x/", "host"),
        ("https://dav.example.org:99999/", "malformed"),
        ("--help", "scheme"),
        ("", "empty"),
    ],
)
def test_webdav_url_validation(url, reason):
    with pytest.raises(ValueError, match=reason):
        hc.validate_webdav_url(url)


def test_webdav_argv_template_keeps_url_one_element():
    c = cfg(
        storage={"scratch_dir": "/s"},
        webdav={
            "enabled": True,
            "mount_command": ["rclone", "mount", "--webdav-url={url}", ":webdav:", "{mount_point}"],
        },
    )
    url = "https://dav.example.org/x;$(touch${IFS}/tmp/pwned)`id`|&'\"{mount_point}"
    argv = la.build_webdav_argv(c, c.user_paths("alice"), url)
    assert argv == ["rclone", "mount", "--webdav-url=" + url, ":webdav:", "/s/homes/alice/WebDAV"]


FAKE_MOUNT = r"""#!/usr/bin/env python3
import json, os, sys
json.dump({"argv": sys.argv[1:], "pass": os.environ.get("DAV_PASS"),
           "user": os.environ.get("DAV_USER")}, open(os.environ["FAKE_MOUNT_OUT"], "w"))
"""


def test_webdav_mount_in_real_launch(tmp_path):
    fake = tmp_path / "fake-mount"
    fake.write_text(FAKE_MOUNT)
    fake.chmod(0o755)
    out = tmp_path / "mount.json"
    pwned = tmp_path / "pwned"
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [container]
        enabled = false
        inner_command = []
        [webdav]
        enabled = true
        required = true
        mount_command = ["{fake}", "--url", "{{url}}", "{{mount_point}}"]
        credential_env = {{ DAV_PASS = "NODE_AGENT_WEBDAV_PASSWORD", DAV_USER = "NODE_AGENT_WEBDAV_USER" }}
    """,
    )
    url = f"https://dav.example.org/remote.php;touch${{IFS}}{pwned};$(touch${{IFS}}{pwned})&&`id`"
    r = run_launch(
        ["--config", str(conf), "--", "true"],
        {
            "JUPYTERHUB_USER": "alice",
            "NODE_AGENT_WEBDAV_URL": url,
            "FAKE_MOUNT_OUT": str(out),
            "NODE_AGENT_WEBDAV_PASSWORD": SECRET,
            "NODE_AGENT_WEBDAV_USER": "alice",
        },
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["argv"] == ["--url", url, f"{tmp_path}/scratch/homes/alice/WebDAV"]
    assert got["pass"] == SECRET and got["user"] == "alice"
    assert SECRET not in json.dumps(got["argv"])
    assert not pwned.exists()
    assert SECRET not in r.stderr


def test_webdav_bad_url_refused(tmp_path):
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}"
        [container]
        enabled = false
        [webdav]
        enabled = true
        mount_command = ["/bin/true", "{{url}}", "{{mount_point}}"]
    """,
    )
    r = run_launch(
        ["--config", str(conf), "--", "true"],
        {"JUPYTERHUB_USER": "alice", "NODE_AGENT_WEBDAV_URL": "file:///etc/shadow"},
    )
    assert r.returncode == la.EX_USAGE
    assert "webdav: refusing URL from $NODE_AGENT_WEBDAV_URL" in r.stderr


def test_webdav_optional_mount_failure_continues(tmp_path):
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}"
        [container]
        enabled = false
        inner_command = []
        [webdav]
        enabled = true
        url = "https://dav.example.org/"
        mount_command = ["/bin/false", "{{url}}", "{{mount_point}}"]
    """,
    )
    r = run_launch(["--config", str(conf), "--", "sh", "-c", "echo ran"], {"JUPYTERHUB_USER": "alice"})
    assert r.returncode == 0 and r.stdout.strip() == "ran"
    assert "continuing without the share" in r.stderr


# ---- main(): maintenance, config errors, user names, real no-container runs ----------------


def maintenance_conf(tmp_path):
    return write_config(
        tmp_path / "hpc.toml",
        f"""
        [maintenance]
        enabled = true
        message = "Down for upgrades until 14:00."
        allowed_users = ["admin", "ops-*"]
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [container]
        image = "/img/cpu.sif"
    """,
    )


def test_maintenance_exits_at_once_with_message(tmp_path):
    conf = maintenance_conf(tmp_path)
    t0 = time.monotonic()
    r = run_launch(["--config", str(conf), "--", "jupyterhub-singleuser"], {"JUPYTERHUB_USER": "alice"})
    assert r.returncode == la.EX_MAINTENANCE == 75
    assert r.stderr.splitlines()[0] == "NODE-AGENT-MAINTENANCE: Down for upgrades until 14:00."
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "scratch").exists(), "maintenance must not touch any file"


@pytest.mark.parametrize("user", ["admin", "ops-bob"])
def test_maintenance_allow_list(tmp_path, user):
    conf = maintenance_conf(tmp_path)
    r = run_launch(["--config", str(conf), "--dry-run", "--", "x"], {"JUPYTERHUB_USER": user})
    assert r.returncode == 0, r.stderr
    assert "MAINTENANCE" not in r.stderr
    assert json.loads(r.stdout)["argv"][-1] == "x"


def test_config_error_exit_78(tmp_path):
    conf = write_config(
        tmp_path / "hpc.toml",
        """
        [overlay]
        size = "big"
    """,
    )
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "alice"})
    assert r.returncode == la.EX_CONFIG
    assert "overlay.size: must be like '2G' or '512M', got 'big'" in r.stderr


def test_no_config_found(tmp_path):
    r = run_launch(["--", "x"], {"JUPYTERHUB_USER": "a", "HOME": str(tmp_path)})
    assert r.returncode == la.EX_CONFIG and "no HPC config found" in r.stderr


def test_config_from_env_variable(tmp_path):
    conf = write_config(tmp_path / "hpc.toml", '[container]\nimage = "/i.sif"\n')
    r = run_launch(["--dry-run", "--", "x"], {"JUPYTERHUB_USER": "a", "NODE_AGENT_HPC_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr


def test_missing_command_is_usage_error(tmp_path):
    r = run_launch([], {"JUPYTERHUB_USER": "a"})
    assert r.returncode == la.EX_USAGE


@pytest.mark.parametrize("user", ["", "../../etc", "a/b", ".."])
def test_bad_user_refused(tmp_path, user):
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [container]
        enabled = false
    """,
    )
    r = run_launch(["--config", str(conf), "--", "true"], {"JUPYTERHUB_USER": user})
    assert r.returncode == la.EX_NOUSER, r.stderr
    assert "refusing $JUPYTERHUB_USER" in r.stderr
    assert not (tmp_path / "scratch").exists()


def no_container_conf(tmp_path, extra=""):
    return write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [container]
        enabled = false
        inner_command = []
        [logging]
        debug = true
    """
        + textwrap.dedent(extra),
    )


def test_no_container_run_env_home_and_logs(tmp_path):
    conf = no_container_conf(tmp_path)
    r = run_launch(
        ["--config", str(conf), "--", "sh", "-c", 'echo "$HOME|$JUPYTERHUB_API_TOKEN|$(pwd)"; echo data > "$HOME/f"'],
        {"JUPYTERHUB_USER": "Ann Lee", "JUPYTERHUB_API_TOKEN": SECRET, "NODE_AGENT_SECRET": SECRET},
    )
    assert r.returncode == 0, r.stderr
    home = tmp_path / "scratch" / "homes" / "Ann_20Lee"
    assert r.stdout.strip() == f"{home}|{SECRET}|{home}"
    assert (home / "f").read_text() == "data\n"
    assert (home.stat().st_mode & 0o777) == 0o700
    logs = list((tmp_path / "scratch" / "log").iterdir())
    assert [p.name for p in logs] == [f"node-agent-{datetime.date.today():%Y-%m-%d}.log"]
    text = logs[0].read_text()
    assert "no-container mode" in text and "user=Ann_20Lee" in text
    assert SECRET not in text and SECRET not in r.stderr


def test_exec_failure_reported(tmp_path):
    conf = no_container_conf(tmp_path)
    r = run_launch(["--config", str(conf), "--", "/nonexistent/prog"], {"JUPYTERHUB_USER": "a"})
    assert r.returncode == 127 and "cannot execute /nonexistent/prog" in r.stderr


def test_runtime_missing_names_option(tmp_path):
    img = tmp_path / "x.sif"
    img.write_text("")
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        enabled = false
        [container]
        runtime = "no-such-runtime-xyz"
        image = "{img}"
    """,
    )
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "a"})
    assert r.returncode == la.EX_UNAVAILABLE
    assert "container.runtime: 'no-such-runtime-xyz' not found on PATH" in r.stderr


def test_image_missing_names_option(tmp_path):
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        enabled = false
        [container]
        runtime = "/bin/true"
        image = "{tmp_path}/missing.sif"
    """,
    )
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "a"})
    assert r.returncode == la.EX_UNAVAILABLE
    assert f"container.image: image {tmp_path}/missing.sif does not exist" in r.stderr


def test_load_command_changes_path(tmp_path):
    bindir = tmp_path / "modules" / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "fakeruntime"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT"\necho "loaded=$LOADED" >> "$OUT"\n')
    fake.chmod(0o755)
    img = tmp_path / "x.sif"
    img.write_text("")
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        enabled = false
        [container]
        runtime = "fakeruntime"
        load_command = "echo noise; export PATH={bindir}:$PATH LOADED=yes"
        load_shell = ["/bin/sh", "-c"]
        image = "{img}"
    """,
    )
    out = tmp_path / "out"
    r = run_launch(["--config", str(conf), "--", "cmd", "a b"], {"JUPYTERHUB_USER": "a", "OUT": str(out)})
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "exec" and lines[-3:] == ["cmd", "a b", "loaded=yes"]


def test_load_command_failure(tmp_path):
    img = tmp_path / "x.sif"
    img.write_text("")
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        enabled = false
        [container]
        load_command = "echo 'module: apptainer not found' >&2; exit 3"
        load_shell = ["/bin/sh", "-c"]
        image = "{img}"
    """,
    )
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "a"})
    assert r.returncode == la.EX_UNAVAILABLE
    assert "container.load_command failed (exit 3): module: apptainer not found" in r.stderr


def _overlay_conf(tmp_path: Path, user: str = "alice") -> tuple[Path, Path]:
    """An HPC config with a 16M overlay under ``<tmp>/scratch`` and /bin/echo as the runtime;
    returns (config, *user*'s overlay path), the overlay's directory made."""
    img = tmp_path / "x.sif"
    img.write_text("")
    conf = write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        size = "16M"
        [container]
        runtime = "/bin/echo"
        image = "{img}"
    """,
    )
    ovl = tmp_path / "scratch" / "overlays" / f"{user}.img"
    ovl.parent.mkdir(parents=True)
    return conf, ovl


def test_corrupt_overlay_stops_launch(tmp_path):
    conf, ovl = _overlay_conf(tmp_path)
    ovl.write_bytes(b"\0" * 65536)
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "alice"})
    assert r.returncode == la.EX_CANTCREAT
    assert f"overlay {ovl} is corrupt or incomplete" in r.stderr and "mv " in r.stderr


def test_unusable_overlay_lock_stops_launch_with_a_clear_error(tmp_path):
    """An overlay whose in-use lock cannot be opened (here a directory in its place; on a site,
    a lock file of another account on a shared scratch) ends launch with one line naming the
    overlay and the option, not a traceback."""
    conf, ovl = _overlay_conf(tmp_path)
    Path(str(ovl) + ".inuse").mkdir()
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "alice"})
    assert r.returncode == la.EX_CANTCREAT, r.stderr
    assert f"overlay {ovl} cannot be used by this account: Is a directory ({ovl}.inuse)" in r.stderr, r.stderr
    assert "overlay.location" in r.stderr and "Traceback" not in r.stderr


def test_overlay_created_and_busy_falls_back_to_readonly(tmp_path):
    """With /bin/echo as the 'runtime' the argv is printed; the in-use lock held by a first
    job makes a second launch use the overlay read-only."""
    conf, ovl = _overlay_conf(tmp_path, "bob")
    r = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "bob"})
    assert r.returncode == 0, r.stderr
    assert f"--overlay {ovl} " in r.stdout
    from node_agent.overlay import InUseLock

    lock = InUseLock(str(ovl))
    assert lock.try_acquire()
    try:
        r2 = run_launch(["--config", str(conf), "--", "x"], {"JUPYTERHUB_USER": "bob"})
    finally:
        lock.release()
    assert r2.returncode == 0, r2.stderr
    assert f"--overlay {ovl}:ro " in r2.stdout and "read-only" in r2.stderr


# ---- real Apptainer ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory):
    ensure_apptainer()
    out = tmp_path_factory.mktemp("tiny") / "tiny.sif"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(REPO / "singularity" / "tiny" / "build.py"), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.fail(f"tiny image build failed: {r.stderr[-2000:]}")
    print(f"tiny image built in {time.monotonic() - t0:.1f}s: {r.stdout.strip()}")
    return out


def apptainer_conf(tmp_path, image, contain="contain-pid"):
    return write_config(
        tmp_path / "hpc.toml",
        f"""
        [storage]
        scratch_dir = "{tmp_path}/scratch"
        [overlay]
        size = "64M"
        [container]
        image = "{image}"
        contain = "{contain}"
        inner_command = []
    """,
    )


SCRIPT = (
    'echo "$1" >> "$HOME/home-file"; echo "$1" >> /opt/overlay-file; '
    'echo "home=$HOME token=${JUPYTERHUB_API_TOKEN:+set}"; cat "$HOME/home-file" /opt/overlay-file'
)


@pytest.mark.apptainer
@pytest.mark.parametrize("contain", ["contain-pid", "containall"])
def test_apptainer_home_and_overlay_persist(tmp_path, tiny_image, contain):
    conf = apptainer_conf(tmp_path, tiny_image, contain)
    env = {"JUPYTERHUB_USER": "carol", "JUPYTERHUB_API_TOKEN": SECRET}
    r1 = run_launch(["--config", str(conf), "--", "sh", "-c", SCRIPT, "sh", "run1"], env, timeout=120)
    assert r1.returncode == 0, r1.stderr
    r2 = run_launch(["--config", str(conf), "--", "sh", "-c", SCRIPT, "sh", "run2"], env, timeout=120)
    assert r2.returncode == 0, r2.stderr
    lines = r2.stdout.strip().splitlines()
    assert lines == ["home=/home/jovyan token=set", "run1", "run2", "run1", "run2"]
    home = tmp_path / "scratch" / "homes" / "carol"
    assert (home / "home-file").read_text() == "run1\nrun2\n"
    assert (tmp_path / "scratch" / "overlays" / "carol.img").is_file()
    log = next((tmp_path / "scratch" / "log").iterdir()).read_text()
    assert "starting apptainer" in log and SECRET not in log


@pytest.mark.apptainer
def test_apptainer_concurrent_jobs_one_overlay(tmp_path, tiny_image):
    """Two jobs of one user at once: one overlay; the second job sees it read-only."""
    conf = apptainer_conf(tmp_path, tiny_image)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTERHUB_USER": "dave"}
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node_agent.launch",
            "--config",
            str(conf),
            "--",
            "sh",
            "-c",
            "echo first > /opt/f; touch $HOME/started; sleep 5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    home = tmp_path / "scratch" / "homes" / "dave"
    deadline = time.monotonic() + 60
    while not (home / "started").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r2 = run_launch(
        [
            "--config",
            str(conf),
            "--",
            "sh",
            "-c",
            "cat /opt/f 2>/dev/null || echo nofile; echo second > /opt/g && echo wrote",
        ],
        {"JUPYTERHUB_USER": "dave"},
        timeout=120,
    )
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert r2.returncode != 0 or "wrote" not in r2.stdout, "second job must not write the overlay"
    assert "read-only" in r2.stderr
    ovdir = tmp_path / "scratch" / "overlays"
    assert sorted(p.name for p in ovdir.iterdir()) == ["dave.img", "dave.img.inuse", "dave.img.lock"]
