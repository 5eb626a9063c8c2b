"""A private OpenSSH server on 127.0.0.1 for tests: plays the cluster's login node.

Free port, own config, host key and authorized_keys, UsePAM no, LogLevel DEBUG3 into a log file
the tests inspect (``accepted()`` counts "Accepted publickey" lines = SSH connections).
openssh-server is apt-installed if missing. Shared by test_slurm_infra.py and test_e2e_slurm.py
(conftest.py registers this module as a plugin: the ``sshd`` fixture needs no import).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devstack.stack import free_port
from hub_plugin.remote import LoginNodeRunner

from harness import terminate


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def apt_install(*pkgs: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-qq"]
    subprocess.run(apt + ["update"], check=True, env=env, capture_output=True)
    subprocess.run(apt + ["install", "--no-install-recommends", *pkgs], check=True, env=env, capture_output=True)


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


class SSHD:
    """*address*: where it listens (default loopback); *prefix*: argv prefix that runs sshd on
    another "host" (e.g. ``nsenter --net=...``, tests/site_topology.py); *set_env*: variables
    every session gets (sshd's ``SetEnv``, e.g. ``SLURM_CONF``)."""

    def __init__(
        self,
        root: Path,
        address: str = "127.0.0.1",
        prefix: tuple[str, ...] = (),
        set_env: dict[str, str] | None = None,
    ):
        self.root = root
        self.address = address
        self.prefix = list(prefix)
        self.set_env = set_env or {}
        self.port = free_port()
        self.log = root / "sshd.log"
        self.host_key = root / "ssh_host_ed25519_key"
        self.client_key = root / "client_key"
        self.known_hosts = root / "known_hosts"
        self.host_pub = ""
        self.proc: subprocess.Popen | None = None

    def accepted(self) -> int:
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def kill_sessions(self) -> int:
        """Kill sshd's per-connection processes: every client connection drops."""
        assert self.proc is not None
        kids = children(self.proc.pid)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(kids)

    def runner(self, **kw) -> LoginNodeRunner:
        kw.setdefault("known_hosts", str(self.known_hosts))
        return LoginNodeRunner(self.address, port=self.port, username="root", client_keys=[str(self.client_key)], **kw)

    def hub_config(self, spawner: str = "SlurmBrokerSpawner") -> str:
        """Hub config lines that make *spawner* run its Slurm commands on this "login node"."""
        return "\n".join(
            [
                f'c.{spawner}.login_node_host = "127.0.0.1"',
                f"c.{spawner}.login_node_port = {self.port}",
                f'c.{spawner}.login_node_user = "root"',
                f"c.{spawner}.login_node_key_file = {str(self.client_key)!r}",
                f"c.{spawner}.login_node_known_hosts = {str(self.known_hosts)!r}",
            ]
        )

    def start(self) -> SSHD:
        """Start sshd; keys and config are made on the first start and kept on restarts
        (same port, same host key: a restarted login node)."""
        root = self.root
        if self.host_key.exists():
            return self._launch()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key))
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        pub = (root / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {pub[0]} {pub[1]}\n")
        self.host_pub = f"{pub[0]} {pub[1]}"
        conf = root / "sshd_config"
        conf.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {root}/authorized_keys",
                    f"PidFile {root}/sshd.pid",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "StrictModes no",
                    # the most verbose level: if anything logged a secret, it would be here
                    "LogLevel DEBUG3",
                    "MaxStartups 100",
                    *(f"SetEnv {k}={v}" for k, v in self.set_env.items()),
                    "",
                ]
            )
        )
        return self._launch()

    def _launch(self) -> SSHD:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.prefix, "/usr/sbin/sshd", "-D", "-f", str(self.root / "sshd_config"), "-E", str(self.log)],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.address, self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text(errors="replace")
                time.sleep(0.05)
        pytest.fail("sshd did not start listening")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill_sessions()
        terminate(self.proc)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not Path("/usr/sbin/sshd").exists():
        if os.geteuid() != 0:
            pytest.skip("openssh-server missing and installing it needs root")
        apt_install("openssh-server")
    d = SSHD(tmp_path_factory.mktemp("sshd")).start()
    yield d
    d.stop()
