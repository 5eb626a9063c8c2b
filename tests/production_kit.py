"""The production kit (examples/production/) installed under one directory and its units run as
systemd would run them: shared by tests/test_production.py (one host) and tests/test_site.py
(the hub's own network namespace in the site topology).

Each unit's [Service] section is parsed: ``ExecStart`` is run with the environment of
``EnvironmentFile`` and ``Environment`` in ``WorkingDirectory``, its ``StateDirectory`` created.
The configs are the shipped files. Substituted, and nothing else: paths (/opt, /etc, /var/lib
into the test's directory), addresses (``login.cluster.example``, ``hub.cluster.example``,
``127.0.0.1``, ``0.0.0.0``: :class:`Addresses`), ports (free ones) and account and group names
(the login-node account, the users' group). A caller may append lines to ``jupyterhub_config.py``
(*hub_overrides*: what a site adds for its cluster, e.g. a shorter poll interval); they are
written after the shipped file, in a block that says so.

Not done as systemd would: ``User=`` (the services run as the test's root; the jobs still run as
the user, through the sudoers rule on the login node), and the hardening options. The caller's
``PYTHONPATH`` is passed on, so a git worktree tests its own code.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from devstack.stack import free_port, start_service

from harness import REPO, find_chp, terminate

PROD = Path(REPO) / "examples" / "production"
UNITS = {
    "proxy": "configurable-http-proxy.service",
    "broker": "jupyterhub-broker.service",
    "hub": "jupyterhub.service",
}
#: systemd's default PATH for services
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the shipped files' ports, each replaced by a free one
SHIPPED_PORTS = (8000, 8001, 8081, 8091, 8022)


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


@dataclass
class Addresses:
    """What the shipped files' addresses become: *local* for ``127.0.0.1`` (the hub host's
    services among themselves), *any* for the broker's ``"0.0.0.0"`` (None: kept), *public* for
    the public bind (CHP's ``--ip`` and the hub's ``bind_url``; default *local*), *login* and
    *hub* for the example host names."""

    local: str = "127.0.0.1"
    any: str | None = "127.0.0.1"
    public: str | None = None
    login: str = "127.0.0.1"
    hub: str = "127.0.0.1"


class ProductionKit:
    """The production files installed under *root*, with their substitutions (module docstring).

    *login_port*, *login_key*, *login_known_hosts*: the login node's sshd and the hub's key for
    it. *service* and *group*: the login-node account and the users' group. *paths*: extra
    (shipped path, replacement) pairs tried before the defaults (the venv's bin for
    ``/opt/jupyterhub-hpc-broker/bin``, CHP's for its ``node_modules/.bin``). *exec_prefix*: an
    argv prefix for every unit (``nsenter --net=...``: run on another "host").
    """

    def __init__(
        self,
        root: Path,
        *,
        login_port: int,
        login_key: Path,
        login_known_hosts: Path,
        service: str,
        group: str,
        addresses: Addresses | None = None,
        paths: list[tuple[str, str]] | None = None,
        exec_prefix: list[str] | None = None,
        hub_overrides: str = "",
    ):
        self.root = root
        self.addresses = addresses or Addresses()
        self.ports = {p: free_port() for p in SHIPPED_PORTS}
        self.paths = [
            *(paths or []),
            ("/opt/jupyterhub-hpc-broker/node/node_modules/.bin", os.path.dirname(find_chp())),
            ("/opt/jupyterhub-hpc-broker/bin", os.path.dirname(sys.executable)),
            ("/etc/jupyterhub-hpc-broker", str(root / "etc")),
            ("/var/lib/jupyterhub-hpc-broker", str(root / "var")),
            ("/etc/node-agent", str(root / "node-agent")),
        ]
        self.login_port = login_port
        self.login_key = login_key
        self.login_known_hosts = login_known_hosts
        self.service = service
        self.group = group
        self.exec_prefix = exec_prefix or []
        self.hub_overrides = hub_overrides
        self.tokens = {
            "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(32),
            "BROKER_API_TOKEN": secrets.token_hex(32),
            "JUPYTERHUB_OPS_TOKEN": secrets.token_hex(32),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = root / "logs"

    # -- the substitutions ------------------------------------------------------------------
    def sub(self, text: str) -> str:
        a = self.addresses
        # one pass, first listed pair first: a replacement is never replaced again
        table: dict[str, str] = {}
        for old, new in self.paths:
            table.setdefault(old, new)
        pattern = "|".join(re.escape(old) for old in table)
        text = re.sub(pattern, lambda m: table[m.group(0)], text)
        text = text.replace("login.cluster.example", a.login).replace("hub.cluster.example", a.hub)
        if a.public:
            text = text.replace("--ip 127.0.0.1 --port 8000", f"--ip {a.public} --port 8000")
            text = text.replace('bind_url = "http://127.0.0.1:8000/"', f'bind_url = "http://{a.public}:8000/"')
        if a.any is not None:
            text = text.replace('"0.0.0.0"', f'"{a.any}"')
        text = text.replace("127.0.0.1", a.local)
        for old_port, new_port in self.ports.items():
            text = re.sub(rf"(?<![0-9]){old_port}(?![0-9])", str(new_port), text)
        text = text.replace("login_node_port = 22\n", f"login_node_port = {self.login_port}\n")
        text = text.replace('login_node_user = "jupyterhub"', f'login_node_user = "{self.service}"')
        return text.replace('{"jupyterhub-users"}', f'{{"{self.group}"}}')

    def install(self) -> None:
        """The configs, the secrets file (every value filled in, 0600) and the login node's key."""
        etc = self.root / "etc"
        etc.mkdir(parents=True)
        (self.root / "var").mkdir()
        (self.root / "node-agent").mkdir()
        self.logs.mkdir()
        for name in ("jupyterhub_config.py", "broker_config.py"):
            self._write_config(name)
        lines = []
        for line in (PROD / "secrets.env").read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={self.tokens[key]}" if key in self.tokens and line.endswith("=") else line)
        env_file = etc / "secrets.env"
        env_file.write_text("\n".join(lines) + "\n")
        env_file.chmod(0o600)
        assert set(read_environment_file(str(env_file))) == set(self.tokens)
        shutil.copy(self.login_key, etc / "login_ed25519")
        (etc / "login_ed25519").chmod(0o600)
        shutil.copy(self.login_known_hosts, etc / "login_known_hosts")

    def _write_config(self, name: str) -> None:
        """The shipped *name* with the substitutions into ``etc/`` (the hub's with the overrides)."""
        text = self.sub((PROD / name).read_text())
        assert "cluster.example" not in text, name
        news = [new for _, new in self.paths]
        for old, _ in self.paths:  # every shipped path replaced (unless a replacement contains it)
            assert old not in text or any(old in new for new in news), (name, old)
        if name == "jupyterhub_config.py" and self.hub_overrides:
            text += "\n# --- added by the test for its cluster (production_kit.py) ---\n" + self.hub_overrides + "\n"
        (self.root / "etc" / name).write_text(text)

    def set_hub_overrides(self, overrides: str) -> None:
        """Rewrite jupyterhub_config.py with other *overrides* (takes effect at the hub's next start)."""
        self.hub_overrides = overrides
        self._write_config("jupyterhub_config.py")

    # -- the units ----------------------------------------------------------------------------
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
        proc = start_service([*self.exec_prefix, *argv], str(self.logs / f"{name}.log"), env, cwd)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int | None = None) -> None:
        """Stop the unit *name*: SIGTERM and wait (as ``systemctl stop``), or send *sig* (e.g.
        SIGKILL) and reap it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if sig is not None:
            proc.send_signal(sig)
            proc.wait(30)
        else:
            terminate(proc, timeout=30)

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # what tests/e2e.py's Hub needs of a stack
    def as_stack(self) -> SimpleNamespace:
        local, public = self.addresses.local, self.addresses.public or self.addresses.local
        return SimpleNamespace(
            hub_api_url=f"http://{local}:{self.ports[8081]}/hub/api",
            hub_port=self.ports[8081],
            admin_token=self.tokens["JUPYTERHUB_OPS_TOKEN"],
            broker_url=f"http://{local}:{self.ports[8091]}",
            broker_api_port=self.ports[8091],
            broker_token=self.tokens["BROKER_API_TOKEN"],
            public_url=f"http://{public}:{self.ports[8000]}",
            public_port=self.ports[8000],
            proxy_api_url=f"http://{local}:{self.ports[8001]}",
            proxy_api_port=self.ports[8001],
            proxy_token=self.tokens["CONFIGPROXY_AUTH_TOKEN"],
            ssh_port=self.ports[8022],
            log_text=self.log_text,
            workdir=str(self.root),
            logs=str(self.logs),
        )
