"""Helpers shared by the reliability suite (test_faults, test_hostile, test_load, test_cotenant).

``RELIABILITY_FULL=1`` selects the full sizes (long runs, many clients); the default sizes keep
the suite CI-sized. Results worth reporting are appended to ``test-artifacts/reliability.jsonl``
(one JSON object per line) so docs/reliability.md can be refreshed from real runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any

from harness import ARTIFACTS

FULL = os.environ.get("RELIABILITY_FULL") == "1"


def size(ci: Any, full: Any) -> Any:
    return full if FULL else ci


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def record(test: str, **figures: Any) -> None:
    """Append measured figures of one run to test-artifacts/reliability.jsonl."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "reliability.jsonl"), "a") as f:
        f.write(json.dumps({"test": test, "full": FULL, "at": time.time(), **figures}) + "\n")


def have_netns() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    name = f"rlprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run *argv*, output captured as text; *kw* go to :func:`subprocess.run` (``input``, ``env``, ``timeout``)."""
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, **kw)


class NodeNetwork:
    """A "compute node" network namespace joined to the host by a veth pair.

    host side ``hub_ip`` (10.x.y.1/30), node side ``node_ip`` (10.x.y.2/30). The node can only
    reach the hub-side address; cutting the link (``down``) leaves both ends' sockets intact,
    which is what a switch failure or a cable pull looks like to TCP.
    """

    def __init__(self, tag: int):
        self.ns = f"rlnode{os.getpid() % 10000}x{tag}"
        self.host_if = f"rlh{os.getpid() % 10000}x{tag}"
        self.node_if = f"rln{os.getpid() % 10000}x{tag}"
        octet = 100 + (os.getpid() + tag) % 100
        self.hub_ip = f"10.{octet}.{tag}.1"
        self.node_ip = f"10.{octet}.{tag}.2"

    def create(self) -> NodeNetwork:
        self.destroy()
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if)
        sh("ip", "link", "set", self.node_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.hub_ip}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.node_ip}/30", "dev", self.node_if)
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.node_if, "up")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def link(self, up: bool) -> None:
        """Cut or restore the node's link (host side: the node's end stays configured)."""
        sh("ip", "link", "set", self.host_if, "up" if up else "down")
        if up:  # the address stays, but make sure the route is back before we go on
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.hub_ip in sh("ip", "-4", "addr", "show", "dev", self.host_if, check=False).stdout:
                    break
                time.sleep(0.05)

    def destroy(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
