"""Tunnel data path only: profile it, and A/B data-path parameters within one run.

``python -m bench.tunnel_ab`` starts one OpenSSH ``ssh -R`` path and one broker + node agent
pair *per variant* (a real ``broker serve`` and ``node-agent run -- python -m bench.nodeserver``,
as in part 1 of ``python -m bench``), then measures them interleaved, round by round, so drift
on a shared machine hits every variant alike. Variants are JSON objects applied at interpreter
start-up by a ``sitecustomize`` put on ``PYTHONPATH`` of that pair only (the notebook server the
agent starts does not inherit it):

- ``{"window": N, "pktsize": N}`` — ``CHANNEL_WINDOW`` / ``CHANNEL_MAX_PKTSIZE`` of
  ``wire.contract`` (read by both sides when they open or accept a channel)
- ``{"read_size": N}`` — asyncio's per-``recv`` size of socket transports (default 256 KiB)
- ``{"feed": N}`` — receive side: hand asyncssh's parser at most N bytes of each ``recv()`` at a
  time (asyncssh keeps its input in an immutable ``bytes`` buffer and re-slices the rest of it
  twice per packet, so a 256 KiB read of 8 packets costs ~2 MiB of copies)
- ``{"nolog": true}`` — skip asyncssh's per-packet log formatting (``SSHPacketLogger._log_packet``
  builds the packet's name and size text before its logger drops it below debug level 3)
- ``{"stock_asyncssh": true}`` — leave asyncssh as it is: ``wire.asyncssh_compat`` stays off
  (by default both ends install it and drop the per-packet empty ``MSG_IGNORE`` under AEAD)
- ``{"uvloop": true}`` — uvloop's event loop policy (needs ``uvloop`` installed); ``"broker"`` or
  ``"node-agent"`` for that side only

Examples::

    python -m bench.tunnel_ab --variant base='{}' --variant big='{"window":8388608,"pktsize":262144}'
    python -m bench.tunnel_ab --variant base='{}' --profile bench/results/profiles --rounds 0

``--profile DIR`` samples the first variant's broker and agent with ``py-spy record --idle
--format raw`` during a bulk phase (downloads + uploads) and a request phase (keep-alive GETs
and ``wrk`` at 32 connections), writes ``DIR/{broker,agent}-{bulk,requests}.txt`` (collapsed
stacks) and ``DIR/summary.md`` (top frames by self time, % of samples).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import client
from .procs import BrokerProc, ChpProc, Procs, bin_path
from .tunnel import start_openssh as start_openssh_forward

SITECUSTOMIZE = r"""
import json, os
_v = json.loads(os.environ.pop("BENCH_TUNNEL_VARIANT", "") or "{}")
if _v.get("window") or _v.get("pktsize"):
    import wire.contract as _wc
    if _v.get("window"):
        _wc.CHANNEL_WINDOW = _v["window"]
    if _v.get("pktsize"):
        _wc.CHANNEL_MAX_PKTSIZE = _v["pktsize"]
if _v.get("stock_asyncssh"):
    import wire.asyncssh_compat as _c
    _c._state = "off: stock asyncssh (bench variant)"
if _v.get("feed"):
    from asyncssh.connection import SSHConnection as _C
    _n = int(_v["feed"])
    def _fed(self, data, datatype=None, _n=_n):
        if len(data) <= _n:
            self._inpbuf += data
            self._recv_data()
            return
        mv = memoryview(data)
        for i in range(0, len(data), _n):
            self._inpbuf += mv[i : i + _n]
            self._recv_data()
    _C.data_received = _fed
if _v.get("nolog"):
    from asyncssh.packet import SSHPacketLogger as _L
    def _quiet(self, msg, pkttype, pktid, packet, note, _orig=_L._log_packet):
        if self.logger._debug_level >= 3:
            _orig(self, msg, pkttype, pktid, packet, note)
    _L._log_packet = _quiet
if _v.get("read_size"):
    import asyncio.selector_events as _se
    _se._SelectorSocketTransport.max_size = _v["read_size"]
