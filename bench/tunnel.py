"""Part 1: one HTTP server behind four transports, each also behind a real CHP.

- ``direct``   the server on 127.0.0.1 TCP
- ``tunnel``   a real ``broker serve`` + ``node-agent run -- python -m bench.nodeserver`` enrolled
               with a session created through the broker's REST API (the spawner's steps);
               the server listens on the agent's private unix socket
- ``openssh``  a real sshd on 127.0.0.1 (own config, keys) and ``ssh -R 127.0.0.1:P:SOCKET``
               from the "node" side to the same server code on a unix socket; same cipher
- ``chp_*``    the same three through one configurable-http-proxy (the tunnel's route is the
               one the broker published itself)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from . import client
from .procs import BrokerProc, ChpProc, Procs, bin_path, free_port, wait_port

CIPHER = "aes128-gcm@openssh.com"
BENCH_USER = "bench"


def _start_sshd(procs: Procs, tmp: str) -> tuple[int, str]:
    """sshd on 127.0.0.1 with its own config; returns (port, client key path, known_hosts)."""
    d = os.path.join(tmp, "sshd")
    os.makedirs(d, mode=0o700, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)], check=True)
    with open(os.path.join(d, "client_key.pub")) as src, open(os.path.join(d, "authorized_keys"), "w") as dst:
        dst.write(src.read())
    port = free_port()
    with open(os.path.join(d, "host_key.pub")) as f:
        host_pub = " ".join(f.read().split()[:2])
    with open(os.path.join(d, "known_hosts"), "w") as f:
        f.write(f"[127.0.0.1]:{port} {host_pub}\n")
    conf = os.path.join(d, "sshd_config")
    with open(conf, "w") as f:
        f.write(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
Ciphers {CIPHER}
LogLevel ERROR
""")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege-separation directory sshd insists on
    proc = procs.start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", conf])
    wait_port(port, 15, proc, "sshd")
    return port, d


def _ssh_version() -> str:
    r = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip()


