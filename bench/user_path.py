"""Part 6: the path users feel — a real ``jupyterhub-singleuser`` behind three transports, each
behind one real configurable-http-proxy.

One real hub (``devstack.stack.Stack``: CHP + ``broker serve`` + JupyterHub with
``LocalBrokerSpawner``) spawns the user's server through its REST API: ``node-agent run`` starts
``jupyterhub-singleuser`` on its private unix socket and the hub's CHP routes ``/user/NAME/`` to the
broker's session port, through the agent's SSH tunnel. That **same server process** is then also
reached two other ways, each through a CHP of its own with the same route:

- ``tunnel``   the hub's CHP → broker → SSH channel → node agent → the server's unix socket
- ``openssh``  a second CHP → ``ssh -R 127.0.0.1:P:SOCKET`` to a real sshd (same AES-GCM cipher)
- ``direct``   a third CHP → the server's unix socket (``unix+http://``)

Figures, all with the user's API token (``Authorization: token``):

- kernel execute round trip: one ipykernel per path, its websocket (``/api/kernels/ID/channels``)
  through that path; ``execute_request`` of ``1+1`` until both ``execute_reply`` and the kernel's
  ``idle`` status for it arrived; p50/p99 over N runs per path (after 20 warm-up runs), the paths
  interleaved execute by execute;
- download of a 256 MiB file through ``/files/`` (one GET, head to last byte) and requests/s of
  ``GET /api/contents`` at 32 connections (``wrk``, else the asyncio client), paths interleaved round
  by round; the best round counts.

Ratios vs the OpenSSH path: download and req/s tunnel ÷ OpenSSH; kernel round trip *added* =
(tunnel p50 − direct p50) ÷ (OpenSSH p50 − direct p50).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from websockets.sync.client import connect as ws_connect

from . import client
from .procs import ChpProc, Procs, http_json
from .spawn import _api, _start_stack, spawn_once, stop_once
from .tunnel import _start_sshd, forward_openssh

PATHS = ("direct", "tunnel", "openssh")
FILE_NAME = "bench-user-path.bin"


def _server_socket(workdir: str, timeout: float = 30) -> tuple[int, str]:
    """(pid, unix socket) of the spawned jupyterhub-singleuser: the process with ``--ServerApp.sock=``
    whose command line, environment or working directory mentions this stack's work directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                socks = [a.split("=", 1)[1] for a in argv if a.startswith("--ServerApp.sock=")]
                if not socks or not os.path.exists(socks[0]):
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().decode(errors="replace")
                where = " ".join(argv) + env + os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if workdir in where:
                return int(pid), socks[0]
        time.sleep(0.2)
    raise RuntimeError(f"no jupyterhub-singleuser with --ServerApp.sock for {workdir}")


def _request(port: int, path: str, token: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    return http_json(f"http://127.0.0.1:{port}{path}", token, method, body, scheme="token", timeout=60)


class KernelClient:
    """One kernel's websocket through one path; :meth:`execute` times one ``1+1`` round trip."""

    def __init__(self, port: int, prefix: str, token: str):
        self.port, self.prefix, self.token = port, prefix, token
        status, k = _request(port, f"{prefix}api/kernels", token, "POST", {"name": "python3"})
        if status != 201:
            raise RuntimeError(f"start kernel via :{port}: {status} {k}")
        self.kernel_id = k["id"]
        self.session = uuid.uuid4().hex
        self._ws_cm = ws_connect(
            f"ws://127.0.0.1:{port}{prefix}api/kernels/{self.kernel_id}/channels?session_id={self.session}",
            additional_headers={"Authorization": f"token {token}"},
            max_size=None,
            open_timeout=60,
        )
        self.ws = self._ws_cm.__enter__()

    def execute(self, code: str = "1+1") -> float:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "username": "bench",
                "session": self.session,
                "msg_type": "execute_request",
                "version": "5.3",
                "date": "",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            "channel": "shell",
            "buffers": [],
        }
        t0 = time.perf_counter()
        self.ws.send(json.dumps(msg))
        replied = idle = False
        result = None
        while not (replied and idle):
            m = json.loads(self.ws.recv(timeout=60))
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "execute_reply":
                replied = True
            elif t == "execute_result":
                result = m["content"]["data"].get("text/plain")
            elif t == "status" and m["content"].get("execution_state") == "idle":
                idle = True
        dt = time.perf_counter() - t0
        if code == "1+1" and result != "2":
            raise RuntimeError(f"kernel via :{self.port} answered {result!r}")
        return dt * 1000

    def close(self) -> None:
        try:
            self._ws_cm.__exit__(None, None, None)
        finally:
            _request(self.port, f"{self.prefix}api/kernels/{self.kernel_id}", self.token, "DELETE")


def kernel_rtt(kernels: dict[str, KernelClient], n: int) -> dict[str, dict[str, float]]:
    """p50/p99 ms of *n* ``1+1`` round trips per path, interleaved execute by execute (rotating who
    goes first), so a change in the machine's load hits every path alike; 20 warm-up runs each."""
    names = list(kernels)
    for _ in range(20):
        for name in names:
            kernels[name].execute()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(kernels[name].execute())
    out = {}
    for name, t in times.items():
        t.sort()
        out[name] = {"p50_ms": statistics.median(t), "p99_ms": t[min(n - 1, round(0.99 * (n - 1)))], "n": n}
    return out


