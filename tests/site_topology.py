"""The "site in a box" topology for the ``site`` tests (tests/test_site.py): four hosts as network
namespaces on one bridge, a shared file system, real Unix users.

===========  ======================  ===========================================================
host         address                 runs
===========  ======================  ===========================================================
(outside)    ``10.78.0.254`` bridge  pytest, the browser: the root namespace, like a user's PC
``hub``      ``10.78.0.1``           JupyterHub, CHP, the broker
``login``    ``10.78.0.2``           sshd (the hub's one pooled SSH connection), slurmctld
``node1``    ``10.78.0.11``          slurmd; the notebook jobs (Apptainer)
``node2``    ``10.78.0.12``          slurmd
===========  ======================  ===========================================================

Each host is the network namespace ``site-<host>`` (its veth end is ``eth0``, the root end
``site-<host>`` on the bridge ``sitebr0``); the file system is shared, as a cluster's shared
file system is. Processes run "on" a host through :meth:`Site.prefix` (``nsenter --net=``, not
``ip netns exec``: the latter remounts /sys, and slurmd then finds no cgroup hierarchy); daemons
that must report their host name also get a UTS namespace (``scripts/slurm.sh site``).

:meth:`Site.destroy` is idempotent and starts every :meth:`Site.create`: it kills every process
in one of the namespaces (whatever started it, so a crashed run's hub, jobs and daemons go too),
every process of the site's users, deletes the namespaces, links and the bridge, the users it
created (recognised by their GECOS marker, never another account of the same name) and the
shared directory. Nothing of a previous crashed run survives the next run's start.

The accounts: ``alice`` and ``bob`` (homes under the shared directory, random passwords for the
hub's PAM login, members of :data:`GROUP`) and the hub's service account :data:`SERVICE`, with
the shipped sudoers rule for them in :data:`SUDOERS_FILE` while the site exists.

:func:`firewall_node` puts a node behind nftables: out only to the broker's SSH port on the hub
and the Slurm ports on the login node; in only Slurm's controller-to-slurmd traffic from the
login node and replies. :func:`firewall_hub` is the hub's side: from the nodes only that SSH port.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from e2e import alive
from harness import ARTIFACTS, wait_until
from reliability import sh

BRIDGE = "sitebr0"
SUBNET = "10.78.0"
OUTSIDE_IP = f"{SUBNET}.254"
HOSTS = {"hub": f"{SUBNET}.1", "login": f"{SUBNET}.2", "node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}
NODES = ("node1", "node2")
NETNS_PREFIX = "site-"
#: the shared file system: user homes, Slurm's state, the hub's work directory
SITE_ROOT = Path(os.environ.get("SITE_ROOT", "/srv/site-box"))
USERS = ("alice", "bob")
#: the hub's account on the login node (``login_node_user``; the jobs' account in service mode)
SERVICE = "sitesvc"
#: the users' group (PAM's ``allowed_groups`` on the hub, the sudoers rule's runas group)
GROUP = "sitebox-users"
#: GECOS of the accounts the harness creates; destroy() removes only accounts that carry it
USER_MARK = "site-in-a-box test user"
#: the shipped sudoers rule for SERVICE and GROUP, installed while the site exists
SUDOERS_FILE = Path("/etc/sudoers.d/zz-site-box")
SHIPPED_SUDOERS = Path(__file__).resolve().parent.parent / "examples" / "production" / "sudoers"
#: Slurm ports of the site's cluster: not the project's single-node cluster's 6817/6818
SLURMCTLD_PORT = 6917
SLURMD_PORT = 6918
SLURM_SH = Path(__file__).resolve().parent.parent / "scripts" / "slurm.sh"


def netns(host: str) -> str:
    return NETNS_PREFIX + host


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_where(match) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if match(d):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _kill_all(pids_of, what: str) -> None:
    """SIGKILL what *pids_of()* lists until it lists nothing (zombies excepted)."""
    deadline = time.monotonic() + 20
    while True:
        pids = [p for p in pids_of() if alive(p)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {what} survive SIGKILL: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@dataclass
class Site:
    """The four hosts, the bridge and the users; :meth:`create` and :meth:`destroy`."""

    root: Path = SITE_ROOT
    #: the users' login passwords (PAM on the hub), made by :meth:`create`
    passwords: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def homes(self) -> Path:
        return self.root / "home"

    @staticmethod
    def ip(host: str) -> str:
        return HOSTS[host]

    @staticmethod
    def prefix(host: str) -> list[str]:
        """argv prefix that runs a command on *host* (its network namespace, nothing else)."""
        return ["nsenter", f"--net=/run/netns/{netns(host)}"]

    def run(self, host: str, *argv: str, check: bool = True, timeout: float = 60, **kw):
        return sh(*self.prefix(host), *argv, check=check, timeout=timeout, **kw)

    # -- life cycle ---------------------------------------------------------------------------
    def create(self) -> Site:
        self.destroy()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.homes.mkdir(exist_ok=True)
        os.chmod(self.homes, 0o755)
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for host, addr in HOSTS.items():
            ns = netns(host)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", ns, "master", BRIDGE, "up")
            self.run(host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            self.run(host, "ip", "link", "set", "eth0", "up")
            self.run(host, "ip", "link", "set", "lo", "up")
        for host in HOSTS:  # up once a connect to the bridge's address gets an answer (a refusal)
            wait_until(
                lambda h=host: _answers(self, h, OUTSIDE_IP, 9),
                20,
                0.2,
                f"{host} reaching the bridge",
            )
        sh("groupadd", GROUP)
        for user in (*USERS, SERVICE):
            self._add_user(user, groups=[GROUP] if user in USERS else [])
        for user in USERS:
            self.passwords[user] = secrets.token_urlsafe(12)
            sh("chpasswd", input=f"{user}:{self.passwords[user]}\n")
        self._install_sudoers()
        return self

    def _add_user(self, user: str, groups: list[str]) -> None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            pass
        else:
            raise RuntimeError(f"account {user} exists and was not made by the site harness: not touching it")
        extra = ["-G", ",".join(groups)] if groups else []
        sh("useradd", "-m", "-d", str(self.homes / user), "-s", "/bin/bash", "-c", USER_MARK, "-p", "*", *extra, user)
        os.chmod(self.homes / user, 0o700)

    def _install_sudoers(self) -> None:
        """The shipped rule for the site's service account and group, with its commented line for
        a slurm.conf not at the default path taken in: ``SLURM_CONF`` is kept (sudo would drop
        it; the login node's sessions get it from sshd)."""
        rule = SHIPPED_SUDOERS.read_text().replace("%jupyterhub-users", f"%{GROUP}")
        rule = rule.replace("\njupyterhub ALL=", f"\n{SERVICE} ALL=")
        assert f"\n{SERVICE} ALL=(JUPYTERHUB_USERS) NOPASSWD: JUPYTERHUB_BATCH" in rule
        commented = '# Defaults!JUPYTERHUB_BATCH env_keep += "SLURM_CONF"'
        assert commented in rule
        rule = rule.replace(commented, commented[2:])
        new = SUDOERS_FILE.with_name(SUDOERS_FILE.name + ".new")
        new.write_text(rule)
        r = sh("visudo", "-cf", str(new), check=False)
        if r.returncode != 0:
            new.unlink()
            raise RuntimeError(f"visudo refused the site's sudoers rule: {r.stdout}{r.stderr}")
        new.chmod(0o440)
        new.rename(SUDOERS_FILE)

    def processes(self) -> list[int]:
        """Every process in one of the site's network namespaces."""
        inodes = {i for h in HOSTS if (i := _ns_inode(f"/run/netns/{netns(h)}")) is not None}
        if not inodes:
            return []
        return _pids_where(lambda d: os.stat(d / "ns" / "net").st_ino in inodes)

    @staticmethod
    def _site_users() -> dict[str, int]:
        out = {}
        for user in (*USERS, SERVICE):
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                continue
            if pw.pw_gecos == USER_MARK:
                out[user] = pw.pw_uid
        return out

    def destroy(self) -> None:
        """Remove everything a (possibly crashed) run left; safe to call any time."""
        sh(
            "bash",
            str(SLURM_SH),
            "site",
            "stop",
            "--clean",
            check=False,
            timeout=120,
            env=dict(os.environ, SLURM_BASE=str(self.root / "slurm")),
        )
        _kill_all(self.processes, "the site's namespaces")
        users = self._site_users()
        uids = set(users.values())
        _kill_all(lambda: _pids_where(lambda d: d.stat().st_uid in uids) if uids else [], "the site's users")
        for host in HOSTS:
            sh("ip", "link", "del", netns(host), check=False)
            sh("ip", "netns", "del", netns(host), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        for user in users:
            sh("userdel", "-r", "-f", user, check=False)
        sh("groupdel", GROUP, check=False)
        for path in (SUDOERS_FILE, SUDOERS_FILE.with_name(SUDOERS_FILE.name + ".new")):
            path.unlink(missing_ok=True)
        self._unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _unmount_below(root: Path) -> None:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        for point in sorted((p for p in points if p.startswith(str(root) + "/")), reverse=True):
            sh("umount", "-l", point, check=False)

    def leftovers(self) -> list[str]:
        """What of the site still exists (empty after :meth:`destroy`)."""
        found = []
        names = sh("ip", "netns", "list", check=False).stdout
        found += [f"netns {n.split()[0]}" for n in names.splitlines() if n.startswith(NETNS_PREFIX)]
        links = sh("ip", "-br", "link", check=False).stdout
        found += [f"link {ln.split()[0]}" for ln in links.splitlines() if ln.startswith((BRIDGE, NETNS_PREFIX))]
        found += [f"process {p}" for p in self.processes()]
        found += [f"user {u}" for u in self._site_users()]
        with open("/proc/self/mounts") as f:
            found += [f"mount {m.split()[1]}" for m in f if str(self.root) in m.split()[1] or NETNS_PREFIX in m]
        if self.root.exists():
            found.append(f"directory {self.root}")
        if SUDOERS_FILE.exists():
            found.append(f"file {SUDOERS_FILE}")
        if sh("getent", "group", GROUP, check=False).returncode == 0:
            found.append(f"group {GROUP}")
        return found


def firewall_node(site: Site, node: str, broker_ssh_port: int) -> None:
    """Deny by default on *node*: out only TCP to the broker's SSH port on the hub and to
    slurmctld on the login node; in only slurmctld's connections to slurmd (from the login
    node) and replies to what the node opened."""
    hub, login = HOSTS["hub"], HOSTS["login"]
    rules = f"""
table inet site {{
    chain out {{
        type filter hook output priority 0; policy drop;
        oif "lo" accept
        ct state established,related accept
        ip daddr {hub} tcp dport {broker_ssh_port} accept
        ip daddr {login} tcp dport {SLURMCTLD_PORT} accept
    }}
    chain in {{
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
        ip saddr {login} tcp dport {SLURMD_PORT} accept
    }}
}}
"""
    site.run(node, "nft", "-f", "-", input=rules)


def firewall_hub(site: Site, broker_ssh_port: int) -> None:
    """The hub's side of the same rule: from a compute node only the broker's SSH port is
    accepted; the login node and the outside reach every service (the public port is the one
    users use; the others serve the admins)."""
    nodes = ", ".join(HOSTS[n] for n in NODES)
    rules = f"""
table inet site {{
    chain in {{
        type filter hook input priority 0; policy accept;
        iif "lo" accept
        ct state established,related accept
        ip saddr {{ {nodes} }} tcp dport {broker_ssh_port} accept
        ip saddr {{ {nodes} }} drop
    }}
}}
"""
    site.run("hub", "nft", "-f", "-", input=rules)


def site_link(site: Site, host: str, up: bool) -> None:
    """Cut or restore *host*'s link to the bridge (its end keeps its address and sockets)."""
    sh("ip", "link", "set", netns(host), "up" if up else "down")


def connect_errno(site: Site, host: str, addr: str, port: int, timeout: float = 2) -> int:
    """A real TCP connect from *host* to *addr*:*port*; 0 when it connects, else the errno
    (``ECONNREFUSED``: the address answered; a timeout or ``EPERM``: a firewall dropped it)."""
    code = (
        f"import socket\ns=socket.socket()\ns.settimeout({timeout!r})\n"
        f"try:\n e=s.connect_ex(({addr!r},{port}))\nexcept OSError as x:\n e=x.errno or 110\nprint(e)"
    )
    return int(site.run(host, "/usr/bin/python3", "-I", "-c", code, timeout=timeout + 20).stdout.strip())


def _answers(site: Site, host: str, addr: str, port: int) -> bool:
    """For readiness waits only: *addr* answers from *host* (connects or refuses); a probe that
    itself failed counts as not yet (the strict :func:`connect_errno` raises instead, so that a
    broken probe never passes for a blocked port)."""
    try:
        return connect_errno(site, host, addr, port) in (0, errno.ECONNREFUSED)
    except subprocess.CalledProcessError:
        return False


def can_connect(site: Site, host: str, addr: str, port: int, timeout: float = 2) -> bool:
    return connect_errno(site, host, addr, port, timeout) == 0


def artifacts(name: str) -> str:
    path = os.path.join(ARTIFACTS, name)
    os.makedirs(path, exist_ok=True)
    return path