class TunnelBench:
    def __init__(self, tmp: str, procs: Procs, log: Callable[[str], None]):
        self.tmp = tmp
        self.procs = procs
        self.log = log
        self.paths: dict[str, tuple[int, str]] = {}  # name -> (port, prefix)
        self.info: dict[str, Any] = {}

    def setup(self) -> None:
        py = sys.executable
        # (a) direct
        p = self.procs.start("server-direct", [py, "-m", "bench.nodeserver", "--port=0"], stdout_pipe=True)
        line = p.stdout.readline().decode()  # type: ignore[union-attr]
        direct_port = int(line.split()[1])
        self.paths["direct"] = (direct_port, "/")

        # CHP first: the broker publishes the tunnel's route to it
        chp = ChpProc(self.procs)
        chp.start()
        self.chp = chp

        # (b) our tunnel: broker subprocess, session via REST, real node agent
        broker = BrokerProc(self.procs, os.path.join(self.tmp, "broker"), chp.api_url, chp.token)
        broker.start()
        routespec = f"/user/{BENCH_USER}/"
        status, sess = broker.api(
            "/api/sessions", "POST", {"user": BENCH_USER, "server_name": "", "routespec": routespec}
        )
        if status != 201:
            raise RuntimeError(f"broker: create session: {status} {sess}")
        rundir = os.path.join(self.tmp, "agent-runtime")
        os.makedirs(rundir, mode=0o700, exist_ok=True)
        env = dict(
            os.environ,
            BROKER_SSH_HOST=sess["ssh"]["host"],
            BROKER_SSH_PORT=str(sess["ssh"]["port"]),
            BROKER_HOST_KEY=sess["ssh"]["host_key"],
            BROKER_SESSION_ID=sess["id"],
            BROKER_ENROL_SECRET=sess["secret"],
            JUPYTERHUB_API_URL=broker.hub_api_url,
            JUPYTERHUB_SERVICE_PREFIX=routespec,
            NODE_AGENT_RUNTIME_DIR=rundir,
            NODE_AGENT_JOB_ID="bench",
        )
        self.procs.start("agent", [bin_path("node-agent"), "run", "--", py, "-m", "bench.nodeserver"], env=env)
        status, s = broker.api(f"/api/sessions/{sess['id']}/wait?state=ready&timeout=60")
        if status != 200 or s.get("state") != "ready":
            raise RuntimeError(f"agent did not get ready: {status} {s}\n{self.procs.log_tail('agent')}")
        self.paths["tunnel"] = (int(s["port"]), routespec)
        deadline = time.monotonic() + 20
        while (
            routespec.rstrip("/") not in chp.routes() and routespec not in chp.routes()
        ):  # the broker publishes the route itself
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not publish the CHP route")
            time.sleep(0.05)

        # (c) OpenSSH: sshd (hub side) + ssh -R from the node side to a unix socket server
        fwd_port = start_openssh(self.procs, self.tmp)
        self.paths["openssh"] = (fwd_port, "/")

        # (d) each behind CHP
        chp.add_route("/direct", f"http://127.0.0.1:{direct_port}")
        chp.add_route("/openssh", f"http://127.0.0.1:{fwd_port}")
        self.paths["chp_direct"] = (chp.port, "/direct/")
        self.paths["chp_tunnel"] = (chp.port, routespec)
        self.paths["chp_openssh"] = (chp.port, "/openssh/")
        self.info["openssh_version"] = _ssh_version()
        for port, prefix in self.paths.values():  # every path answers before we time anything
            client.keepalive_latency(port, prefix, 5)

    def run(self, nbytes: int, n_keepalive: int, n_newconn: int, rps_seconds: float, rounds: int) -> dict[str, Any]:
        res: dict[str, dict[str, Any]] = {name: {} for name in self.paths}
        names = list(self.paths)
        # interleave paths within each metric so slow drift hits all of them alike
        for metric in ("download", "upload"):
            fn = client.download if metric == "download" else client.upload
            for _round in range(rounds):
                for name in names:
                    port, prefix = self.paths[name]
                    v = fn(port, prefix, nbytes)
                    res[name].setdefault(f"{metric}_runs_mb_s", []).append(round(v, 1))
                    self.log(f"  {metric} {name}: {v:.0f} MB/s")
        for name in names:
            port, prefix = self.paths[name]
            ka = client.keepalive_latency(port, prefix, n_keepalive)
            nc = client.newconn_latency(port, prefix, n_newconn)
            res[name].update(
                keepalive_p50_ms=round(ka["p50_ms"], 3),
                keepalive_p99_ms=round(ka["p99_ms"], 3),
                newconn_p50_ms=round(nc["p50_ms"], 3),
                newconn_p99_ms=round(nc["p99_ms"], 3),
            )
            self.log(
                f"  latency {name}: keep-alive p50 {ka['p50_ms']:.2f} ms p99 {ka['p99_ms']:.2f} ms, new-conn p50 {nc['p50_ms']:.2f} ms"
            )
        for name in names:
            port, prefix = self.paths[name]
            r = client.rps(port, prefix, 32, rps_seconds)
            res[name].update(rps_32=round(r["rps"], 0), rps_errors=r["non_2xx"] or r["socket_errors"] or 0)
            self.log(f"  rps {name}: {r['rps']:.0f}")
        for name in names:
            for metric in ("download", "upload"):
                runs = res[name][f"{metric}_runs_mb_s"]
                res[name][f"{metric}_mb_s"] = max(runs)
        return res


def start_openssh(procs: Procs, tmp: str) -> int:
    """sshd on loopback (hub side) and ``ssh -R`` from the "node" to a unix-socket server with the
    same cipher as ours; returns the forwarded port once it accepts connections."""
    sshd_port, d = _start_sshd(procs, tmp)
    sock = os.path.join(d, "ossh-server.sock")
    procs.start("server-openssh", [sys.executable, "-m", "bench.nodeserver", f"--ServerApp.sock={sock}"])
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise RuntimeError("openssh-side server did not start")
        time.sleep(0.02)
    return forward_openssh(procs, sshd_port, d, sock)


def forward_openssh(procs: Procs, sshd_port: int, d: str, sock: str) -> int:
    """``ssh -R 127.0.0.1:P:SOCK`` to the sshd of :func:`_start_sshd` (*d*: its directory); returns P
    once it accepts connections."""
    fwd_port = free_port()
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    ssh = procs.start(
        "ssh-R",
        [
            "ssh",
            "-N",
            "-F",
            "/dev/null",
            "-i",
            os.path.join(d, "client_key"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={d}/known_hosts",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"Ciphers={CIPHER}",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ServerAliveInterval=15",
            "-p",
            str(sshd_port),
            "-R",
            f"127.0.0.1:{fwd_port}:{sock}",
            f"{user}@127.0.0.1",
        ],
    )
    wait_port(fwd_port, 15, ssh, "ssh -R")
    return fwd_port