def run(
    tmp: str, log: Callable[[str], None], rounds: int = 2, n_kernel: int = 500, file_mib: int = 256, rps_s: float = 5
) -> dict[str, Any]:
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    procs = Procs(os.path.join(tmp, "user-logs"))
    stack = _start_stack(os.path.join(tmp, "stack-user"), log)
    kernels: dict[str, KernelClient] = {}
    try:
        spawn_once(stack, user)
        prefix = f"/user/{quote(user)}/"
        notebooks = os.path.join(stack.workdir, "notebooks")
        pid, sock = _server_socket(stack.workdir)
        status, tok = _api(stack, f"/users/{quote(user)}/tokens", "POST")
        if status != 201:
            raise RuntimeError(f"user token: {status} {tok}")
        token = tok["token"]
        nbytes = file_mib * 1024 * 1024
        with open(os.path.join(notebooks, FILE_NAME), "wb") as f:
            for _ in range(file_mib):
                f.write(os.urandom(1024 * 1024))
        sshd_port, d = _start_sshd(procs, os.path.join(tmp, "user-path"))  # not part 1's sshd directory
        ports = {"tunnel": stack.public_port}
        fwd = forward_openssh(procs, sshd_port, d, sock)
        for name, target in (("openssh", f"http://127.0.0.1:{fwd}"), ("direct", "unix+http://" + quote(sock, safe=""))):
            chp = ChpProc(procs, f"chp-user-{name}")
            chp.start()
            chp.add_route(prefix, target)
            ports[name] = chp.port
        headers = {"Authorization": f"token {token}"}
        for name in PATHS:  # every path works (and the server's token cache is warm)
            status, body = _request(ports[name], f"{prefix}api/contents", token)
            if status != 200:
                raise RuntimeError(f"GET api/contents via {name}: {status} {body}")
            kernels[name] = KernelClient(ports[name], prefix, token)
        log(f"user path: server pid {pid}, ports {ports}")
        log(f"  user path: {n_kernel} kernel round trips per path, interleaved")
        rtt = kernel_rtt(kernels, n_kernel)
        log(
            "  user path kernel p50/p99 ms: "
            + "; ".join(f"{n} {rtt[n]['p50_ms']:.2f}/{rtt[n]['p99_ms']:.2f}" for n in PATHS)
        )
        res: dict[str, dict[str, list[float]]] = {n: {} for n in PATHS}
        for r in range(rounds):
            order = list(PATHS[r % 3 :] + PATHS[: r % 3])
            for name in order:
                port = ports[name]
                dl = client.download(port, prefix, nbytes, path=f"files/{FILE_NAME}", headers=headers)
                rp = client.rps(port, prefix, 32, rps_s, path="api/contents", headers=headers)
                if rp.get("non_2xx"):
                    raise RuntimeError(f"GET api/contents via {name}: {rp['non_2xx']} non-2xx responses")
                res[name].setdefault("download_mb_s_runs", []).append(round(dl, 1))
                res[name].setdefault("rps_32_runs", []).append(round(rp["rps"]))
            log(
                f"  user path round {r + 1}/{rounds}: "
                + "; ".join(
                    f"{n} dl {res[n]['download_mb_s_runs'][-1]:.0f} rps {res[n]['rps_32_runs'][-1]:.0f}" for n in PATHS
                )
            )
        out: dict[str, Any] = {"user": user, "file_mib": file_mib, "kernel_runs": n_kernel, "rounds": rounds}
        for n in PATHS:
            r_ = res[n]
            out[n] = {
                **r_,
                "kernel_p50_ms": round(rtt[n]["p50_ms"], 3),
                "kernel_p99_ms": round(rtt[n]["p99_ms"], 3),
                # best round of the throughput figures (as in part 1)
                "download_mb_s": max(r_["download_mb_s_runs"]),
                "rps_32": max(r_["rps_32_runs"]),
            }
        return out
    finally:
        for kc in kernels.values():
            try:
                kc.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        try:
            stop_once(stack, user)
        except Exception:  # noqa: BLE001
            pass
        stack.stop()
        procs.stop_all()


def ratios(u: dict[str, Any]) -> dict[str, float | None]:
    t, o, d = u["tunnel"], u["openssh"], u["direct"]
    added_o = o["kernel_p50_ms"] - d["kernel_p50_ms"]
    return {
        "user_kernel_rtt_added_ratio_vs_openssh": round((t["kernel_p50_ms"] - d["kernel_p50_ms"]) / added_o, 3)
        if added_o > 0
        else None,  # OpenSSH added nothing measurable: no ratio
        "user_download_ratio_vs_openssh": round(t["download_mb_s"] / o["download_mb_s"], 3),
        "user_rps_ratio_vs_openssh": round(t["rps_32"] / o["rps_32"], 3),
    }


def main() -> int:
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.user_path")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kernel-runs", type=int, default=500)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-user-")
    try:
        u = run(
            tmp,
            lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True),
            args.rounds,
            args.kernel_runs,
            args.mib,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    u["ratios"] = ratios(u)
    print(
        json.dumps(
            {n: {k: v for k, v in u[n].items() if not k.endswith("_runs")} for n in PATHS} | u["ratios"], indent=1
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(u, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
