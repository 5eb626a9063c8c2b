"""A site in a box: the hub, the login node and two compute nodes as separate hosts (network
namespaces on a bridge, tests/site_topology.py), with real Slurm across them, real Unix users,
the shipped files and image, and real connections only.

* ``hub`` (10.78.0.1): CHP, the broker and JupyterHub started from examples/production/'s units
  and configs (tests/production_kit.py: only paths, addresses, ports and account names
  substituted; every service on the hub's address). Users log in with their Unix passwords
  (PAM, as shipped). The hub submits, polls and cancels through the login node's sshd over ONE
  pooled SSH connection as the service account ``sitesvc``: per-user mode is the shipped
  ``submit_as = "sudo"`` with the shipped sudoers rule; service-account mode adds
  ``submit_as = "service"`` (every job runs as ``sitesvc``, homes under ``home_root``).
* ``login`` (10.78.0.2): sshd (tests/sshd.py; ``SLURM_CONF`` set for its sessions and kept
  through sudo, as a site with a non-default slurm.conf path does) and slurmctld
  (``scripts/slurm.sh site``).
* ``node1``, ``node2``: one slurmd each, in a UTS namespace with that host name. nftables
  (:func:`site_topology.firewall_node`): out only to the broker's SSH port and to slurmctld, in
  only slurmctld's traffic; the hub accepts nothing from them but that SSH port
  (:func:`site_topology.firewall_hub`). The job runs ``node-agent launch`` with an HPC config
  (the user's home, an overlay, the nbgrader exchange, ``contain-pid``) and the shipped image,
  copied to the shared file system with the site's ``node-agent`` (``make images`` builds
  ``singularity/cpu.sif``; the agent and jupyterhub-singleuser inside are the image's own).

What the test adds to the shipped hub config (``_hub_overrides``): shorter poll intervals and
keepalive, the job output directory, the pending page always shown, and a ``pre_spawn_hook``
that pins each user's job to a node (alice: node1, bob: node2, or both on node1 for the
shared-node checks): with one core each and ``OverSubscribe=FORCE`` Slurm would otherwise pack
both on node1.

Spawn-to-ready times go to ``test-artifacts/site/timings.jsonl``; the services' logs to
``test-artifacts/site-logs/``. Run with ``pytest -m site tests/test_site.py`` as root
(docs/deploy.md, "The reference topology").

Found here: in about one spawn in four the server's first hub-API request was lost in the
agent's relay (the image's Python 3.11.2 reads a new connection before its channel is open;
fixed, tests/test_relay_early_bytes.py); and on a shared node any process could use another
job's hub-API relay (now refused unless the peer is the job's own: wire/peercred.py).
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from devstack.stack import wait_http

from browser import RECORD_PROGRESS, login, run_in_new_notebook, shot
from e2e import Hub, form_login, request
from harness import ARTIFACTS, REPO, wait_until
from production_kit import Addresses, ProductionKit
from reliability import have_netns
from site_topology import (
    GROUP,
    HOSTS,
    NODES,
    OUTSIDE_IP,
    SERVICE,
    SLURM_SH,
    SLURMCTLD_PORT,
    SLURMD_PORT,
    USERS,
    Site,
    can_connect,
    connect_errno,
    firewall_hub,
    firewall_node,
    sh,
    site_link,
)
from slurm_cluster import SLURM_POLL_INTERVAL
from sshd import SSHD

pytestmark = [pytest.mark.site, pytest.mark.timeout(900)]

CPU_SIF = Path(REPO) / "singularity" / "cpu.sif"
#: the node each user's job is pinned to (module docstring)
PLACEMENT = {"alice": "node1", "bob": "node2"}

HPC_CONFIG = """
[storage]
scratch_dir = "{scratch}"
home_root = "{homes}"
create_home = {shared}

[logging]
enabled = true
dir = "{scratch}/log"

[overlay]
enabled = true
size = "64M"
location = "{scratch}/overlays/{{user}}.img"

[container]
enabled = true
image = "{image}"
contain = "contain-pid"
home = "/home/jovyan"
inner_command = ["node-agent", "run"]

[nbgrader]
exchange_dir = "{scratch}/nbgrader-exchange"

