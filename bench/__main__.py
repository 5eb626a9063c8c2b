"""``python -m bench`` (``make bench``): every benchmark in one run (~15-18 min on 2 cores).

Parts: tunnel vs OpenSSH, the user path (jupyterhub-singleuser behind tunnel / ssh -R / direct,
each behind CHP), spawn-to-ready (local backend), spawn-to-ready on real Slurm vs stock
batchspawner, scheduler load (squeue calls/min with 100 sessions), scale (10k agents).
Writes bench/results/summary.json and summary.md. Options::

    --quick             256 MiB transfers instead of 1 GiB (--full: 1 GiB, the default)
    --scale N[,N...]    simulated agents for the scale part, one run per N (default 1000,10000; 0 skips)
    --spawns N          spawns per spawner, local backend (default 5; 0 skips)
    --slurm-spawns N    spawns per spawner on Slurm, interleaved (default 7; 0 skips)
    --skip-squeue       skip the scheduler-load part (100 held Slurm jobs, 60 s)
    --skip-slurm        skip both Slurm parts
    --skip-tunnel       skip the tunnel part
    --skip-user         skip the user-path part
    --user-rounds N     interleaved rounds of the user-path part (default 2)
    --out DIR           results directory (default bench/results)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import client
from .procs import Procs, chp_binary

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ["direct", "tunnel", "openssh", "chp_direct", "chp_tunnel", "chp_openssh"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout.strip() or r.stderr.strip()).splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "n/a"


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1])
    versions = {p: version(p) for p in ("asyncssh", "aiohttp", "jupyterhub", "jupyter_server", "cryptography")}
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        **versions,
        "openssh": _cmd(["ssh", "-V"]),
        "node": _cmd(["node", "--version"]),
        "configurable_http_proxy": _cmd([chp_binary(), "--version"]),
        "wrk": ("wrk " + (re.findall(r"\d+\.\d+\.\d+", _cmd(["wrk", "--version"])) or ["?"])[0])
        if shutil.which("wrk")
        else "not installed (asyncio client used)",
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    t = res.get("tunnel")
    if t:
        for p in PATHS:
            for k in (
                "download_mb_s",
                "upload_mb_s",
                "keepalive_p50_ms",
                "keepalive_p99_ms",
                "newconn_p50_ms",
                "rps_32",
            ):
                s[f"{p}_{k}"] = t[p][k]
        d, o, u = t["direct"], t["openssh"], t["tunnel"]
        s["tunnel_download_ratio_vs_openssh"] = _ratio(u["download_mb_s"], o["download_mb_s"])
        s["tunnel_upload_ratio_vs_openssh"] = _ratio(u["upload_mb_s"], o["upload_mb_s"])
        s["tunnel_latency_added_ratio_vs_openssh"] = _ratio(
            u["keepalive_p50_ms"] - d["keepalive_p50_ms"], o["keepalive_p50_ms"] - d["keepalive_p50_ms"]
        )
        s["tunnel_newconn_added_ratio_vs_openssh"] = _ratio(
            u["newconn_p50_ms"] - d["newconn_p50_ms"], o["newconn_p50_ms"] - d["newconn_p50_ms"]
        )
        s["tunnel_rps_ratio_vs_openssh"] = _ratio(u["rps_32"], o["rps_32"])
        ct, co = t["chp_tunnel"], t["chp_openssh"]
        s["chp_tunnel_download_ratio_vs_chp_openssh"] = _ratio(ct["download_mb_s"], co["download_mb_s"])
        s["chp_tunnel_rps_ratio_vs_chp_openssh"] = _ratio(ct["rps_32"], co["rps_32"])
    up = res.get("user_path")
    if up:
        from .user_path import PATHS as USER_PATHS
        from .user_path import ratios as user_ratios

        for p in USER_PATHS:
            for k in ("kernel_p50_ms", "kernel_p99_ms", "download_mb_s", "rps_32"):
                s[f"user_{p}_{k}"] = up[p][k]
        s.update(user_ratios(up))
    sp = res.get("spawn")
    if sp:
        s["spawn_to_ready_local_median_s"] = sp["broker_local"]["median_s"]
        s["spawn_to_ready_localprocess_median_s"] = sp["localprocess"]["median_s"]
        s["spawn_to_ready_ratio_vs_localprocess"] = _ratio(
            sp["broker_local"]["median_s"], sp["localprocess"]["median_s"]
        )
    ss = res.get("spawn_slurm")
    if ss and "skipped" not in ss:
        s["spawn_to_ready_slurm_median_s"] = ss["broker_slurm"]["median_s"]
        s["spawn_to_ready_batchspawner_median_s"] = ss["batchspawner"]["median_s"]
        s["spawn_ratio_vs_batchspawner"] = _ratio(ss["broker_slurm"]["median_s"], ss["batchspawner"]["median_s"])
    elif ss:
        s["spawn_ratio_vs_batchspawner"] = None
        s["spawn_slurm_skipped"] = ss["skipped"]
    sq = res.get("squeue_load")
    if sq and "skipped" not in sq:
        s["squeue_calls_per_min_100_sessions"] = sq["ours_per_min"]
        s["squeue_calls_per_min_100_sessions_batchspawner"] = sq["batchspawner_per_min"]
    elif sq:
        s["squeue_calls_per_min_100_sessions"] = s["squeue_calls_per_min_100_sessions_batchspawner"] = None
        s["squeue_load_skipped"] = sq["skipped"]
    for sc in res.get("scale_runs") or ([res["scale"]] if res.get("scale") else []):
        tag = "1k" if sc["n"] == 1000 else f"{sc['n'] // 1000}k" if sc["n"] % 1000 == 0 else str(sc["n"])
        s[f"broker_rss_mib_{tag}"] = sc["broker_rss_mib"]
        s[f"reconnect_storm_{tag}_s"] = sc["reconnect_storm_s"]
        s[f"establish_{tag}_s"] = sc["establish_s"]
        if "extrapolated_from" in sc:
            s[f"scale_{tag}_measured_n"] = sc["extrapolated_from"]["n"]
            s[f"scale_{tag}_note"] = "extrapolated linearly from the measured N: " + sc["why"]
    return s


def markdown(out: dict[str, Any]) -> str:
    m, res, s = out["machine"], out["results"], out["summary"]
    lines = [
        f"# Benchmark results ({out['date']})",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['mem_gib']} GiB RAM; {m['os']}, Linux {m['kernel']}; "
        f"Python {m['python']}, asyncssh {m['asyncssh']}, aiohttp {m['aiohttp']}, JupyterHub {m['jupyterhub']}, "
        f"jupyter_server {m['jupyter_server']}; {m['openssh']}; CHP {m['configurable_http_proxy']} on node {m['node']}; "
        f"load generator: {m['wrk']}.",
        "",
        f"Run: {out['args']['transfer_mib']} MiB transfers (best of {out['args']['rounds']}), "
        f"{out['args']['keepalive_n']} keep-alive GETs, {out['args']['newconn_n']} new-connection GETs, "
        f"{out['args']['rps_seconds']} s at 32 connections; wall time {out['wall_s']:.0f} s; "
        f"load average (1/5/15 min) {out.get('loadavg_start')} at start, {out.get('loadavg_end')} at the end.",
        "",
    ]
    t = res.get("tunnel")
    if t:
        lines += [
            "## Tunnel (loopback)",
            "",
            "| path | download MB/s | upload MB/s | keep-alive GET p50 / p99 ms | new-conn GET p50 ms | req/s (32 conns) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for p in PATHS:
            r = t[p]
            lines.append(
                f"| {p} | {r['download_mb_s']:.0f} | {r['upload_mb_s']:.0f} | {r['keepalive_p50_ms']:.2f} / "
                f"{r['keepalive_p99_ms']:.2f} | {r['newconn_p50_ms']:.2f} | {r['rps_32']:.0f} |"
            )
        lines += ["", "| ratio (tunnel vs OpenSSH `ssh -R`) | value |", "|---|---:|"]
        for k in (
            "tunnel_download_ratio_vs_openssh",
            "tunnel_upload_ratio_vs_openssh",
            "tunnel_latency_added_ratio_vs_openssh",
            "tunnel_newconn_added_ratio_vs_openssh",
            "tunnel_rps_ratio_vs_openssh",
            "chp_tunnel_download_ratio_vs_chp_openssh",
            "chp_tunnel_rps_ratio_vs_chp_openssh",
        ):
            lines.append(f"| {k} | {s[k]} |")
        lines.append("")
    up = res.get("user_path")
    if up:
        lines += [
            f"## The user path: jupyterhub-singleuser behind CHP ({up['rounds']} rounds interleaved)",
            "",
            f"| path | kernel `1+1` round trip p50 / p99 ms ({up['kernel_runs']} runs) | download {up['file_mib']} MiB via /files/ MB/s | GET /api/contents req/s (32 conns) |",
            "|---|---:|---:|---:|",
        ]
        for p in ("direct", "tunnel", "openssh"):
            r = up[p]
            lines.append(
                f"| {p} | {r['kernel_p50_ms']:.2f} / {r['kernel_p99_ms']:.2f} | {r['download_mb_s']:.0f} | {r['rps_32']:.0f} |"
            )
        lines += ["", "| ratio (tunnel vs OpenSSH `ssh -R`, both behind CHP) | value |", "|---|---:|"]
        for k in (
            "user_kernel_rtt_added_ratio_vs_openssh",
            "user_download_ratio_vs_openssh",
            "user_rps_ratio_vs_openssh",
        ):
            lines.append(f"| {k} | {s[k]} |")
        lines.append("")
    sp = res.get("spawn")
    if sp:
        lines += [
            "## Spawn to ready (local backend)",
            "",
            "| spawner | median s | min s | max s | runs |",
            "|---|---:|---:|---:|---|",
        ]
        for name, key in (
            ("broker (LocalBrokerSpawner + node agent)", "broker_local"),
            ("JupyterHub LocalProcessSpawner", "localprocess"),
        ):
            r = sp[key]
            lines.append(
                f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['runs_s'])} |"
            )
        lines += ["", f"spawn_to_ready_ratio_vs_localprocess: {s['spawn_to_ready_ratio_vs_localprocess']}", ""]
    ss = res.get("spawn_slurm")
    if ss and "skipped" not in ss:
        lines += [
            "## Spawn to ready on Slurm (single-node, real)",
            "",
            "| spawner | median s | min s | max s | runs |",
            "|---|---:|---:|---:|---|",
        ]
        for name, key in (
            ("SlurmBrokerSpawner (ours)", "broker_slurm"),
            ("batchspawner.SlurmSpawner (stock)", "batchspawner"),
        ):
            r = ss[key]
            lines.append(
                f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['runs_s'])} |"
            )
        lines += ["", f"spawn_ratio_vs_batchspawner: {s['spawn_ratio_vs_batchspawner']}", ""]
    elif ss:
        lines += ["## Spawn to ready on Slurm", "", f"skipped: {ss['skipped']}", ""]
    sq = res.get("squeue_load")
    if sq and "skipped" not in sq:
        lines += [
            f"## Scheduler load ({sq['n_sessions']} sessions = held Slurm jobs, {sq['window_s']} s window)",
            "",
            "| model | squeue calls | per minute |",
            "|---|---:|---:|",
            f"| ours: one shared SlurmJobPoller, every {sq['ours_interval_s']} s | {sq['ours_squeue_calls']} | {sq['ours_per_min']} |",
            f"| batchspawner: 100 × SlurmSpawner.poll(), every {sq['batchspawner_poll_interval_s']} s each | {sq['batchspawner_squeue_calls']} | {sq['batchspawner_per_min']} |",
            "",
        ]
    elif sq:
        lines += ["## Scheduler load", "", f"skipped: {sq['skipped']}", ""]
    for sc in res.get("scale_runs") or ([res["scale"]] if res.get("scale") else []):
        if "extrapolated_from" in sc:
            e = sc["extrapolated_from"]
            lines += [
                f"## Scale: measured {e['n']} simulated agents, one broker",
                "",
                "| figure | value |",
                "|---|---:|",
                f"| sessions created through REST | {e['sessions_create_s']} s |",
                f"| all agents enrolled + forward granted ({e['client_processes']} client processes, concurrency {e['connect_concurrency']}) | {e['establish_s']} s |",
                f"| broker RSS idle → with {e['n']} agents | {e['broker_rss_idle_mib']} → {e['broker_rss_mib']} MiB ({e['rss_per_agent_kib']} KiB each; {e['broker_fds']} fds) |",
                f"| reconnect storm: broker restart → all agent_connected | {e['reconnect_storm_s']} s ({e['reconnect_storm_from_kill_s']} s from kill -9); {e['reconnected']}/{e['n']} back |",
                f"| broker RSS after the storm | {e['broker_rss_after_storm_mib']} MiB |",
                "",
                f"**Extrapolated to {sc['n']} (linear in N; {sc['why']}):** broker RSS {sc['broker_rss_mib']} MiB, "
                f"reconnect storm {sc['reconnect_storm_s']} s, establish {sc['establish_s']} s.",
                "",
            ]
            continue
        lines += [
            f"## Scale ({sc['n']} simulated agents, one broker)",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| sessions created through REST | {sc['sessions_create_s']} s |",
            f"| all agents enrolled + forward granted (concurrency {sc['connect_concurrency']}) | {sc['establish_s']} s |",
            f"| broker RSS idle → with {sc['n']} agents | {sc['broker_rss_idle_mib']} → {sc['broker_rss_mib']} MiB ({sc['rss_per_agent_kib']} KiB each) |",
            f"| reconnect storm: broker restart → all agent_connected | {sc['reconnect_storm_s']} s ({sc['reconnect_storm_from_kill_s']} s from kill -9) |",
            f"| broker RSS after the storm | {sc['broker_rss_after_storm_mib']} MiB |",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--full", action="store_true", help="1 GiB transfers (the default; kept for old command lines)")
    ap.add_argument("--quick", action="store_true", help="256 MiB transfers instead of 1 GiB")
    ap.add_argument("--scale", default="1000,10000", help="comma-separated agent counts (0 skips)")
    ap.add_argument("--slurm-spawns", type=int, default=7)
    ap.add_argument("--skip-squeue", action="store_true")
    ap.add_argument("--skip-slurm", action="store_true")
    ap.add_argument("--spawns", type=int, default=5)
    ap.add_argument("--skip-tunnel", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-user", action="store_true")
    ap.add_argument("--user-rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    scales = sorted({int(x) for x in str(args.scale).split(",") if x.strip() and int(x) > 0})
    nbytes = (256 << 20) if args.quick and not args.full else (1 << 30)
    params = {
        "transfer_mib": nbytes >> 20,
        "rounds": args.rounds,
        "keepalive_n": 1000,
        "newconn_n": 300,
        "rps_seconds": 5,
        "scale": scales,
        "spawns": args.spawns,
        "slurm_spawns": 0 if args.skip_slurm else args.slurm_spawns,
        "squeue_load": not (args.skip_slurm or args.skip_squeue),
        "rps_client": "wrk" if client.have_wrk() else "asyncio",
        "user_path": None if args.skip_user else {"rounds": args.user_rounds, "kernel_runs": 500, "file_mib": 256},
    }
    # children find our packages and the venv's commands
    root = os.path.dirname(HERE)
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    t_start = time.monotonic()
    load_start = [round(x, 1) for x in os.getloadavg()]
    tmp = tempfile.mkdtemp(prefix="bench-")
    procs = Procs(os.path.join(tmp, "logs"))
    results: dict[str, Any] = {}
    try:
        info = machine()
        log(f"machine: {info['nproc']} CPUs, {info['cpu_model']}, {info['mem_gib']} GiB; logs in {tmp}/logs")
        if not args.skip_tunnel:
            from .tunnel import TunnelBench

            log("tunnel: starting direct server, CHP, broker + node agent, sshd + ssh -R")
            tb = TunnelBench(tmp, procs, log)
            tb.setup()
            results["tunnel"] = tb.run(
                nbytes, params["keepalive_n"], params["newconn_n"], params["rps_seconds"], args.rounds
            )
            procs.stop_all()
        if not args.skip_user:
            from . import user_path

            log("user path: hub + jupyterhub-singleuser behind the tunnel, ssh -R and direct, each behind CHP")
            results["user_path"] = user_path.run(tmp, log, rounds=args.user_rounds)
        if args.spawns > 0:
            from . import spawn

            results["spawn"] = spawn.run(tmp, args.spawns, log)
        if args.slurm_spawns > 0 and not args.skip_slurm:
            from . import spawn_slurm

            results["spawn_slurm"] = spawn_slurm.run(tmp, args.slurm_spawns, log)
        if not (args.skip_slurm or args.skip_squeue):
            from . import squeue_load

            results["squeue_load"] = squeue_load.run(tmp, log)
        for n in scales:
            from . import scale

            log(f"scale: {n} simulated agents")
            results.setdefault("scale_runs", []).append(scale.run(os.path.join(tmp, f"scale-{n}"), n, procs, log))
            results["scale"] = results["scale_runs"][-1]
            procs.stop_all()
    finally:
        procs.stop_all()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "args": params,
        "results": results,
        "summary": summarize(results),
        "wall_s": round(time.monotonic() - t_start, 1),
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 1) for x in os.getloadavg()],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    md = markdown(out)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
