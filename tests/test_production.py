"""The production kit (examples/production/) run as systemd would run it, on the real
single-node Slurm, submitting through a login node (a real sshd, tests/sshd.py).

Each unit's [Service] section is parsed: ``ExecStart`` is run with the environment of
``EnvironmentFile`` and ``Environment`` in ``WorkingDirectory``, its ``StateDirectory`` created.
The configs are the shipped files. Substituted: paths (/opt, /etc, /var/lib into the test's
directory), addresses (login.cluster.example, hub.cluster.example, 0.0.0.0 -> 127.0.0.1), ports
(free ones) and this machine's account and group names (the sshd login account, the users'
group). Not done as systemd would: ``User=`` (the services run as the test's root; the jobs still
run as the user, through the sudoers rule on the login node), and the hardening options. The
caller's ``PYTHONPATH`` is passed on, so a git worktree tests its own code.

The broker gets a ``NOTIFY_SOCKET`` the test listens on: READY=1 must arrive only once the
broker's REST API answers. ``systemd-analyze verify`` (Debian's systemd, installed by
scripts/install-sysdeps.sh) checks the units; it runs here without systemd as PID 1.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from devstack.stack import free_port, wait_http

from e2e import Hub
from harness import REPO, find_chp, save_stack_logs, terminate, wait_until
from slurm_cluster import Accounts, others_can_reach, others_can_run_python, real_binary, run

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.timeout(900)]

PROD = Path(REPO) / "examples" / "production"
UNITS = {
    "proxy": "configurable-http-proxy.service",
    "broker": "jupyterhub-broker.service",
    "hub": "jupyterhub.service",
}
#: systemd's default PATH for services
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def service_section(text: str) -> dict[str, list[str]]:
    """The [Service] section of a unit: each key's values, in order (comments and blanks skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def read_environment_file(path: str) -> dict[str, str]:
    env = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


