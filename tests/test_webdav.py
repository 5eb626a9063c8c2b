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
3. Unmount after the job: when launch made the mount it runs the job as a child, passes
   SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 on, runs ``webdav.unmount_command`` after the child
   exits and exits with the child's status. Checked with the real davfs2 mount (/proc/mounts
   after the job; SIGTERM and SIGUSR1 to launch) and, independent of FUSE, with recording fake
   mount/unmount programs; without a mount made by launch it still execs (same pid).

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
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from devstack.stack import free_port, wait_http
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
    return hc.config_from_dict(
        {
            "storage": {"scratch_dir": str(tmp_path / "scratch")},
            "container": {"enabled": False, "inner_command": []},
            "webdav": {"enabled": True, "mount_command": list(template), **extra},
        }
    )


@pytest.mark.parametrize("url", HOSTILE_OK)
def test_hostile_url_is_one_argv_element(tmp_path, url):
    c = _cfg(tmp_path)
    argv = la.build_webdav_argv(c, c.user_paths("alice"), url)
    assert argv == ["/usr/sbin/mount.davfs", url, f"{tmp_path}/scratch/homes/alice/WebDAV", "-o", "username=anonymous"]
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


RECORDER = '#!/bin/sh\necho "$@" >> "$0.calls"\n'


def _launch(conf: Path, env_extra: dict, cmd: list[str], timeout=90):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_AGENT", "JUPYTERHUB"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "node_agent.launch", "--config", str(conf), "--", *cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write_conf(
    path: Path,
    scratch: Path,
    template: list[str],
    container: str = "",
    url: str = "",
    required: bool = True,
    unmount: list[str] | None = None,
    extra: str = "",
) -> Path:
    tmpl = json.dumps(template)
    umount = "" if unmount is None else f"unmount_command = {json.dumps(unmount)}"
    path.write_text(
        textwrap.dedent(f"""
        [storage]
        scratch_dir = "{scratch}"
        [overlay]
        enabled = false
        [container]
        {container or "enabled = false"}
        inner_command = []
        [webdav]
        enabled = true
        required = {"true" if required else "false"}
        url = "{url}"
        mount_command = {tmpl}
        container_mount_point = "/home/jovyan/WebDAV"
        timeout = 30
        {umount}
        {extra}
    """)
    )
    return path


@pytest.mark.parametrize("url, _reason", HOSTILE_BAD[:6])
def test_launch_refuses_bad_url_without_running_the_mount(tmp_path, url, _reason):
    rec = tmp_path / "mount-recorder"
    rec.write_text(RECORDER)
    rec.chmod(0o755)
    conf = _write_conf(tmp_path / "hpc.toml", tmp_path / "scratch", [str(rec), "{url}", "{mount_point}"])
    r = _launch(conf, {"JUPYTERHUB_USER": "alice", "NODE_AGENT_WEBDAV_URL": url}, ["sh", "-c", "echo should-not-run"])
    assert r.returncode == la.EX_USAGE, r.stderr
    assert "webdav: refusing URL from $NODE_AGENT_WEBDAV_URL" in r.stderr
    assert "should-not-run" not in r.stdout
    assert not Path(str(rec) + ".calls").exists()


def test_launch_passes_hostile_url_as_one_argument(tmp_path):
    rec = tmp_path / "mount-recorder"
    rec.write_text(
        "#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open(sys.argv[0] + '.json', 'w'))\n"
    )
    rec.chmod(0o755)
    pwned = tmp_path / "pwned"
    url = f"https://dav.example.org/x;touch${{IFS}}{pwned};$(touch${{IFS}}{pwned})`touch${{IFS}}{pwned}`"
    conf = _write_conf(tmp_path / "hpc.toml", tmp_path / "scratch", [str(rec), "{url}", "{mount_point}"])
    r = _launch(conf, {"JUPYTERHUB_USER": "alice", "NODE_AGENT_WEBDAV_URL": url}, ["true"])
    assert r.returncode == 0, r.stderr
    assert json.loads(Path(str(rec) + ".json").read_text()) == [url, f"{tmp_path}/scratch/homes/alice/WebDAV"]
    assert not pwned.exists()


