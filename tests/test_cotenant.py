"""Co-tenants on a compute node: another Unix user on the same machine gains nothing.

- the notebook server's unix socket (0600, in a 0700 directory) refuses them (permission denied);
- the node-local hub-API port (the agent's relay, on 127.0.0.1) answers them 403: it serves only
  its own user's processes (wire/peercred.py), and the hub would give nothing without the
  server's token anyway (401/403).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys

import pytest

from e2e import Hub
from harness import ARTIFACTS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: the probe runs as the other user: a system Python it can execute (the venv may live in /root)
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
OTHER = f"rlco{os.getpid() % 100000}"

PROBE = r"""
import json, socket, sys, urllib.request, urllib.error
sock_path, relay = sys.argv[1], sys.argv[2]
out = {}
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock_path)
    out["unix"] = "connected"
except OSError as e:
    out["unix"] = type(e).__name__
try:
    import os
    os.listdir(os.path.dirname(sock_path))
    out["listdir"] = "listed"
except OSError as e:
    out["listdir"] = type(e).__name__
for name, path, token in [("whoami", "/hub/api/user", None), ("users", "/hub/api/users", None),
                          ("users_forged_token", "/hub/api/users", "0" * 32),
                          ("proxy", "/hub/api/proxy", None)]:
    req = urllib.request.Request(relay + path)
    if token:
        req.add_header("Authorization", "token " + token)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            out[name] = r.status
    except urllib.error.HTTPError as e:
        out[name] = e.code
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def other_user():
    if os.geteuid() != 0:
        pytest.skip("needs root (useradd)")
    subprocess.run(["userdel", "-r", OTHER], capture_output=True)
    subprocess.run(["useradd", "-m", "-p", "*", OTHER], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(OTHER)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", OTHER], capture_output=True)  # only that user's processes
        subprocess.run(["userdel", "-r", OTHER], capture_output=True)


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py)."""
    return dict(name="cotenant", logs="cotenant-logs", poll_interval=5)


def _server_info(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0")]
    sock = next(a.split("=", 1)[1] for a in argv if a.startswith("--ServerApp.sock="))
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)
    api = env["JUPYTERHUB_API_URL"]
    return sock, api.split("/hub/api")[0]


def test_other_unix_user_gains_nothing(stack, other_user):
    hub = Hub(stack)
    user = "tenant"
    hub.spawn(user)
    session = hub.session_of(user)
    sock, relay = _server_info(hub.server_pid(session["job_id"]))
    assert relay.startswith("http://127.0.0.1:")
    st_dir, st_sock = os.stat(os.path.dirname(sock)), os.stat(sock)
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and stat.S_IMODE(st_sock.st_mode) == 0o600
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PROBE, sock, relay],
        user=other_user.pw_uid,
        group=other_user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": other_user.pw_dir},
    )
    assert probe.returncode == 0, probe.stderr
    out = json.loads(probe.stdout)
    assert out["unix"] == "PermissionError", out
    assert out["listdir"] == "PermissionError", out
    for k in ("whoami", "users", "users_forged_token", "proxy"):
        assert out[k] == 403, out
    # the owner (root here, standing in for the job's user) does get through the socket
    assert hub.through_proxy(user, "api/status")[0] == 200
    os.makedirs(ARTIFACTS, exist_ok=True)
    from reliability import record

    record("co-tenant", **out)
    hub.stop(user)