class Site:
    """The production files installed under one directory, with their substitutions."""

    def __init__(self, root: Path, sshd, acc: Accounts):
        self.root = root
        self.ports = {p: free_port() for p in (8000, 8001, 8081, 8091, 8022)}
        self.paths = [
            ("/opt/jupyterhub-hpc-broker/node/node_modules/.bin", os.path.dirname(find_chp())),
            ("/opt/jupyterhub-hpc-broker/bin", os.path.dirname(sys.executable)),
            ("/etc/jupyterhub-hpc-broker", str(root / "etc")),
            ("/var/lib/jupyterhub-hpc-broker", str(root / "var")),
            ("/etc/node-agent", str(root / "node-agent")),
        ]
        self.sshd = sshd
        self.acc = acc
        self.tokens = {
            "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(32),
            "BROKER_API_TOKEN": secrets.token_hex(32),
            "JUPYTERHUB_OPS_TOKEN": secrets.token_hex(32),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = root / "logs"

    def sub(self, text: str) -> str:
        for old, new in self.paths:
            text = text.replace(old, new)
        for old, new in (("login.cluster.example", "127.0.0.1"), ("hub.cluster.example", "127.0.0.1")):
            text = text.replace(old, new)
        text = text.replace('"0.0.0.0"', '"127.0.0.1"')
        for old_port, new_port in self.ports.items():
            text = re.sub(rf"(?<![0-9]){old_port}(?![0-9])", str(new_port), text)
        text = text.replace("login_node_port = 22\n", f"login_node_port = {self.sshd.port}\n")
        # this machine's accounts: the login-node account and the users' group
        text = text.replace('login_node_user = "jupyterhub"', f'login_node_user = "{self.acc.service}"')
        return text.replace('{"jupyterhub-users"}', f'{{"{self.acc.group}"}}')

    def install(self) -> None:
        etc = self.root / "etc"
        etc.mkdir(parents=True)
        (self.root / "var").mkdir()
        self.logs.mkdir()
        for name in ("jupyterhub_config.py", "broker_config.py"):
            text = self.sub((PROD / name).read_text())
            assert "cluster.example" not in text and "/opt/" not in text, name
            (etc / name).write_text(text)
        # the environment file from its template, every value filled in
        lines = []
        for line in (PROD / "secrets.env").read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={self.tokens[key]}" if key in self.tokens and line.endswith("=") else line)
        env_file = etc / "secrets.env"
        env_file.write_text("\n".join(lines) + "\n")
        env_file.chmod(0o600)
        assert set(read_environment_file(str(env_file))) == set(self.tokens)
        shutil.copy(self.sshd.client_key, etc / "login_ed25519")
        (etc / "login_ed25519").chmod(0o600)
        shutil.copy(self.sshd.known_hosts, etc / "login_known_hosts")
        # the cluster side: an HPC config for `node-agent launch` (no container on this machine)
        scratch = self.root / "scratch"
        scratch.mkdir()
        scratch.chmod(0o1777)
        (self.root / "node-agent").mkdir()
        (self.root / "node-agent" / "hpc-config.toml").write_text(
            f'[storage]\nscratch_dir = "{scratch}"\nhome_root = "{{scratch_dir}}/homes"\ncreate_home = true\n'
            "[logging]\nenabled = false\n[overlay]\nenabled = false\n[container]\nenabled = false\n"
            "[isolation]\nshared_account = false\n"
        )

    def unit(self, name: str) -> dict[str, list[str]]:
        return service_section(self.sub((PROD / UNITS[name]).read_text()))

    def start(self, name: str, **extra_env: str) -> subprocess.Popen:
        """Start the unit *name* the way systemd would (see the module docstring)."""
        svc = self.unit(name)
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for path in svc.get("EnvironmentFile", []):
            env.update(read_environment_file(path))
        for assignment in svc.get("Environment", []):
            key, _, value = assignment.partition("=")
            env[key] = value
        env.update(extra_env)
        mode = int(svc.get("StateDirectoryMode", ["0755"])[-1], 8)
        for d in svc.get("StateDirectory", []):
            os.makedirs(self.sub("/var/lib/" + d), mode=mode, exist_ok=True)
        cwd = svc.get("WorkingDirectory", [str(self.root)])[-1]
        (argv,) = [shlex.split(x) for x in svc["ExecStart"]]
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            terminate(proc, timeout=30)

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # what tests/e2e.py's Hub needs of a stack
    def as_stack(self) -> SimpleNamespace:
        return SimpleNamespace(
            hub_api_url=f"http://127.0.0.1:{self.ports[8081]}/hub/api",
            admin_token=self.tokens["JUPYTERHUB_OPS_TOKEN"],
            broker_url=f"http://127.0.0.1:{self.ports[8091]}",
            broker_token=self.tokens["BROKER_API_TOKEN"],
            public_url=f"http://127.0.0.1:{self.ports[8000]}",
            public_port=self.ports[8000],
            proxy_api_url=f"http://127.0.0.1:{self.ports[8001]}",
            proxy_token=self.tokens["CONFIGPROXY_AUTH_TOKEN"],
            log_text=self.log_text,
            workdir=str(self.root),
            logs=str(self.logs),
        )


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """The units as shipped, with only the install prefix pointed at this checkout's tools
    (verify checks that each ExecStart exists); any warning counts as a failure."""
    analyze = shutil.which("systemd-analyze") or pytest.fail(
        "systemd-analyze missing: scripts/install-sysdeps.sh installs Debian's systemd package"
    )
    site = SimpleNamespace(
        paths=[
            ("/opt/jupyterhub-hpc-broker/node/node_modules/.bin", os.path.dirname(find_chp())),
            ("/opt/jupyterhub-hpc-broker/bin", os.path.dirname(sys.executable)),
        ]
    )
    for unit in UNITS.values():
        text = (PROD / unit).read_text()
        for old, new in site.paths:
            text = text.replace(old, new)
        (tmp_path / unit).write_text(text)
    r = subprocess.run(
        [analyze, "verify", *[str(tmp_path / u) for u in UNITS.values()]], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    # and it does catch a broken unit
    (tmp_path / "broken.service").write_text("[Service]\nType=notifyy\nExecStart=/nonexistent/broker serve\n")
    r = subprocess.run([analyze, "verify", str(tmp_path / "broken.service")], capture_output=True, text=True)
    assert r.returncode != 0 and "Failed to parse service type" in r.stderr, r.stderr


def _api(url: str, token: str, scheme: str = "Bearer") -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"{scheme} {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_production_units_spawn_on_slurm_and_survive_a_hub_restart(tmp_path, slurm_cluster, sshd, accounts):
    acc = accounts
    site = Site(tmp_path / "site", sshd, acc)
    site.install()
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    hub = Hub(site.as_stack())  # type: ignore[arg-type]
    user = acc.user
    try:
        with (
            others_can_run_python(),
            others_can_reach(
                str(sshd.root / "authorized_keys"),
                str(tmp_path / "site" / "node-agent" / "hpc-config.toml"),
                str(tmp_path / "site" / "scratch"),
            ),
        ):
            site.start("proxy")
            wait_http(site.as_stack().proxy_api_url + "/api/routes", 30, site.procs["proxy"], "CHP")

            # the broker: READY=1 only once its API answers
            site.start("broker", NOTIFY_SOCKET=notify_path)
            notify.settimeout(60)
            assert notify.recv(4096) == b"READY=1"
            assert _api(site.as_stack().broker_url + "/api/sessions", site.tokens["BROKER_API_TOKEN"]) == 200
            runtime = tmp_path / "site" / "var" / "broker" / "runtime.json"
            assert (runtime.stat().st_mode & 0o777) == 0o600

            site.start("hub")
            wait_http(site.as_stack().hub_api_url, 90, site.procs["hub"], "jupyterhub")

            t0 = time.monotonic()
            hub.spawn(user, timeout=240)
            print(f"\n[production] spawn through the login node, as {user} via sudo: {time.monotonic() - t0:.1f} s")
            assert hub.through_proxy(user, "api/status")[0] == 200
            session = hub.session_of(user)
            job_id = session["job_id"]
            assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%u %T").stdout.split() == [user, "RUNNING"]

            # `broker status` as an admin would type it: no arguments, in the config's directory
            r = subprocess.run(
                [sys.executable, "-m", "broker.app", "status"],
                cwd=tmp_path / "site" / "etc",
                env={"PATH": SYSTEMD_PATH, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0 and user in r.stdout and job_id in r.stdout, r.stdout + r.stderr

            # restart the hub: the job keeps running and the restarted hub picks it up
            site.stop("hub")
            assert hub.through_proxy(user, "api/status")[0] == 200  # CHP and the tunnel: no hub needed
            site.start("hub")
            wait_http(site.as_stack().hub_api_url, 90, site.procs["hub"], "jupyterhub")
            wait_until(
                lambda: hub.api(hub.user_path(user))[1].get("servers", {}).get("", {}).get("ready"),
                60,
                interval=0.5,
                what="the restarted hub to see the server ready",
            )
            assert hub.through_proxy(user, "api/status")[0] == 200
            after = hub.session_of(user)
            assert (after["id"], after["state"], after["job_id"]) == (session["id"], "ready", job_id)
            assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%T").stdout.strip() == "RUNNING"

            hub.stop(user)
            wait_until(
                lambda: (
                    run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()
                    in ("", "CANCELLED")
                ),
                30,
                what="the job cancelled through sudo on the login node",
            )
            site.stop("hub")
            site.stop("broker")
            assert notify.recv(4096) == b"STOPPING=1"
            assert not runtime.exists()
    finally:
        for name in ("hub", "broker", "proxy"):
            site.stop(name)
        notify.close()
        run(real_binary("scancel"), "-u", user)
        save_stack_logs(site.as_stack(), "production-logs")  # type: ignore[arg-type]