import sys as _sys
if _v.get("uvloop") is True or (_v.get("uvloop") and _v["uvloop"] in _sys.argv[0]):
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pair:
    """One broker + node agent (+ bench.nodeserver) with a variant applied."""

    def __init__(self, procs: Procs, tmp: str, chp: ChpProc, name: str, variant: dict[str, Any], sitedir: str):
        self.name = name
        env_extra = {
            "BENCH_TUNNEL_VARIANT": json.dumps(variant),
            "PYTHONPATH": os.pathsep.join(p for p in (sitedir, os.environ.get("PYTHONPATH", "")) if p),
        }
        saved = dict(os.environ)
        os.environ.update(env_extra)  # BrokerProc takes its env from os.environ
        try:
            self.broker = BrokerProc(
                procs, os.path.join(tmp, f"broker-{name}"), chp.api_url, chp.token, name=f"broker-{name}"
            )
            self.broker.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        user = f"bench-{name}"
        routespec = f"/user/{user}/"
        status, sess = self.broker.api(
            "/api/sessions", "POST", {"user": user, "server_name": "", "routespec": routespec}
        )
        if status != 201:
            raise RuntimeError(f"broker {name}: create session: {status} {sess}")
        rundir = os.path.join(tmp, f"agent-runtime-{name}")
        os.makedirs(rundir, mode=0o700, exist_ok=True)
        env = dict(
            os.environ,
            **env_extra,
            BROKER_SSH_HOST=sess["ssh"]["host"],
            BROKER_SSH_PORT=str(sess["ssh"]["port"]),
            BROKER_HOST_KEY=sess["ssh"]["host_key"],
            BROKER_SESSION_ID=sess["id"],
            BROKER_ENROL_SECRET=sess["secret"],
            JUPYTERHUB_API_URL=self.broker.hub_api_url,
            JUPYTERHUB_SERVICE_PREFIX=routespec,
            NODE_AGENT_RUNTIME_DIR=rundir,
            NODE_AGENT_JOB_ID="bench",
        )
        self.agent = procs.start(
            f"agent-{name}", [bin_path("node-agent"), "run", "--", sys.executable, "-m", "bench.nodeserver"], env=env
        )
        status, s = self.broker.api(f"/api/sessions/{sess['id']}/wait?state=ready&timeout=60")
        if status != 200 or s.get("state") != "ready":
            raise RuntimeError(f"agent {name} did not get ready: {status} {s}\n{procs.log_tail(f'agent-{name}')}")
        self.port, self.prefix = int(s["port"]), routespec
        client.keepalive_latency(self.port, self.prefix, 5)


def start_openssh(procs: Procs, tmp: str) -> int:
    fwd_port = start_openssh_forward(procs, tmp)
    client.keepalive_latency(fwd_port, "/", 5)
    return fwd_port


# -- profiles ---------------------------------------------------------------------------------
def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    short = (
        "/".join(path.split("/")[-2:]) if "site-packages" in path or "/lib/python" in path else os.path.basename(path)
    )
    return f"{m.group(1)} ({short})"