# ---- a real davfs2 mount of a local wsgidav server ------------------------------------------


def _ensure_davfs() -> str:
    if shutil.which("mount.davfs", path="/usr/sbin:/sbin:/usr/bin") is None and os.geteuid() == 0:
        t0 = time.monotonic()
        r = subprocess.run(
            ["apt-get", "install", "-y", "-q", "davfs2"],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
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
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(pkgs),
            "wsgidav",
            "cheroot",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        pytest.skip(f"pip install wsgidav cheroot failed: {r.stderr.strip()[-300:]}")
    print(f"wsgidav installed in {time.monotonic() - t0:.1f}s")
    root = tmp_path_factory.mktemp("dav-root")
    (root / "hello.txt").write_text("hello from the share\n")
    port = free_port()
    log = open(root.parent / "wsgidav.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wsgidav.server.server_cli",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--root",
            str(root),
            "--auth",
            "anonymous",
            "--server",
            "cheroot",
        ],
        env=dict(os.environ, PYTHONPATH=str(pkgs)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/hello.txt", 30, proc, "wsgidav")
        yield {
            "url": f"http://127.0.0.1:{port}/",
            "root": root,
            "davfs": davfs,
            "template": [davfs, "{url}", "{mount_point}", "-o", f"conf={conf}"],
        }
    finally:
        proc.terminate()
        proc.wait(10)


def _umount(mp: Path) -> None:
    if os.path.ismount(mp):
        subprocess.run(["umount", str(mp)], capture_output=True, timeout=60)


def _mounted(mp: Path) -> bool:
    """Is ``mp`` in /proc/mounts (the kernel's view, not just a stat comparison)?"""
    target = str(mp).replace(" ", "\\040")
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _davfs_daemons(mp: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "mount.davfs" in ln and str(mp) in ln]


def test_real_davfs_mount_through_launch(tmp_path, dav_server):
    scratch = tmp_path / "scratch"
    conf = _write_conf(tmp_path / "hpc.toml", scratch, dav_server["template"], url=dav_server["url"])
    mp = scratch / "homes" / "alice" / "WebDAV"
    t0 = time.monotonic()
    try:
        # the job sees the share mounted, writes to it, and exits 3
        r = _launch(
            conf,
            {"JUPYTERHUB_USER": "alice"},
            [
                "sh",
                "-c",
                'cat "$HOME/WebDAV/hello.txt" && '
                'echo written-by-the-job > "$HOME/WebDAV/from-job.txt" && '
                f"grep -q ' {mp} ' /proc/mounts && echo mounted-during-job; "
                "exit 3",
            ],
        )
        elapsed = time.monotonic() - t0
        if r.returncode != 0 and "mount command failed" in r.stderr:
            pytest.skip(f"davfs2 cannot mount here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 3, r.stderr  # the job's exit status, passed through
        assert "hello from the share" in r.stdout
        assert "mounted-during-job" in r.stdout
        assert "webdav: mounted on" in r.stderr
        assert "webdav: unmounted" in r.stderr
        assert not _mounted(mp), "the share outlived the job"
        assert not _davfs_daemons(mp), "mount.davfs outlived the job"
    finally:
        _umount(mp)
    # davfs wrote its cache back on unmount, before launch exited
    assert (dav_server["root"] / "from-job.txt").read_text() == "written-by-the-job\n"
    print(f"launch with a real davfs mount: {elapsed:.1f}s")


def _launch_bg(conf: Path, env_extra: dict, cmd: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_AGENT", "JUPYTERHUB"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "node_agent.launch", "--config", str(conf), "--", *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
    )


def _default_signals() -> None:
    """Give the job the default dispositions a batch job gets, whatever this test run inherited
    (a run started with ``&`` or ``nohup`` ignores SIGINT or SIGHUP, and launch — like exec —
    keeps ignored signals ignored)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            return pytest.fail(f"launch exited {proc.returncode} early: {err[-800:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


# The job: note its pid, mark readiness, and wait for signals (trap runs between short sleeps).
WAITER = (
    'echo $$ > "$MARK.pid"; '
    "trap 'echo got-usr1 >> \"$MARK.log\"' USR1; "
    "trap 'echo got-term >> \"$MARK.log\"; exit 7' TERM; "
    'touch "$MARK.ready"; while :; do sleep 0.05; done'
)


def test_real_davfs_sigterm_reaches_job_and_share_is_unmounted(tmp_path, dav_server):
    scratch = tmp_path / "scratch"
    conf = _write_conf(tmp_path / "hpc.toml", scratch, dav_server["template"], url=dav_server["url"])
    mp = scratch / "homes" / "carol" / "WebDAV"
    mark = tmp_path / "mark"
    try:
        p = _launch_bg(
            conf,
            {"JUPYTERHUB_USER": "carol", "MARK": str(mark)},
            ["sh", "-c", 'echo from-job > "$HOME/WebDAV/sig.txt"; ' + WAITER],
        )
        try:
            _wait_for(mark.with_suffix(".ready"), p)
        except pytest.fail.Exception:
            if "mount command failed" in (p.stderr.read() if p.stderr else ""):
                pytest.skip("davfs2 cannot mount here")
            raise
        assert _mounted(mp)
        job_pid = int(mark.with_suffix(".pid").read_text())
        assert job_pid != p.pid  # supervised: the job is a child, launch stays
        p.send_signal(signal.SIGUSR1)  # walltime warning: passed on, the job keeps running
        deadline = time.monotonic() + 10
        while "got-usr1" not in _read(mark.with_suffix(".log")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "got-usr1" in _read(mark.with_suffix(".log"))
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=90)
        assert p.returncode == 7, err  # the job's own exit status after its TERM trap
        assert "got-term" in _read(mark.with_suffix(".log"))
        assert "webdav: unmounted" in err
        assert not _mounted(mp), "the share outlived the job"
        assert not _davfs_daemons(mp)
    finally:
        _umount(mp)
    assert (dav_server["root"] / "sig.txt").read_text() == "from-job\n"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.apptainer
def test_real_davfs_mount_bound_into_container(tmp_path, dav_server):
    from apptainer_image import build_image, ensure_apptainer

    ensure_apptainer()
    image = build_image(tmp_path / "image" / "img.sif")
    scratch = tmp_path / "scratch"
    conf = _write_conf(
        tmp_path / "hpc.toml",
        scratch,
        dav_server["template"],
        container=f'enabled = true\nimage = "{image}"\ncontain = "contain-pid"',
        url=dav_server["url"],
    )
    mp = scratch / "homes" / "bob" / "WebDAV"
    try:
        r = _launch(
            conf,
            {"JUPYTERHUB_USER": "bob"},
            [
                "/bin/sh",
                "-c",
                "test -f /etc/tiny-image && cat /home/jovyan/WebDAV/hello.txt"
                " && echo from-container > /home/jovyan/WebDAV/c.txt",
            ],
        )
        if r.returncode != 0 and "mount command failed" in r.stderr:
            pytest.skip(f"davfs2 cannot mount here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr
        assert "hello from the share" in r.stdout
        assert not _mounted(mp), "the share outlived the container"
    finally:
        _umount(mp)
    assert (dav_server["root"] / "c.txt").read_text() == "from-container\n"


# ---- supervising path with recording fake mount/unmount programs (no FUSE needed) ----------

FAKE_MOUNT = '#!/bin/sh\necho "mount $*" >> "$FAKE_LOG"\n'
FAKE_UMOUNT = (
    '#!/bin/sh\necho "unmount $*" >> "$FAKE_LOG"\n'
    "if [ -n \"$FAKE_UMOUNT_FAIL\" ]; then echo 'umount: target is busy'; exit 32; fi\n"
)
URL = "https://dav.example.org/remote.php/webdav/"


@pytest.fixture
def fake(tmp_path):
    m, u = tmp_path / "fake-mount", tmp_path / "fake-umount"
    m.write_text(FAKE_MOUNT)
    u.write_text(FAKE_UMOUNT)
    m.chmod(0o755)
    u.chmod(0o755)
    log = tmp_path / "calls.log"
    scratch = tmp_path / "scratch"

    def conf(**kw):
        kw.setdefault("unmount", [str(u), "{mount_point}", "--user={user}"])
        return _write_conf(tmp_path / "hpc.toml", scratch, [str(m), "{url}", "{mount_point}"], url=URL, **kw)

    def calls():
        return _read(log).splitlines()

    return dict(
        conf=conf,
        calls=calls,
        env={"JUPYTERHUB_USER": "alice", "FAKE_LOG": str(log)},
        mp=f"{scratch}/homes/alice/WebDAV",
        log=log,
        tmp=tmp_path,
    )


@pytest.mark.parametrize("status", [0, 5, 255])
def test_supervised_unmounts_after_job_and_passes_status(fake, status):
    r = _launch(fake["conf"](), fake["env"], ["sh", "-c", f'echo job >> "$FAKE_LOG"; exit {status}'])
    assert r.returncode == status, r.stderr
    assert fake["calls"]() == [f"mount {URL} {fake['mp']}", "job", f"unmount {fake['mp']} --user=alice"]
    assert "webdav: unmounted" in r.stderr


def test_supervised_job_killed_by_signal_exits_128_plus_n(fake):
    r = _launch(fake["conf"](), fake["env"], ["sh", "-c", 'echo job >> "$FAKE_LOG"; kill -9 $$'])
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert fake["calls"]()[-1] == f"unmount {fake['mp']} --user=alice"


SIGNAL_JOB = textwrap.dedent("""
    import os, signal, sys, time
    mark = os.environ["MARK"]
    def h(n, _f):
        open(mark + ".log", "a").write(signal.Signals(n).name + "\\n")
        if n != signal.SIGUSR1:
            sys.exit(10 + n)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, h)
    open(mark + ".pid", "w").write(str(os.getpid()))
    open(mark + ".ready", "w").close()
    while True:
        time.sleep(0.05)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2])
