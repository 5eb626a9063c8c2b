"""Outbound-only compute node on real Slurm.

The Slurm job starts the node agent inside a network namespace (a "compute node" joined to the
hub host by a veth pair) whose firewall (nftables, inside the namespace) lets out only TCP to the
broker's SSH port on the hub-side address, and lets in nothing but replies. No inbound
connection to the node is possible, the node has no route to the hub's loopback services (hub
API, CHP), and there is no /etc/hosts entry: the spawn still works, because everything crosses
the one SSH connection the agent opens out.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from devstack.stack import free_port

from e2e import Hub
from harness import running_stack, tool_path
from reliability import NodeNetwork, have_netns, sh
from slurm_cluster import hub_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("cancel_leftover_jobs"),
]


def _firewall(net: NodeNetwork, ssh_port: int) -> None:
    rules = f"""
table inet node {{
    chain out {{
        type filter hook output priority 0; policy drop;
        oif "lo" accept
        ip daddr {net.hub_ip} tcp dport {ssh_port} accept
    }}
    chain in {{
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
    }}
}}
"""
    subprocess.run([*net.prefix(), "nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)


def _node_can_connect(net: NodeNetwork, host: str, port: int) -> bool:
    code = (
        f"import socket,sys\ns=socket.socket();s.settimeout(2)\n"
        f"sys.exit(0 if s.connect_ex(({host!r},{port}))==0 else 1)"
    )
    return subprocess.run([*net.prefix(), "python3", "-c", code], capture_output=True, timeout=20).returncode == 0


@pytest.fixture(scope="module")
def node_net():
    if not have_netns() or not shutil.which("nft"):
        pytest.skip("needs root, `ip netns` and nftables (make test installs them)")
    net = NodeNetwork(11).create()
    yield net
    net.destroy()


def test_spawn_from_an_outbound_only_node(node_net, tmp_path_factory, slurm_cluster):
    net = node_net
    workdir = str(tmp_path_factory.mktemp("netns-slurm"))
    # a listener on the hub-side address that is NOT the broker: the node must not reach it
    decoy = socket.socket()
    decoy.bind((net.hub_ip, free_port()))
    decoy.listen()
    try:
        with running_stack(
            workdir,
            path=tool_path(),
            logs="e2e-slurm-netns-logs",
            poll_interval=2,
            reconcile_interval=1.0,
            broker_ssh_host=net.hub_ip,
            spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
            extra_hub_config=hub_config(
                workdir, "c.SlurmBrokerSpawner.agent_command = " + repr(" ".join(net.prefix()) + " node-agent run --")
            ),
        ) as stack:
            _firewall(net, stack.ssh_port)  # the broker's SSH port is known once it has bound it
            assert not _node_can_connect(net, net.hub_ip, decoy.getsockname()[1])
            assert not _node_can_connect(net, "127.0.0.1", stack.hub_port)  # the hub API is not reachable
            assert _node_can_connect(net, net.hub_ip, stack.ssh_port)  # only the broker's SSH port
            # nothing gets in: the host cannot open a connection to the node
            probe = socket.socket()
            probe.settimeout(2)
            assert probe.connect_ex((net.node_ip, 22)) != 0
            probe.close()

            hub = Hub(stack)
            user = "outbound"
            hub.spawn(user, timeout=180)
            status, _ = hub.through_proxy(user, "api/status")
            assert status == 200
            _, result = hub.run_code(user, "1+1")
            assert result == "2"
            session = hub.session_of(user)
            assert session["job_id"] and session["agent_connected"]
            # the agent's SSH connection comes from the node's address: it really crossed the veth
            conns = sh("ss", "-tnH", "state", "established", f"( sport = :{stack.ssh_port} )").stdout
            assert net.node_ip in conns, conns
            hub.stop(user)
    finally:
        decoy.close()