[isolation]
shared_account = {shared}
"""


def _prerequisites() -> None:
    if not have_netns():
        pytest.skip("needs root and `ip netns`")
    for tool in ("nft", "nsenter", "unshare", "apptainer", "useradd"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (make test installs the system dependencies)")


def _slurm_env(site: Site) -> dict[str, str]:
    return dict(os.environ, SLURM_BASE=str(site.root / "slurm"))


def _slurm_conf(site: Site) -> str:
    return str(site.root / "slurm" / "etc" / "slurm.conf")


def record(**figures) -> None:
    """Append one line of measured figures to test-artifacts/site/timings.jsonl."""
    d = os.path.join(ARTIFACTS, "site")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "timings.jsonl"), "a") as f:
        f.write(json.dumps({"at": time.time(), **figures}) + "\n")


# -- the topology itself --------------------------------------------------------------------------


def test_setup_after_a_crashed_run_and_teardown_leave_nothing():
    """A run that died with its hosts full of processes (a daemon in a namespace, a process of a
    site user) is cleaned up by the next run's setup; teardown then leaves no namespace, link,
    process, user, mount or directory."""
    _prerequisites()
    crashed = Site().create()
    sleeper = subprocess.Popen([*crashed.prefix("node1"), "sleep", "600"], start_new_session=True)
    as_alice = subprocess.Popen(["runuser", "-u", "alice", "--", "sleep", "600"], start_new_session=True)
    # (nsenter enters the namespace a moment after it started)
    wait_until(lambda: crashed.processes() == [sleeper.pid], 10, 0.05, "the sleeper in node1's namespace")
    # the next run starts: its setup destroys what the crashed one left, then builds afresh
    site = Site().create()
    assert sleeper.wait(10) is not None and as_alice.wait(10) is not None
    assert site.processes() == []
    assert pwd.getpwnam("alice").pw_dir == str(site.homes / "alice")
    site.destroy()
    assert site.leftovers() == []
    site.destroy()  # idempotent
    assert site.leftovers() == []


def _save_logs(site: Site) -> None:
    """Slurm's logs, the jobs' output and node-agent launch's logs into test-artifacts/site-logs/."""
    dest = Path(ARTIFACTS) / "site-logs"
    for src, name in (
        ("slurm/log", "slurm"),
        ("slurm-out", "jobs"),
        ("scratch/log", "launch"),
        ("svc-scratch/log", "launch-service"),
    ):
        shutil.rmtree(dest / name, ignore_errors=True)
        if (site.root / src).is_dir():
            shutil.copytree(site.root / src, dest / name)


@pytest.fixture(scope="module")
def site():
    _prerequisites()
    s = Site().create()
    try:
        t0 = time.monotonic()
        r = sh("bash", str(SLURM_SH), "site", "start", check=False, timeout=300, env=_slurm_env(s))
        assert r.returncode == 0, f"slurm.sh site start failed:\n{r.stdout}\n{r.stderr}"
        print(f"\n[site] topology + Slurm up in {time.monotonic() - t0:.1f} s")
        yield s
    finally:
        _save_logs(s)
        s.destroy()
        assert s.leftovers() == []


def test_multi_node_slurm_runs_each_users_job_on_the_node_asked_for(site):
    """Jobs submitted on the login node as alice and bob run on node1 and node2 under their own
    accounts, with those host names and addresses."""
    conf = _slurm_conf(site)
    outs = {}
    for user, node in PLACEMENT.items():
        out = site.homes / user / "where.txt"
        # --chdir: the job starts in the user's home, not in pytest's directory (which the user
        # may not enter: slurmstepd would write its complaint into the output)
        script = (
            f"sbatch --wait -w {node} --chdir={site.homes / user} -o {out} "
            "--wrap 'hostname; id -un; ip -4 -br addr show eth0'"
        )
        r = site.run(
            "login", "runuser", "-u", user, "--", "env", f"SLURM_CONF={conf}", "bash", "-c", script, timeout=120
        )
        assert "Submitted batch job" in r.stdout, r
        outs[user] = out.read_text().split()
    for user, node in PLACEMENT.items():
        hostname, who, *addr = outs[user]
        assert (hostname, who) == (node, user)
        assert HOSTS[node] + "/24" in addr