def test_supervised_forwards_signals(fake, sig):
    mark = fake["tmp"] / "mark"
    p = _launch_bg(fake["conf"](), dict(fake["env"], MARK=str(mark)), [sys.executable, "-c", SIGNAL_JOB])
    _wait_for(mark.with_suffix(".ready"), p)
    assert int(mark.with_suffix(".pid").read_text()) != p.pid
    # SIGUSR1 (Slurm's --signal=B:USR1 walltime warning hits only the batch shell = launch)
    p.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "SIGUSR1" not in _read(mark.with_suffix(".log")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None  # the warning does not stop anything
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert _read(mark.with_suffix(".log")).split() == ["SIGUSR1", sig.name]
    assert p.returncode == 10 + sig, err
    assert fake["calls"]() == [f"mount {URL} {fake['mp']}", f"unmount {fake['mp']} --user=alice"]


def test_supervised_untrapped_sigterm_gives_143_and_unmounts(fake):
    mark = fake["tmp"] / "mark"
    p = _launch_bg(
        fake["conf"](), dict(fake["env"], MARK=str(mark)), ["sh", "-c", 'touch "$MARK.ready"; exec sleep 60']
    )
    _wait_for(mark.with_suffix(".ready"), p)
    time.sleep(0.2)  # let sh exec sleep
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert fake["calls"]()[-1] == f"unmount {fake['mp']} --user=alice"


def test_unmount_failure_is_logged_without_the_environment(fake):
    secret = "s3cr3t-" + "x" * 20
    r = _launch(
        fake["conf"](extra='credential_env = { DAV_PASS = "NODE_AGENT_WEBDAV_PASSWORD" }'),
        dict(fake["env"], FAKE_UMOUNT_FAIL="1", NODE_AGENT_WEBDAV_PASSWORD=secret),
        ["sh", "-c", "exit 4"],
    )
    assert r.returncode == 4, r.stderr  # the job's status, not the unmount's
    assert "webdav: unmount command failed" in r.stderr
    assert "exit 32" in r.stderr and "target is busy" in r.stderr
    assert secret not in r.stderr
    logs = list((fake["tmp"] / "scratch").rglob("*.log"))
    assert logs and all(secret not in f.read_text() for f in logs)
    assert any("unmount command failed" in f.read_text() for f in logs)


def test_default_unmount_command_is_umount(tmp_path):
    c = _cfg(tmp_path)
    assert c.webdav.unmount_command == ["umount", "{mount_point}"]
    assert la.build_unmount_argv(c, c.user_paths("alice")) == ["umount", f"{tmp_path}/scratch/homes/alice/WebDAV"]


# ---- without a mount made by launch nothing changes: launch execs (the job has its pid) ---

PID_JOB = ["sh", "-c", 'echo "job $$" >> "$FAKE_LOG"']


def _job_pid_is_launch_pid(conf, env, fake):
    p = _launch_bg(conf, env, PID_JOB)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    jobs = [ln for ln in fake["calls"]() if ln.startswith("job ")]
    assert jobs == [f"job {p.pid}"], (jobs, p.pid)
    assert not any(ln.startswith("unmount") for ln in fake["calls"]())
    return err


def test_no_url_keeps_exec(fake):
    conf = _write_conf(
        fake["tmp"] / "hpc2.toml",
        fake["tmp"] / "scratch",
        [str(fake["tmp"] / "fake-mount"), "{url}", "{mount_point}"],
        unmount=[str(fake["tmp"] / "fake-umount"), "{mount_point}"],
        required=False,
    )
    _job_pid_is_launch_pid(conf, fake["env"], fake)
    assert fake["calls"]() == [fake["calls"]()[0]] and fake["calls"]()[0].startswith("job ")


def test_empty_unmount_command_keeps_exec(fake):
    _job_pid_is_launch_pid(fake["conf"](unmount=[]), fake["env"], fake)
    assert fake["calls"]()[0] == f"mount {URL} {fake['mp']}"


def test_failed_optional_mount_keeps_exec(fake):
    conf = _write_conf(
        fake["tmp"] / "hpc2.toml",
        fake["tmp"] / "scratch",
        ["/bin/false", "{url}", "{mount_point}"],
        url=URL,
        required=False,
        unmount=[str(fake["tmp"] / "fake-umount"), "{mount_point}"],
    )
    err = _job_pid_is_launch_pid(conf, fake["env"], fake)
    assert "mount command failed" in err


def test_share_mounted_by_someone_else_is_left_alone(fake):
    # /proc is a mount point: launch finds it "already mounted", binds it and must neither
    # supervise nor unmount it
    err = _job_pid_is_launch_pid(fake["conf"](extra='mount_point = "/proc"'), fake["env"], fake)
    assert "is already mounted" in err
    assert not any(ln.startswith("mount ") for ln in fake["calls"]())


def test_run_supervised_exec_failure_still_runs_after(tmp_path):
    called = []
    before = {s: signal.getsignal(s) for s in la.FORWARD_SIGNALS}
    rc = la.run_supervised([str(tmp_path / "no-such-program")], dict(os.environ), lambda: called.append(1))
    assert rc == 127 and called == [1]
    assert {s: signal.getsignal(s) for s in la.FORWARD_SIGNALS} == before  # handlers restored


def test_run_supervised_keeps_ignored_signals_ignored(tmp_path):
    # a job started with SIGHUP ignored (nohup) keeps it ignored, exactly as through exec
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        out = tmp_path / "sigign"
        rc = la.run_supervised(
            [
                sys.executable,
                "-c",
                f"import signal; open({str(out)!r}, 'w').write(str(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN))",
            ],
            dict(os.environ),
            lambda: None,
        )
        assert rc == 0 and out.read_text() == "True"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_exit_status():
    assert [la.exit_status(x) for x in (0, 3, -15, -9)] == [0, 3, 143, 137]
