"""WebDAV through ``node-agent launch``.

1. The mount command built from the argv template (``webdav.mount_command``, no shell) with
   hostile input: URLs full of shell metacharacters stay exactly one argv element; invalid URLs
   are refused (exit 64) and the mount program is never run.
2. A REAL mount, when this machine can do it (davfs2 from apt, /dev/fuse or the kernel's coda
   fallback, root): a local WebDAV server (wsgidav + cheroot from PyPI, pip-installed with
   ``--target`` into a per-session directory, ~10 s) on 127.0.0.1, mounted with
   ``mount.davfs`` by launch's WebDAV step; the job reads a file from the share and writes one
   back (it lands in the server's directory). The second variant runs the job in a real
   Apptainer container, where the share appears at ``webdav.container_mount_point``.
   Skipped, with the reason, when davfs2 cannot be installed or the mount fails.

davfs2 reads credentials from a secrets file (``/etc/davfs2/secrets``, ``~/.davfs2/secrets``, or
the ``secrets`` line of the file given with ``-o conf=FILE``), not from the environment, so
``webdav.credential_env`` cannot feed it. Without credentials it prompts on stdin - and with
stdin closed (launch runs the mount command with stdin = /dev/null) mount.davfs 1.6.1 *aborts*
(SIGABRT, exit -6, seen here). So the davfs template must pass ``-o conf=FILE`` with
``ask_auth 0`` in that file; the test server is anonymous. For shares with passwords use rclone (``RCLONE_WEBDAV_USER`` /
``RCLONE_WEBDAV_PASS`` via ``credential_env``, as in examples/hpc-config.toml).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hub_plugin.demo import free_port, wait_http
from node_agent import hpc_config as hc
from node_agent import launch as la

REPO = Path(__file__).resolve().parent.parent

HOSTILE_OK = [
    "https://dav.example.org/remote.php/webdav/;$(touch${IFS}/tmp/pwned)`id`|&'\"",
    "https://dav.example.org/a%20b/{mount_point}/{url}",
    "http://127.0.0.1:8080/-o/allow_other",
    "https://dav.example.org/$HOME/*?x=1&y=$(id)#frag",
]
HOSTILE_BAD = [
    ("-o allow_other", "whitespace"),
    ("--help", "scheme"),
    ("https://dav.example.org/a b", "whitespace"),
    ("https://dav.example.org/\n-o", "whitespace"),
    ("file:///etc/shadow", "scheme"),
    ("https://user:pw@dav.example.org/", "credentials"),
    ("https://-oallow_other/", "host"),
    ("https://dav.example.org;id/", "host"),
    ("https://dav.example.org:1x/", "malformed"),
    ("ssh://dav.example.org/", "scheme"),
]
DAVFS_TEMPLATE = ["/usr/sbin/mount.davfs", "{url}", "{mount_point}", "-o", "username=anonymous"]


def _cfg(tmp_path, template=DAVFS_TEMPLATE, **extra):
    return hc.config_from_dict({
        "storage": {"scratch_dir": str(tmp_path / "scratch")},
        "container": {"enabled": False, "inner_command": []},
        "webdav": {"enabled": True, "mount_command": list(template), **extra},
    })


@pytest.mark.parametrize("url", HOSTILE_OK)
def test_hostile_url_is_one_argv_element(tmp_path, url):
    c = _cfg(tmp_path)
    argv = la.build_webdav_argv(c, c.user_paths("alice"), url)
    assert argv == ["/usr/sbin/mount.davfs", url, f"{tmp_path}/scratch/homes/alice/WebDAV",
                    "-o", "username=anonymous"]
    # placeholders inside the value are not expanded again
    assert argv[1] == url


def test_hostile_user_name_in_mount_point(tmp_path):
    c = _cfg(tmp_path)
    argv = la.build_webdav_argv(c, c.user_paths("-o x;$(id)"), "https://dav.example.org/")
    assert argv[2] == f"{tmp_path}/scratch/homes/_2do_20x_3b_24_28id_29/WebDAV"


@pytest.mark.parametrize("url, reason", HOSTILE_BAD)
def test_invalid_url_rejected(tmp_path, url, reason):
    c = _cfg(tmp_path)
    with pytest.raises(ValueError, match=reason):
        la.build_webdav_argv(c, c.user_paths("alice"), url)


RECORDER = "#!/bin/sh\necho \"$@\" >> \"$0.calls\"\n"


def _launch(conf: Path, env_extra: dict, cmd: list[str], timeout=90):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_AGENT", "JUPYTERHUB"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "node_agent.launch", "--config", str(conf), "--",
                           *cmd], env=env, capture_output=True, text=True, timeout=timeout)


def _write_conf(path: Path, scratch: Path, template: list[str], container: str = "",
                url: str = "", required: bool = True) -> Path:
    tmpl = json.dumps(template)
    path.write_text(textwrap.dedent(f"""
        [storage]
        scratch_dir = "{scratch}"
        [overlay]
        enabled = false
        [container]
        {container or 'enabled = false'}
        inner_command = []
        [webdav]
        enabled = true
        required = {'true' if required else 'false'}
        url = "{url}"
        mount_command = {tmpl}
        container_mount_point = "/home/jovyan/WebDAV"
        timeout = 30
    """))
    return path


@pytest.mark.parametrize("url, _reason", HOSTILE_BAD[:6])
def test_launch_refuses_bad_url_without_running_the_mount(tmp_path, url, _reason):
    rec = tmp_path / "mount-recorder"
    rec.write_text(RECORDER)
    rec.chmod(0o755)
    conf = _write_conf(tmp_path / "hpc.toml", tmp_path / "scratch", [str(rec), "{url}", "{mount_point}"])
    r = _launch(conf, {"JUPYTERHUB_USER": "alice", "NODE_AGENT_WEBDAV_URL": url},
                ["sh", "-c", "echo should-not-run"])
    assert r.returncode == la.EX_USAGE, r.stderr
    assert "webdav: refusing URL from $NODE_AGENT_WEBDAV_URL" in r.stderr
    assert "should-not-run" not in r.stdout
    assert not Path(str(rec) + ".calls").exists()


def test_launch_passes_hostile_url_as_one_argument(tmp_path):
    rec = tmp_path / "mount-recorder"
    rec.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                   "json.dump(sys.argv[1:], open(sys.argv[0] + '.json', 'w'))\n")
    rec.chmod(0o755)
    pwned = tmp_path / "pwned"
    url = f"https://dav.example.org/x;touch${{IFS}}{pwned};$(touch${{IFS}}{pwned})`touch${{IFS}}{pwned}`"
    conf = _write_conf(tmp_path / "hpc.toml", tmp_path / "scratch", [str(rec), "{url}", "{mount_point}"])
    r = _launch(conf, {"JUPYTERHUB_USER": "alice", "NODE_AGENT_WEBDAV_URL": url}, ["true"])
    assert r.returncode == 0, r.stderr
    assert json.loads(Path(str(rec) + ".json").read_text()) == [
        url, f"{tmp_path}/scratch/homes/alice/WebDAV"]
    assert not pwned.exists()


# ---- a real davfs2 mount of a local wsgidav server ------------------------------------------

def _ensure_davfs() -> str:
    if shutil.which("mount.davfs", path="/usr/sbin:/sbin:/usr/bin") is None and os.geteuid() == 0:
        t0 = time.monotonic()
        r = subprocess.run(["apt-get", "install", "-y", "-q", "davfs2"], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        print(f"apt-get install davfs2: exit {r.returncode} in {time.monotonic() - t0:.1f}s")
    path = shutil.which("mount.davfs", path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        pytest.skip("davfs2 is not installed and could not be installed with apt-get")
    if os.geteuid() != 0:
        pytest.skip("mounting davfs as non-root needs an fstab entry; this test mounts as root")
    return path


@pytest.fixture(scope="module")
def dav_server(tmp_path_factory):
    davfs = _ensure_davfs()
    conf = tmp_path_factory.mktemp("davfs-conf") / "davfs2.conf"
    conf.write_text("ask_auth 0\nuse_locks 0\n")  # never prompt (stdin is /dev/null)
    pkgs = tmp_path_factory.mktemp("wsgidav-pkgs")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "--target", str(pkgs), "wsgidav", "cheroot"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"pip install wsgidav cheroot failed: {r.stderr.strip()[-300:]}")
    print(f"wsgidav installed in {time.monotonic() - t0:.1f}s")
    root = tmp_path_factory.mktemp("dav-root")
    (root / "hello.txt").write_text("hello from the share\n")
    port = free_port()
    log = open(root.parent / "wsgidav.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "wsgidav.server.server_cli", "--host", "127.0.0.1",
                             "--port", str(port), "--root", str(root), "--auth", "anonymous",
                             "--server", "cheroot"],
                            env=dict(os.environ, PYTHONPATH=str(pkgs)), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/hello.txt", 30, proc, "wsgidav")
        yield {"url": f"http://127.0.0.1:{port}/", "root": root, "davfs": davfs,
               "template": [davfs, "{url}", "{mount_point}", "-o", f"conf={conf}"]}
    finally:
        proc.terminate()
        proc.wait(10)


def _umount(mp: Path) -> None:
    if os.path.ismount(mp):
        subprocess.run(["umount", str(mp)], capture_output=True, timeout=60)


def test_real_davfs_mount_through_launch(tmp_path, dav_server):
    scratch = tmp_path / "scratch"
    conf = _write_conf(tmp_path / "hpc.toml", scratch,
                       dav_server["template"],
                       url=dav_server["url"])
    mp = scratch / "homes" / "alice" / "WebDAV"
    t0 = time.monotonic()
    try:
        r = _launch(conf, {"JUPYTERHUB_USER": "alice"},
                    ["sh", "-c", "cat \"$HOME/WebDAV/hello.txt\" && "
                                 "echo written-by-the-job > \"$HOME/WebDAV/from-job.txt\""])
        elapsed = time.monotonic() - t0
        if r.returncode != 0 and "mount command failed" in r.stderr:
            pytest.skip(f"davfs2 cannot mount here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr
        assert "hello from the share" in r.stdout
        assert "webdav: mounted on" in r.stderr
        assert os.path.ismount(mp)  # the share stays mounted for the job's life
    finally:
        _umount(mp)  # davfs writes back its cache on unmount
    assert (dav_server["root"] / "from-job.txt").read_text() == "written-by-the-job\n"
    print(f"launch with a real davfs mount: {elapsed:.1f}s")


@pytest.mark.apptainer
def test_real_davfs_mount_bound_into_container(tmp_path, dav_server):
    from test_e2e_apptainer import build_image, ensure_apptainer

    ensure_apptainer()
    image = build_image(tmp_path / "image" / "img.sif")
    scratch = tmp_path / "scratch"
    conf = _write_conf(tmp_path / "hpc.toml", scratch,
                       dav_server["template"],
                       container=f'enabled = true\nimage = "{image}"\ncontain = "contain-pid"',
                       url=dav_server["url"])
    mp = scratch / "homes" / "bob" / "WebDAV"
    try:
        r = _launch(conf, {"JUPYTERHUB_USER": "bob"},
                    ["/bin/sh", "-c", "test -f /etc/tiny-image && cat /home/jovyan/WebDAV/hello.txt"
                                      " && echo from-container > /home/jovyan/WebDAV/c.txt"])
        if r.returncode != 0 and "mount command failed" in r.stderr:
            pytest.skip(f"davfs2 cannot mount here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr
        assert "hello from the share" in r.stdout
    finally:
        _umount(mp)
    assert (dav_server["root"] / "c.txt").read_text() == "from-container\n"