def summarize_raw(path: str, top: int = 15) -> dict[str, Any]:
    """Self (leaf) and inclusive sample counts per frame from a py-spy raw (collapsed) file."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            count = int(n)
            if "run_forever" not in stack:  # only the event-loop thread (not idle executor threads)
                continue
            frames = [_frame_name(x) for x in stack.split(";")]
            total += count
            if not frames:
                continue
            leaf = frames[-1]
            if leaf.startswith("EpollSelector.select"):
                idle += count
            self_c[leaf] += count
            for fr in set(frames):
                incl_c[fr] += count
    pct = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "idle_pct": pct(idle),
        "self": [(k, pct(v)) for k, v in self_c.most_common(top)],
        "inclusive": [(k, pct(v)) for k, v in incl_c.most_common() if v < total][:top],
    }


def pyspy_record(pid: int, out: str, rate: int) -> subprocess.Popen[Any]:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--idle",
            "--nonblocking",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def pyspy_stop(p: subprocess.Popen[Any]) -> None:
    p.send_signal(signal.SIGINT)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def profile_table(s: dict[str, Any]) -> list[str]:
    """Markdown tables (self and inclusive %) of one :func:`summarize_raw` result."""
    lines = ["| self % | frame |", "|---:|---|"] + [f"| {p} | `{k}` |" for k, p in s["self"]]
    lines += ["", "| inclusive % | frame |", "|---:|---|"] + [f"| {p} | `{k}` |" for k, p in s["inclusive"]]
    return lines


def profile(pair: Pair, outdir: str, nbytes: int, rate: int) -> dict[str, Any]:
    os.makedirs(outdir, exist_ok=True)
    phases: dict[str, Any] = {}

    def bulk() -> dict[str, Any]:
        d = [client.download(pair.port, pair.prefix, nbytes) for _ in range(3)]
        u = [client.upload(pair.port, pair.prefix, nbytes) for _ in range(3)]
        return {"download_mb_s": [round(x) for x in d], "upload_mb_s": [round(x) for x in u]}

    def requests() -> dict[str, Any]:
        ka = client.keepalive_latency(pair.port, pair.prefix, 3000)
        r = client.rps(pair.port, pair.prefix, 32, 8)
        return {"keepalive_p50_ms": round(ka["p50_ms"], 3), "rps_32": round(r["rps"])}

    for phase, fn in (("bulk", bulk), ("requests", requests)):
        spies = {
            who: pyspy_record(pid, os.path.join(outdir, f"{who}-{phase}.txt"), rate)
            for who, pid in (("broker", pair.broker.proc.pid), ("agent", pair.agent.pid))
        }  # type: ignore[union-attr]
        time.sleep(1.0)  # let py-spy attach
        t0 = time.monotonic()
        figures = fn()
        wall = time.monotonic() - t0
        for p in spies.values():
            pyspy_stop(p)
        phases[phase] = {"wall_s": round(wall, 1), **figures}
        for who in spies:
            phases[phase][who] = summarize_raw(os.path.join(outdir, f"{who}-{phase}.txt"))
        log(f"profile {phase}: {figures} in {wall:.1f}s")
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(phases, f, indent=1)
    lines = ["# Tunnel data-path profile (py-spy record --idle, % of all samples)", ""]
    for phase, ph in phases.items():
        figs = {k: v for k, v in ph.items() if k not in ("broker", "agent")}
        lines += [f"## {phase}: {figs}", ""]
        for who in ("broker", "agent"):
            s = ph[who]
            lines += [f"### {who}: {s['samples']} samples, event-loop thread only; idle in epoll {s['idle_pct']}%", ""]
            lines += profile_table(s) + [""]
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return phases


# -- A/B ------------------------------------------------------------------------------------
def measure(
    paths: dict[str, tuple[int, str]], rounds: int, nbytes: int, n_keepalive: int, rps_s: float
) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in paths}
    names = list(paths)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            port, prefix = paths[name]
            res[name]["download_mb_s"].append(round(client.download(port, prefix, nbytes), 1))
            res[name]["upload_mb_s"].append(round(client.upload(port, prefix, nbytes), 1))
            res[name]["keepalive_p50_ms"].append(
                round(client.keepalive_latency(port, prefix, n_keepalive)["p50_ms"], 3)
            )
            res[name]["rps_32"].append(round(client.rps(port, prefix, 32, rps_s)["rps"]))
        log(
            f"round {r + 1}: "
            + "; ".join(
                f"{n} dl {res[n]['download_mb_s'][-1]:.0f} ul {res[n]['upload_mb_s'][-1]:.0f} "
                f"ka {res[n]['keepalive_p50_ms'][-1]:.3f} rps {res[n]['rps_32'][-1]:.0f}"
                for n in names
            )
        )
    out: dict[str, Any] = {}
    for n in names:
        out[n] = {k: {"median": statistics.median(v), "runs": v} for k, v in res[n].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tunnel_ab")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON (repeatable; first is the baseline)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=128, help="transfer size per download/upload")
    ap.add_argument("--keepalive", type=int, default=500)
    ap.add_argument("--rps-seconds", type=float, default=3)
    ap.add_argument("--no-openssh", action="store_true")
    ap.add_argument("--profile", default="", help="directory for py-spy profiles of the first variant")
    ap.add_argument("--profile-rate", type=int, default=250)
    ap.add_argument("--json", default="", help="write the A/B results here")
    args = ap.parse_args(argv)
    variants = [(v.split("=", 1)[0], json.loads(v.split("=", 1)[1])) for v in args.variant] or [("base", {})]
    nbytes = args.mib * 1024 * 1024
    tmp = tempfile.mkdtemp(prefix="bench-tunnel-ab-")
    procs = Procs(os.path.join(tmp, "logs"))
    sitedir = os.path.join(tmp, "site")
    os.makedirs(sitedir)
    with open(os.path.join(sitedir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    result: dict[str, Any] = {
        "variants": dict(variants),
        "mib": args.mib,
        "rounds": args.rounds,
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        chp = ChpProc(procs)
        chp.start()
        pairs = {name: Pair(procs, tmp, chp, name, v, sitedir) for name, v in variants}
        paths = {name: (p.port, p.prefix) for name, p in pairs.items()}
        if not args.no_openssh:
            paths["openssh"] = (start_openssh(procs, tmp), "/")
        log(f"ready: {paths}")
        if args.profile:
            result["profile"] = profile(pairs[variants[0][0]], args.profile, nbytes, args.profile_rate)
        if args.rounds:
            result["ab"] = measure(paths, args.rounds, nbytes, args.keepalive, args.rps_seconds)
            for n, r in result["ab"].items():
                log(f"{n}: " + ", ".join(f"{k} {v['median']}" for k, v in r.items()))
        result["loadavg_end"] = list(os.getloadavg())
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
