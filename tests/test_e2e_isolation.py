"""Two users' notebooks on one node under ONE account, each in its own REAL Apptainer container:
the container is the only wall between them, and it holds.

Set-up: hub + CHP + broker (the demo ``Stack``, whose local batch system runs every job as the
test's own account — one uid for all users, as with a shared service account) and
``node-agent launch`` with an HPC config in service-account mode (``isolation.shared_account``
defaults to true; ``contain = "contain-pid"``), on the tiny CI image that
tests/apptainer_image.py builds (it also installs Apptainer). Users
anna (A) and bert (B) have servers running at the same time. A's kernel writes a secret file
into its home (the secret plus A's hub API token, as a user might save a token) and reports its
hub API token and the path of its server's unix socket. Then code in B's kernel — B's notebook,
inside B's container — tries:

* to list A's processes (every ``/proc/<pid>``: whose ``JUPYTERHUB_USER`` is anna?);
* to read A's environment: A's hub API token in any ``/proc/*/environ`` or ``/proc/*/cmdline``,
  and in any file B can read (a walk of B's whole file tree: everything except ``/proc``,
  ``/sys``, ``/dev`` (but ``/dev/shm`` is walked) and the read-only Python trees bound from the
  host, which no job can write);
* to connect to A's server socket (at A's path, and any other ``server.sock`` B can find);
* to read A's home (A's secret file at its host path, and the walk above).

The same probe then runs with the wall taken down — ``contain = "none"`` with
``isolation.allow_weak = true``, still one uid — and there B *does* see A's processes, reads A's
token from ``/proc/<pid>/environ``, connects to A's socket and reads A's home. So each
assertion of the first half can fail, and what makes it pass is the container.

A's token and secret reach B's probe hex-encoded, so their bytes never appear in any file or
command line because of the test itself.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from apptainer_image import PKG_ROOT, build_image, ensure_apptainer, python_binds
from e2e import Hub
from harness import running_stack, tool_path

pytestmark = [pytest.mark.e2e, pytest.mark.apptainer, pytest.mark.timeout(900)]

A, B = "anna", "bert"

HPC_CONFIG = """
[storage]
scratch_dir = "{scratch}"

[logging]
enabled = true

[overlay]
enabled = false

[container]
enabled = true
runtime = "{runtime}"
image = "{image}"
contain = "{contain}"
home = "/home/jovyan"
binds = {binds}
extra_args = ["--env", "PATH={bindir}:/usr/local/bin:/usr/bin:/bin"]
inner_command = ["{bindir}/node-agent", "run"]
{isolation}
"""

WEAK = "[isolation]\nallow_weak = true  # the control half: the wall taken down on purpose\n"


def per_job_workdir_runtime(base: Path) -> str:
    """Only when the Python trees live under /tmp (a CI checkout there): Apptainer then needs
    empty mount points for them in the container's /tmp, i.e. a ``--workdir``. One shared
    workdir would give every job the same /tmp (launch refuses that under a shared account),
    so this wrapper, used as ``container.runtime``, makes a fresh one for each container."""
    under = [p for p in (b.split(":")[0] for b in python_binds()) if p.startswith(("/tmp/", "/var/tmp/"))]
    apptainer = shutil.which("apptainer")
    if not under or apptainer is None:
        return apptainer or "apptainer"
    base.mkdir(parents=True, exist_ok=True)
    dirs = " ".join(
        f'"$d/{"tmp" if p.startswith("/tmp/") else "var_tmp"}/'
        f'{p.split("/", 2)[2] if p.startswith("/tmp/") else p.split("/", 3)[3]}"'
        for p in under
    )
    wrapper = base / "apptainer-per-job-workdir"
    wrapper.write_text(
        f"#!/bin/sh\nset -e\nd=$(mktemp -d {base}/job-XXXXXX)\n"
        f"mkdir -p {dirs}\nsub=$1; shift\n"
        f'exec {apptainer} "$sub" --workdir "$d" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(scope="module")
def iso_stack(tmp_path_factory):
    ensure_apptainer()
    work = tmp_path_factory.mktemp("isolation-e2e")
    t0 = time.monotonic()
    image = build_image(work / "image" / "notebook.sif")
    print(f"image built in {time.monotonic() - t0:.1f}s")
    scratch = work / "scratch"
    scratch.mkdir()
    config = work / "hpc-config.toml"
    runtime = per_job_workdir_runtime(work / "workdirs")

    def configure(contain: str, isolation: str = "") -> None:
        binds = "[" + ", ".join(f'"{b}"' for b in python_binds()) + "]"
        config.write_text(
            HPC_CONFIG.format(
                scratch=scratch,
                runtime=runtime,
                image=image,
                contain=contain,
                binds=binds,
                bindir=os.path.dirname(sys.executable),
                isolation=isolation,
            )
        )

    configure("contain-pid")
    with running_stack(
        str(work / "stack"),
        path=tool_path(),
        extra_hub_config=(
            f"c.BrokerSpawnerMixin.agent_command = 'node-agent launch --config {config} --'\n"
            "c.BrokerSpawnerMixin.broker_wait_interval = 0.5\n"
            "c.Spawner.notebook_dir = '/home/jovyan'\n"
            # the jobs (launch on the host, the agent in the container) import the checkout under
            # test, which is bound into the container, not only what the venv's install points at
            f"c.Spawner.environment = {{'PYTHONPATH': {PKG_ROOT!r}}}\n"
        ),
    ) as s:
        s.scratch = scratch
        s.configure = configure
        yield s


def evaluate(hub: Hub, user: str, code: str) -> dict:
    _, text = hub.run_code(user, code, timeout=240)
    return json.loads(ast.literal_eval(text))


# A's notebook: save a secret (and its token) in its home, report its token and socket path.
A_STEP = r"""
import json, os
secret = bytes.fromhex(SECRET_HEX).decode()
token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
with open(os.path.expanduser("~/secret.txt"), "w") as f:
    f.write(secret + "\n" + token + "\n")

def parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])

sock, pid = None, os.getpid()
for _ in range(6):  # kernel -> jupyterhub-singleuser (--ServerApp.sock=...) -> ...
    pid = parent(pid)
    if pid <= 0:
        break
    for arg in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"):
        if arg.startswith(b"--ServerApp.sock="):
            sock = arg.split(b"=", 1)[1].decode()
    if sock:
        break
json.dumps({"token": token, "sock": sock, "user": os.environ.get("JUPYTERHUB_USER"),
            "pid1": open("/proc/1/cmdline", "rb").read().split(b"\0")[0].decode()})
"""

# B's notebook: every way to reach A that the wall should close.
B_PROBE = r"""
import glob, json, os, socket, stat
token = bytes.fromhex(TOKEN_HEX)
secret = bytes.fromhex(SECRET_HEX)
out = {"me": os.environ.get("JUPYTERHUB_USER"), "procs": [], "token_in_proc": [],
       "found_in_files": [], "walked": 0}

def read(path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as e:
        return type(e).__name__

for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    env, cmd = read(f"/proc/{entry}/environ"), read(f"/proc/{entry}/cmdline")
    owner = "?"
    if isinstance(env, bytes):
        for item in env.split(b"\0"):
            if item.startswith(b"JUPYTERHUB_USER="):
                owner = item.split(b"=", 1)[1].decode()
    out["procs"].append([int(entry), owner, cmd[:60].decode(errors="replace")
                         if isinstance(cmd, bytes) else cmd])
    for name, blob in (("environ", env), ("cmdline", cmd)):
        if isinstance(blob, bytes) and token and token in blob:
            out["token_in_proc"].append(f"/proc/{entry}/{name}")

def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        return "connected"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()

out["a_sock"] = connect(A_SOCK)
out["my_sock"] = MY_SOCK
out["socks"] = {p: connect(p) for p in (glob.glob(SOCK_GLOB, recursive=True) if SOCK_GLOB else [])}
out["a_home"] = read(os.path.join(A_HOME, "secret.txt"))
if isinstance(out["a_home"], bytes):
    out["a_home"] = "read:" + ("has-secret" if secret in out["a_home"] else "no-secret")

for root in WALK_ROOTS:
    for dirpath, dirnames, filenames in os.walk(root):
        if root == "/":
            dirnames[:] = [d for d in dirnames
                           if os.path.join(dirpath, d) not in SKIP]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size > (32 << 20):
                continue
            data = read(path, 32 << 20)
            if not isinstance(data, bytes):
                continue
            out["walked"] += 1
            if token in data or secret in data:
                out["found_in_files"].append(path)
json.dumps(out)
"""

SKIP_IN_WALK = ["/proc", "/sys", "/dev/pts", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/tty"]


def run_pair(stack, hub: Hub, walk_roots: list[str], sock_glob: str) -> tuple[dict, dict, dict]:
    """Spawn A and B, let A save its secret, run B's probe; returns (A's report, B's own
    report, B's probe). ``sock_glob``: where B looks for server sockets besides A's own path
    (empty: only there — without the wall, /tmp is the host's, with other tests' sockets)."""
    for user in (A, B):
        hub.spawn(user, timeout=240)
    secret = "home-secret-" + secrets.token_hex(16)
    a = evaluate(hub, A, f"SECRET_HEX = {secret.encode().hex()!r}\n" + A_STEP)
    assert a["user"] == A and a["token"] and a["sock"], a
    b_self = evaluate(hub, B, f"SECRET_HEX = {b'x'.hex()!r}\n" + A_STEP)
    assert b_self["user"] == B and b_self["sock"], b_self
    assert b_self["token"] != a["token"]
    a_home = str(Path(stack.scratch) / "homes" / A)
    assert (Path(a_home) / "secret.txt").read_text() == f"{secret}\n{a['token']}\n"
    skip = SKIP_IN_WALK + [b.split(":")[0] for b in python_binds()]
    code = (
        f"TOKEN_HEX = {a['token'].encode().hex()!r}\nSECRET_HEX = {secret.encode().hex()!r}\n"
        f"A_SOCK = {a['sock']!r}\nMY_SOCK = {b_self['sock']!r}\nA_HOME = {a_home!r}\n"
        f"WALK_ROOTS = {walk_roots!r}\nSKIP = {skip!r}\nSOCK_GLOB = {sock_glob!r}\n" + B_PROBE
    )
    return a, b_self, evaluate(hub, B, code)


def anna_procs(probe: dict) -> list:
    return [p for p in probe["procs"] if p[1] == A]


def test_shared_account_containers_wall_users_off(iso_stack):
    hub = Hub(iso_stack)
    t0 = time.monotonic()

    # --- the wall: contain-pid under a shared account (the default) ---------------------------
    a, b_self, probe = run_pair(iso_stack, hub, ["/"], "/tmp/**/server.sock")
    print("isolated: B sees", probe["procs"], "walked", probe["walked"], "files")
    # the probe works: B sees its own processes and reaches its own socket
    assert probe["me"] == B and any(p[1] == B for p in probe["procs"]), probe["procs"]
    assert probe["socks"].get(b_self["sock"]) == "connected", probe["socks"]
    assert probe["walked"] > 50, probe["walked"]  # it really walked B's file tree
    # ... but nothing of A
    assert anna_procs(probe) == [], probe["procs"]
    assert all(p[1] in (B, "?") for p in probe["procs"]), probe["procs"]
    assert probe["token_in_proc"] == []
    assert probe["a_sock"] == "FileNotFoundError", probe["a_sock"]
    assert set(probe["socks"]) == {b_self["sock"]}, probe["socks"]  # no other server socket
    assert probe["a_home"] == "FileNotFoundError", probe["a_home"]
    assert probe["found_in_files"] == [], probe["found_in_files"]
    assert a["sock"].startswith("/tmp/node-agent-"), a  # the socket dir is in the private /tmp
    for user in (A, B):
        hub.stop(user)
    logs = "".join(p.read_text(errors="replace") for p in (Path(iso_stack.scratch) / "log").iterdir())
    assert "isolation: shared account; own PID namespace and /tmp" in logs

    # --- the control: the same probe with the wall taken down (one uid, no PID namespace) ----
    iso_stack.configure("none", WEAK)
    a2, _, open_probe = run_pair(iso_stack, hub, [str(iso_stack.scratch)], "")
    print(
        "control: B sees",
        len(open_probe["procs"]),
        "processes,",
        len(anna_procs(open_probe)),
        "of anna; token in",
        open_probe["token_in_proc"][:3],
    )
    assert anna_procs(open_probe), open_probe["procs"]
    assert open_probe["token_in_proc"], "A's token should be readable without the wall"
    assert a2["sock"].startswith("/tmp/node-agent-"), a2  # the host's /tmp this time
    assert open_probe["a_sock"] == "connected", open_probe["a_sock"]
    assert open_probe["a_home"] == "read:has-secret", open_probe["a_home"]
    assert any(p.endswith(f"/homes/{A}/secret.txt") for p in open_probe["found_in_files"]), open_probe["found_in_files"]
    for user in (A, B):
        hub.stop(user)
    logs = "".join(p.read_text(errors="replace") for p in (Path(iso_stack.scratch) / "log").iterdir())
    assert "isolation.allow_weak: starting anyway although container.contain: 'none'" in logs
    print(f"whole test {time.monotonic() - t0:.1f}s")