# -- the hub on its host ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_sif() -> Path:
    """The shipped image (``make images`` when the checkout has none; cached outside it)."""
    if not CPU_SIF.exists():
        r = subprocess.run(
            ["make", "-s", "images", f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=1500
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return CPU_SIF


@pytest.fixture(scope="module")
def login_sshd(site):
    root = site.root / "login-sshd"
    root.mkdir()
    d = SSHD(
        root, address=HOSTS["login"], prefix=tuple(site.prefix("login")), set_env={"SLURM_CONF": _slurm_conf(site)}
    )
    d.start()
    yield d
    d.stop()


def _install_cluster_software(site: Site, cpu_sif: Path) -> tuple[Path, Path]:
    """What a site puts on the cluster's shared file system: the install prefix's ``bin`` (the
    hub host runs ``broker`` and ``jupyterhub`` from it; the jobs find ``node-agent`` there
    through ``req_path``) and the image. ``node-agent`` outside the container is the system's
    python3 running a copy of ``node_agent`` and ``wire`` (stdlib only there; the checkout may
    sit in a directory other users cannot enter, as CI's clone does). Returns (bin, image)."""
    prefix = site.root / "opt" / "jupyterhub-hpc-broker"
    bin_dir, lib = prefix / "bin", prefix / "lib"
    bin_dir.mkdir(parents=True)
    for package in ("node_agent", "wire"):
        shutil.copytree(Path(REPO) / package, lib / package, ignore=shutil.ignore_patterns("__pycache__"))
    agent = bin_dir / "node-agent"
    agent.write_text(
        f"#!/usr/bin/python3 -I\nimport sys\nsys.path.insert(0, {str(lib)!r})\n"
        "from node_agent.cli import main\nsys.exit(main())\n"
    )
    agent.chmod(0o755)
    for tool in ("broker", "jupyterhub"):  # the hub host's: root's venv
        (bin_dir / tool).symlink_to(Path(sys.executable).parent / tool)
    images = site.root / "images"
    images.mkdir()
    shutil.copy(cpu_sif, images / "cpu.sif")
    os.chmod(images / "cpu.sif", 0o644)
    return bin_dir, images / "cpu.sif"


#: what the test adds to the shipped jupyterhub_config.py for its cluster (each mode)
PLACEMENT_FILE = "placement.json"


def _hub_overrides(site: Site, mode: str) -> str:
    lines = [
        f"c.SlurmBrokerSpawner.slurm_poll_interval = {SLURM_POLL_INTERVAL}",
        "c.BrokerSpawnerMixin.broker_wait_interval = 0.5",
        "c.Spawner.poll_interval = 5",
        # the agent gives up a dead connection after 3 missed keepalives (15 s, not 45 s)
        "c.Spawner.environment = {'NODE_AGENT_KEEPALIVE': '5'}",
        f"c.SlurmBrokerSpawner.req_output_dir = {str(site.root / 'slurm-out')!r}",
        "c.Spawner.notebook_dir = '/home/jovyan'",
        # always show the pending page (a fast spawn would otherwise skip it)
        "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}",
        # pin users to nodes (module docstring): the placement file, read at each spawn
        "import json",
        "def _pin_node(spawner):",
        f"    with open({str(site.root / PLACEMENT_FILE)!r}) as f:",
        "        node = json.load(f).get(spawner.user.name)",
        "    if node:",
        "        spawner.req_options = '--nodelist=' + node",
        "c.Spawner.pre_spawn_hook = _pin_node",
    ]
    if mode == "service":
        lines += [
            'c.SlurmBrokerSpawner.submit_as = "service"',
            f"c.SlurmBrokerSpawner.home_root = {str(site.root / 'svc-homes')!r}",
            "c.SlurmBrokerSpawner.agent_command = "
            f"'node-agent launch --config {site.root / 'node-agent' / 'hpc-config-service.toml'} --'",
        ]
    return "\n".join(lines)


def place(site: Site, **placement: str) -> None:
    """Pin each named user's next job to a node (see ``_hub_overrides``)."""
    (site.root / PLACEMENT_FILE).write_text(json.dumps(placement))


class SiteHub:
    """The hub host's services from examples/production/ (tests/production_kit.py) in the
    ``hub`` namespace; :meth:`use_mode` restarts the hub in per-user or service-account mode."""

    def __init__(self, site: Site, kit: ProductionKit):
        self.site = site
        self.kit = kit
        self.mode = "per-user"
        self.stack = kit.as_stack()

    def start_broker(self) -> None:
        self.kit.start("broker")
        wait_http(self.stack.broker_url + "/api/sessions", 60, self.kit.procs["broker"], "broker")

    def start_hub(self) -> None:
        self.kit.start("hub")
        wait_http(self.stack.hub_api_url, 90, self.kit.procs["hub"], "jupyterhub")

    def use_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        self.kit.stop("hub")
        self.kit.set_hub_overrides(_hub_overrides(self.site, mode))
        self.mode = mode
        self.start_hub()


@pytest.fixture(scope="module")
def site_hub(site, login_sshd, cpu_sif):
    bin_dir, image = _install_cluster_software(site, cpu_sif)
    # a scratch area per mode: an overlay made by alice's account is not the service account's
    scratch, svc_scratch = site.root / "scratch", site.root / "svc-scratch"
    for area in (scratch, svc_scratch):
        for d in ("log", "overlays", "nbgrader-exchange"):
            (area / d).mkdir(parents=True)
            os.chmod(area / d, 0o1777)
        os.chmod(area, 0o755)
    for d in ("slurm-out", "svc-homes"):
        (site.root / d).mkdir()
        os.chmod(site.root / d, 0o1777 if d == "slurm-out" else 0o755)
    shutil.chown(site.root / "svc-homes", SERVICE, SERVICE)
    place(site, **PLACEMENT)
    hub_ip = HOSTS["hub"]
    kit = ProductionKit(
        site.root / "hub",
        login_port=login_sshd.port,
        login_key=login_sshd.client_key,
        login_known_hosts=login_sshd.known_hosts,
        service=SERVICE,
        group=GROUP,
        addresses=Addresses(local=hub_ip, any=None, login=HOSTS["login"], hub=hub_ip),
        paths=[
            ("/opt/jupyterhub-hpc-broker/bin", str(bin_dir)),
            ("/etc/node-agent", str(site.root / "node-agent")),
        ],
        exec_prefix=site.prefix("hub"),
        hub_overrides=_hub_overrides(site, "per-user"),
    )
    kit.install()
    agent_conf = site.root / "node-agent"
    agent_conf.mkdir()
    (agent_conf / "hpc-config.toml").write_text(
        HPC_CONFIG.format(scratch=scratch, homes=site.homes, image=image, shared="false")
    )
    (agent_conf / "hpc-config-service.toml").write_text(
        HPC_CONFIG.format(scratch=svc_scratch, homes=site.root / "svc-homes", image=image, shared="true")
    )
    hub = SiteHub(site, kit)
    stack = hub.stack
    try:
        kit.start("proxy")
        wait_http(stack.proxy_api_url + "/api/routes", 30, kit.procs["proxy"], "CHP")
        hub.start_broker()
        hub.start_hub()
        firewall_hub(site, stack.ssh_port)
        for node in NODES:
            firewall_node(site, node, stack.ssh_port)
        yield hub
    finally:
        for name in ("hub", "broker", "proxy"):
            kit.stop(name)
        dest = Path(ARTIFACTS) / "site-logs" / "hub"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(kit.logs, dest)


def _stop_servers(hub: Hub) -> None:
    """Stop whatever server alice or bob still has (a failed test must not leave one behind
    for the next)."""
    for user in USERS:
        status, info = hub.api(hub.user_path(user))
        if status == 200 and info.get("servers"):
            hub.stop(user)


@pytest.fixture
def hub_stack(site_hub):
    """The production services in per-user mode (the shipped default of the kit); servers left
    running by the test are stopped after it."""
    site_hub.use_mode("per-user")
    yield site_hub.stack
    _stop_servers(Hub(site_hub.stack))


def _hub_ports(stack) -> dict[str, int]:
    return {
        "hub API": stack.hub_port,
        "CHP public": stack.public_port,
        "CHP API": stack.proxy_api_port,
        "broker API": stack.broker_api_port,
    }


def test_from_a_compute_node_only_the_broker_ssh_port_answers(site, hub_stack):
    """Real connects from each node to every port of the hub: all answer from the outside and
    from the login node, none from a node, except the broker's SSH port -- with the node's
    firewall and, when that is taken away, with the hub's alone. Nothing gets into a node except
    slurmctld's traffic from the login node."""
    hub_ip = HOSTS["hub"]
    for name, port in _hub_ports(hub_stack).items():
        assert can_connect(site, "login", hub_ip, port), f"{name} should answer on the hub's address"
        for node in NODES:
            assert not can_connect(site, node, hub_ip, port), f"{node} reached the {name} ({port})"
    for node in NODES:
        assert can_connect(site, node, hub_ip, hub_stack.ssh_port)
        # nothing inbound: not from the hub, not from outside, not to slurmd from anywhere but the login node
        for src in ("hub",):
            assert not can_connect(site, src, HOSTS[node], SLURMD_PORT)
            assert connect_errno(site, src, HOSTS[node], 22) != 0
        assert can_connect(site, "login", HOSTS[node], SLURMD_PORT)
        # and no other way out: not even to the login node's sshd or the outside address
        assert not can_connect(site, node, HOSTS["login"], 22)
        assert not can_connect(site, node, OUTSIDE_IP, 9)
        assert can_connect(site, node, HOSTS["login"], SLURMCTLD_PORT)
    # the hub's own rule holds without the node's: node1's firewall taken away for a moment
    site.run("node1", "nft", "delete", "table", "inet", "site")
    try:
        for name, port in _hub_ports(hub_stack).items():
            assert not can_connect(site, "node1", hub_ip, port), f"the hub let node1 reach the {name} ({port})"
        assert can_connect(site, "node1", hub_ip, hub_stack.ssh_port)
    finally:
        firewall_node(site, "node1", hub_stack.ssh_port)
    assert not can_connect(site, "node1", HOSTS["login"], 22)  # the node's rule is back
    # no name resolution needed: the nodes have no /etc/hosts entry for the hub
    assert "hub" not in Path("/etc/hosts").read_text().split()


def _spawn(hub: Hub, user: str, mode: str = "per-user") -> float:
    """Spawn and record the spawn-to-ready time in test-artifacts/site/timings.jsonl."""
    seconds = hub.spawn(user, timeout=240)
    record(test="spawn", user=user, mode=mode, seconds=round(seconds, 2))
    print(f"\n[site] spawn-to-ready for {user} ({mode}): {seconds:.1f} s")
    return seconds


def test_alice_spawns_on_a_compute_node(site, hub_stack, login_sshd):
    """alice's server runs in a Slurm job on node1, as alice, inside the image; the kernel
    names node1; the agent's one SSH connection comes from node1's address; the hub's commands
    all went over one SSH connection to the login node."""
    hub = Hub(hub_stack)
    accepted0 = login_sshd.accepted()
    _spawn(hub, "alice")
    status, _ = hub.through_proxy("alice", "api/status")
    assert status == 200
    _, result = hub.run_code(
        "alice",
        "import socket, os, sys; (socket.gethostname(), os.getuid(), sys.prefix, os.path.isdir('/.singularity.d'))",
    )
    assert result == repr(("node1", pwd.getpwnam("alice").pw_uid, "/opt/venv", True))
    session = hub.session_of("alice")
    squeue = site.run(
        "login",
        "squeue",
        "-h",
        "-j",
        session["job_id"],
        "-o",
        "%u %N %T",
        env=dict(os.environ, SLURM_CONF=_slurm_conf(site)),
    )
    assert squeue.stdout.split() == ["alice", "node1", "RUNNING"]
    conns = site.run("hub", "ss", "-tnH", "state", "established", f"( sport = :{hub_stack.ssh_port} )").stdout
    assert HOSTS["node1"] in conns, conns
    hub.stop("alice")
    assert login_sshd.accepted() - accepted0 <= 1  # submit, polls and cancel: one pooled connection


def _job_owner(mode: str, user: str) -> str:
    return user if mode == "per-user" else SERVICE


def _both_running_on_their_nodes(site: Site, hub: Hub, mode: str = "per-user", placement=None) -> None:
    """Each user's kernel runs on the node it was placed on, as the job's account, and Slurm
    shows each job RUNNING there under that account."""
    placement = placement or PLACEMENT
    conf = dict(os.environ, SLURM_CONF=_slurm_conf(site))
    for user in USERS:
        _, where = hub.run_code(user, "import socket, getpass; (socket.gethostname(), getpass.getuser())")
        assert where == repr((placement[user], _job_owner(mode, user)))
        job = hub.session_of(user)["job_id"]
        squeue = site.run("login", "squeue", "-h", "-j", job, "-o", "%u %N %T", env=conf).stdout.split()
        assert squeue == [_job_owner(mode, user), placement[user], "RUNNING"]


def _browser_login(stack, user: str, password: str) -> urllib.request.OpenerDirector:
    """Log in through the hub's login form (PAM) and open the user's own server, as a browser
    would: an opener with the cookies of the hub and of the user's server (after its OAuth round
    trip)."""
    opener = form_login(stack.public_url, user, password)
    with opener.open(stack.public_url + f"/user/{user}/api/status", timeout=60) as r:
        assert r.status == 200 and json.loads(r.read()).get("started"), r.url
    return opener


def _get_with(opener: urllib.request.OpenerDirector, url: str) -> tuple[int, str]:
    """GET *url* through *opener* (its cookies), following redirects: (final status, final URL)."""
    try:
        with opener.open(url, timeout=60) as r:
            return r.status, r.url
    except urllib.error.HTTPError as e:
        return e.code, e.url


#: run in bob's kernel on the node he shares with alice: her socket, her relay, his own relay
SHARED_NODE_PROBE = r"""
import json, os, socket, urllib.request, urllib.error
sock_path, relay_port = {sock!r}, {port!r}
out = {{}}
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sock_path)
    out["socket"] = "connected"
except OSError as e:
    out["socket"] = type(e).__name__
finally:
    s.close()
def get(url, token):
    req = urllib.request.Request(url, headers={{"Authorization": "token " + token}} if token else {{}})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return [r.status, json.loads(r.read()).get("name")]
    except urllib.error.HTTPError as e:
        return [e.code, e.read()[:80].decode(errors="replace")]
    except OSError as e:
        return [type(e).__name__, ""]
mine = os.environ["JUPYTERHUB_API_URL"]
token = os.environ["JUPYTERHUB_API_TOKEN"]
out["her_relay"] = get(f"http://127.0.0.1:{{relay_port}}/hub/api/user", None)
out["her_relay_with_my_token"] = get(f"http://127.0.0.1:{{relay_port}}/hub/api/user", token)
out["my_relay"] = get(mine + "/user", token)
json.dumps(out)
"""


def _server_of(site: Site, user_uid: int, job_id: str) -> tuple[int, str, int]:
    """(pid, unix socket path, relay port) of the jupyterhub-singleuser of *job_id*, found on
    the node as root (its pid is in the host's view; the path is the container's view)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid != user_uid:
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.decode().split("=", 1) for item in (d / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except OSError:
            continue
        sock = next((a.decode().split("=", 1)[1] for a in argv if a.startswith(b"--ServerApp.sock=")), None)
        if sock and environ.get("SLURM_JOB_ID") == job_id:
            port = int(environ["JUPYTERHUB_API_URL"].split("://127.0.0.1:", 1)[1].split("/", 1)[0])
            return int(d.name), sock, port
    raise AssertionError(f"no jupyterhub-singleuser of job {job_id} found")


@pytest.mark.parametrize("mode", ["per-user", "service"])
def test_alice_and_bob_at_once_on_different_nodes_and_apart(site, site_hub, mode):
    """Per-user submission (the shipped kit: sudo on the login node) and a shared service
    account: alice's and bob's servers run at the same time on node1 and node2, each job owned
    by its user's account (per-user) or by the service account (service). Bob's API token and
    bob's browser cookies get 403 on alice's server. Then bob's next server shares node1 with
    alice's: from his kernel, her notebook socket cannot be opened and her hub-API relay answers
    him 403 (his own token included), while his own relay serves him."""
    site_hub.use_mode(mode)
    stack = site_hub.stack
    hub = Hub(stack)
    place(site, **PLACEMENT)
    try:
        for user in USERS:
            _spawn(hub, user, mode=mode)
        _both_running_on_their_nodes(site, hub, mode)
        if mode == "service":  # one account, a home each under home_root
            _, home = hub.run_code("bob", "import os; (os.environ['HOME'], os.getcwd())")
            svc_home = str(site.root / "svc-homes" / "bob")
            assert home in (repr(("/home/jovyan", "/home/jovyan")), repr((svc_home, svc_home))), home

        # bob's token and bob's cookies: nothing of alice's
        token_of = {}
        for user in USERS:
            status, body = hub.api(hub.user_path(user) + "/tokens", "POST", {"expires_in": 600})
            assert status in (200, 201), body
            token_of[user] = body["token"]
        public = stack.public_url
        assert request(public + "/user/bob/api/status", token_of["bob"])[0] == 200
        assert request(public + "/user/alice/api/status", token_of["alice"])[0] == 200
        assert request(public + "/user/alice/api/status", token_of["bob"])[0] == 403
        assert request(public + "/user/alice/api/contents", token_of["bob"])[0] == 403
        bobs = _browser_login(stack, "bob", site.passwords["bob"])
        assert _get_with(bobs, public + "/user/bob/api/contents")[0] == 200
        for path in ("api/contents", "lab", "api/kernels"):
            status, url = _get_with(bobs, public + "/user/alice/" + path)
            assert status == 403 or (status == 200 and "/user/alice/" not in url), (path, status, url)

        # bob's next server on alice's node
        hub.stop("bob")
        shared = {"alice": "node1", "bob": "node1"}
        place(site, **shared)
        _spawn(hub, "bob", mode=mode)
        _both_running_on_their_nodes(site, hub, mode, placement=shared)
        alice_uid = pwd.getpwnam(_job_owner(mode, "alice")).pw_uid
        _pid, sock, port = _server_of(site, alice_uid, hub.session_of("alice")["job_id"])
        _, raw = hub.run_code("bob", SHARED_NODE_PROBE.format(sock=sock, port=port))
        probe = json.loads(ast.literal_eval(raw))  # the kernel's repr of a JSON string
        print(f"\n[site] {mode}: bob's probe on alice's node: {probe}")
        record(test="shared-node-probe", mode=mode, **probe)
        assert probe["socket"] in ("FileNotFoundError", "PermissionError", "ConnectionRefusedError"), probe
        assert probe["her_relay"][0] == 403 and "another user" in probe["her_relay"][1], probe
        assert probe["her_relay_with_my_token"][0] == 403, probe
        assert probe["my_relay"] == [200, "bob"], probe  # the probe itself can succeed
        assert hub.run_code("alice", "1 + 1")[1] == "2"  # and alice's server is untouched
    finally:
        place(site, **PLACEMENT)
        _stop_servers(hub)


def test_browser_alice_form_progress_lab_terminal_stop(site, hub_stack, chromium):
    """A real browser on the outside (the root namespace) opens the hub's public address: alice
    logs in, the options form offers the login node's partition (``sinfo`` there), the pending
    page shows the queue and the tunnel, JupyterLab opens, a cell names node1, a terminal says
    she is alice, and she stops her server from the home page."""
    hub = Hub(hub_stack)
    shots = os.path.join(ARTIFACTS, "site", "browser")
    os.makedirs(shots, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    events: list[dict] = []
    context.expose_binding("recordProgress", lambda _source, data: events.append(json.loads(data)))
    context.add_init_script(RECORD_PROGRESS)
    try:
        page = login(context, hub_stack, "alice", shots, password=site.passwords["alice"])
        page.goto(hub_stack.public_url + "/hub/spawn")
        page.wait_for_selector("#hpc-partition")
        assert [o.get_attribute("value") for o in page.locator("#hpc-partition option").all()] == ["batch"]
        shot(page, shots, "alice-02-options")
        t0 = time.monotonic()
        page.click("#spawn_form button[type=submit]")
        page.wait_for_url("**/hub/spawn-pending/**")
        page.wait_for_url("**/user/alice/lab**", timeout=240_000)
        record(test="browser-spawn", user="alice", seconds=round(time.monotonic() - t0, 2))
        messages = [e.get("message", "") for e in events]
        for want in ("submitted to the queue", "running on node1", "Tunnel connected from node1", "Server ready"):
            assert any(want in m for m in messages), (want, messages)
        page.wait_for_selector(".jp-LauncherCard", timeout=120_000)
        shot(page, shots, "alice-03-lab")
        try:
            run_in_new_notebook(page, "import socket; socket.gethostname()", "'node1'")
        finally:
            shot(page, shots, "alice-04-notebook")
        # a terminal from a new launcher: who am I?
        page.locator('[data-command="launcher:create"]').first.click()
        page.locator(".jp-LauncherCard").filter(has_text="Terminal").first.click()
        term = page.locator(".jp-Terminal .xterm-screen").first
        term.wait_for(timeout=60_000)
        term.click()
        # what the terminal prints is drawn on a canvas: let it write into the home instead
        proof = site.homes / "alice" / "terminal-whoami.txt"
        page.keyboard.type(f"whoami > ~/{proof.name}\n")
        wait_until(lambda: proof.exists() and proof.read_text().strip(), 60, 0.5, "the terminal's whoami")
        assert proof.read_text().strip() == "alice" and proof.stat().st_uid == pwd.getpwnam("alice").pw_uid
        shot(page, shots, "alice-05-terminal")
        page.goto(hub_stack.public_url + "/hub/home")
        page.click("#stop")
        wait_until(lambda: not hub.api(hub.user_path("alice"))[1].get("servers"), 90, 0.5, "server to stop")
        assert "/user/alice" not in hub.proxy_routes()
    finally:
        context.close()


def _agent_connected(hub: Hub, user: str) -> bool:
    return bool(hub.session_of(user).get("agent_connected"))


def _agent_logins(site: Site, hub: Hub, user: str) -> int:
    """How often the agent of *user*'s job logged in to the broker (its job output file)."""
    job = hub.session_of(user)["job_id"]
    out = site.root / "slurm-out" / f"jupyterhub-{user}-{job}.log"
    return out.read_text(errors="replace").count("connected to broker") if out.exists() else 0


def test_faults_broker_kill_hub_restart_link_down_sshd_restart(site, hub_stack, site_hub, login_sshd):
    """alice (node1) and bob (node2) running, a variable in each kernel, through four faults:
    the broker killed (SIGKILL) and restarted from its unit; the hub restarted; node1's link
    down for 30 s; the login node's sshd restarted. After each, both kernels still have their
    variables and both routes are the same; the link fault makes alice's agent log in again
    (its keepalive gives up within the 30 s); after the sshd restart the hub's polls, stops
    (scancel) and the next spawn go through one new pooled connection to the login node."""
    hub = Hub(hub_stack)
    kernels, routes = {}, {}
    for user in USERS:
        _spawn(hub, user)
        kernels[user], result = hub.run_code(user, f"x = {len(user)} * 7\nx")
        assert result == str(len(user) * 7)
        routes[user] = hub.proxy_routes()[f"/user/{user}"]["target"]

    def still_serving(what: str) -> None:
        for user in USERS:
            wait_until(lambda u=user: hub.through_proxy(u, "api/status")[0] == 200, 120, 0.5, f"{user} after {what}")
            assert hub.run_code(user, "x", kernel_id=kernels[user])[1] == str(len(user) * 7), (user, what)
            assert hub.proxy_routes()[f"/user/{user}"]["target"] == routes[user], (user, what)
            assert hub.api(hub.user_path(user))[1]["servers"][""]["ready"], (user, what)

    # 1. the broker killed and restarted (same SSH and API ports): the agents reconnect
    site_hub.kit.stop("broker", signal.SIGKILL)
    site_hub.start_broker()  # from its unit, as systemd's Restart= would
    for user in USERS:
        wait_until(lambda u=user: _agent_connected(hub, u), 120, 0.5, f"{user}'s agent back after the broker restart")
    still_serving("the broker restart")

    # 2. the hub restarted: it picks both servers up again
    site_hub.kit.stop("hub")
    site_hub.start_hub()
    still_serving("the hub restart")

    # 3. node1's link down for 30 s (both ends keep their sockets, as with a pulled cable): the
    #    agent's keepalive gives up and it logs in again once the link is back; the session keeps
    #    its port and its route
    logins = _agent_logins(site, hub, "alice")
    site_link(site, "node1", up=False)
    time.sleep(30)
    site_link(site, "node1", up=True)
    wait_until(lambda: _agent_logins(site, hub, "alice") > logins, 120, 0.5, "alice's agent to log in again")
    wait_until(lambda: _agent_connected(hub, "alice"), 120, 0.5, "agent connected after the link came back")
    still_serving("node1's link down")

    # 4. the login node's sshd restarted: the pooled connection drops and recovers
    accepted0 = login_sshd.accepted()
    login_sshd.stop()
    login_sshd.start()
    time.sleep(3 * SLURM_POLL_INTERVAL)  # a few polls over the new connection
    still_serving("the sshd restart")
    conf = dict(os.environ, SLURM_CONF=_slurm_conf(site))
    for user in USERS:
        job = hub.session_of(user)["job_id"]
        hub.stop(user)  # scancel through the login node
        wait_until(
            lambda j=job: (
                site.run("login", "squeue", "-h", "-t", "all", "-j", j, "-o", "%T", env=conf).stdout.strip()
                in ("CANCELLED", "COMPLETED", "")
            ),
            60,
            0.5,
            f"{user}'s job ended after the stop",
        )
    _spawn(hub, "bob")
    assert hub.run_code("bob", "import socket; socket.gethostname()")[1] == repr(PLACEMENT["bob"])
    hub.stop("bob")
    assert login_sshd.accepted() - accepted0 == 1  # exactly one new pooled connection


def test_alice_and_bob_spawned_at_the_same_moment(site, hub_stack):
    """Both spawns requested together: both servers make their first hub-API call through
    their agents' relays at about the same time, and both become ready on their nodes."""
    hub = Hub(hub_stack)
    for user in USERS:
        hub.api(hub.user_path(user), "POST")
    t0 = time.monotonic()
    for user in USERS:
        status, body = hub.api(hub.user_path(user) + "/server", "POST")
        assert status in (201, 202), body
    for user in USERS:
        wait_until(
            lambda u=user: hub.api(hub.user_path(u))[1]["servers"].get("", {}).get("ready"), 200, 0.5, f"{user} ready"
        )
    record(test="two-at-the-same-moment", seconds=round(time.monotonic() - t0, 2))
    _both_running_on_their_nodes(site, hub)
    for user in USERS:
        hub.stop(user)
