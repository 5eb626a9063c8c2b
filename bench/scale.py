"""Part 3: many simulated agents against one broker subprocess.

Each simulated agent is a lightweight asyncssh client: it enrols with its session's one-time
secret (password auth, as the real agent does), asks for the one remote forward (127.0.0.1,
port 0) and opens nothing else. The agents are split over several client processes
(``bench.scale_worker``, ~2,500 each) and every agent binds its socket to its own source address
in 127.0.0.0/8 (127.1.x.y), like one compute node each -- so the broker's admission control runs
with its production defaults (64 pre-auth connections per source, 512 in total), nothing exempt.

Measured: time to establish all of them (bounded concurrency), the broker's RSS from /proc
before and after, and a reconnect storm: kill -9 the broker, start it again on the same state
and ports, and time until every agent is connected again (polled every 0.5 s from the ``broker_agents_connected``
gauge of ``/metrics``, then confirmed with ``GET /api/sessions``; clients reconnect with their key,
jittered backoff capped at 2 s).

The broker needs two file descriptors per session (its hub-side listener and the agent's SSH
connection). When RLIMIT_NOFILE's hard limit (which an unprivileged-in-effect root cannot raise
here) does not allow N, the largest N that fits is measured and N's figures are extrapolated
linearly -- recorded as such (``extrapolated_from``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .procs import BrokerProc, ChpProc, Procs, rss_mib
from .tunnel_ab import profile_table, pyspy_record, pyspy_stop, summarize_raw

AGENTS_PER_WORKER = 2500
CONCURRENCY = 100  # in all, split over the workers
FD_BASE = 400  # broker's own descriptors + margin


def source_addr(i: int) -> str:
    return f"127.{1 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


def n_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _count_connected_gauge(session: aiohttp.ClientSession, broker: BrokerProc) -> int:
    """``broker_agents_connected`` from /metrics: cheap to poll every 0.5 s while 10k reconnect
    (listing 10k sessions that often would itself load the broker)."""
    async with session.get(broker.url + "/metrics", headers={"Authorization": f"Bearer {broker.token}"}) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("broker_agents_connected "):
            return int(float(line.split()[1]))
    raise RuntimeError("broker_agents_connected missing from /metrics")


async def _count_connected(session: aiohttp.ClientSession, broker: BrokerProc) -> int:
    async with session.get(broker.url + "/api/sessions", headers={"Authorization": f"Bearer {broker.token}"}) as r:
        body = await r.json()
    return sum(1 for s in body["sessions"] if s.get("agent_connected"))


def _write_profile(raw: str, md: str, title: str) -> None:
    s = summarize_raw(raw, top=25)
    lines = [
        f"# {title}",
        "",
        f"py-spy record --idle, event-loop thread, {s['samples']} samples; idle in epoll {s['idle_pct']}%",
        "",
    ]
    lines += profile_table(s)
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")


async def _run(
    tmp: str, n: int, procs: Procs, log: Callable[[str], None], storm_deadline: float, profile_dir: str = ""
) -> dict[str, Any]:
    chp = ChpProc(procs, "chp-scale")
    chp.start()
    broker = BrokerProc(procs, os.path.join(tmp, "broker-scale"), chp.api_url, chp.token, name="broker-scale")
    broker.start()
    assert broker.proc is not None
    time.sleep(0.5)
    rss0 = rss_mib(broker.proc.pid)
    fds0 = n_fds(broker.proc.pid)
    headers = {"Authorization": f"Bearer {broker.token}"}
    sem = asyncio.Semaphore(50)
    creds: list[tuple[str, str, str]] = []
    host_key = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        t0 = time.monotonic()

        async def create(i: int) -> None:
            nonlocal host_key
            async with sem:
                async with http.post(
                    broker.url + "/api/sessions",
                    headers=headers,
                    json={"user": f"sim{i}", "server_name": "", "routespec": f"/user/sim{i}/"},
                ) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"create session: {r.status} {body}")
            host_key = host_key or body["ssh"]["host_key"]
            creds.append((body["id"], body["secret"], source_addr(i)))

        await asyncio.gather(*(create(i) for i in range(n)))
        t_create = time.monotonic() - t0
        log(f"  {n} sessions created through REST in {t_create:.1f} s")

        # client processes, each with its share of the agents
        n_workers = max(1, -(-n // AGENTS_PER_WORKER))
        per = -(-n // n_workers)
        conc = max(1, CONCURRENCY // n_workers)
        workers: list[asyncio.subprocess.Process] = []
        t0 = time.monotonic()
        for w in range(n_workers):
            spec = os.path.join(tmp, f"scale-worker-{w}.json")
            with open(spec, "w") as f:
                json.dump(
                    {
                        "port": broker.ssh_port,
                        "host_key": host_key,
                        "concurrency": conc,
                        "deadline_s": storm_deadline,
                        "agents": creds[w * per : (w + 1) * per],
                    },
                    f,
                )
            errlog = open(os.path.join(procs.logdir, f"scale-worker-{w}.log"), "ab")
            workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.scale_worker",
                    spec,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=errlog,
                    start_new_session=True,
                )
            )
            errlog.close()

        async def event(p: asyncio.subprocess.Process) -> dict[str, Any]:
            assert p.stdout is not None
            line = await p.stdout.readline()
            if not line:
                raise RuntimeError(f"scale worker exited ({await p.wait()}); see {procs.logdir}/scale-worker-*.log")
            return json.loads(line)

        try:
            est = await asyncio.gather(*(event(p) for p in workers))
            t_est = time.monotonic() - t0
            connected = await _count_connected(http, broker)
            await asyncio.sleep(1.0)
            rss1 = rss_mib(broker.proc.pid)
            fds1 = n_fds(broker.proc.pid)
            log(
                f"  {n} agents ({n_workers} client processes, concurrency {conc * n_workers}) enrolled + forwarding in "
                f"{t_est:.1f} s; {connected} connected; broker RSS {rss0:.0f} -> {rss1:.0f} MiB, fds {fds0} -> {fds1}"
            )

            # reconnect storm
            os.kill(broker.proc.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            broker.proc.wait(10)
            procs.procs.pop("broker-scale", None)
            for p in workers:
                assert p.stdin is not None
                p.stdin.write(b"storm\n")
                await p.stdin.drain()
            broker.start()
            t_up = time.monotonic()
            spy = (
                pyspy_record(broker.proc.pid, os.path.join(profile_dir, "broker-storm.txt"), 100)
                if profile_dir
                else None
            )
            deadline = t_up + storm_deadline
            n_ok = 0
            while time.monotonic() < deadline:
                try:
                    n_ok = await _count_connected_gauge(http, broker)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    n_ok = 0
                if n_ok >= n:
                    break
                await asyncio.sleep(0.5)
            t_all = time.monotonic()
            n_ok = await _count_connected(http, broker)  # what the REST API (the hub's view) shows
            storm_cpu = cpu_s(broker.proc.pid)
            if spy is not None:
                pyspy_stop(spy)
                _write_profile(
                    os.path.join(profile_dir, "broker-storm.txt"),
                    os.path.join(profile_dir, "storm.md"),
                    f"broker during a reconnect storm of {n} agents ({t_all - t_up:.1f} s)",
                )
            rec = await asyncio.gather(*(event(p) for p in workers))
            rss2 = rss_mib(broker.proc.pid)
            log(
                f"  storm: {n_ok}/{n} agent_connected {t_all - t_up:.1f} s after restart ({t_all - t_kill:.1f} s after kill -9); RSS {rss2:.0f} MiB; broker CPU {storm_cpu:.0f} s"
            )
        finally:
            for p in workers:
                if p.returncode is None and p.stdin is not None:
                    try:
                        p.stdin.write(b"exit\n")
                        await p.stdin.drain()
                    except (BrokenPipeError, ConnectionResetError):
                        pass
            for p in workers:
                try:
                    await asyncio.wait_for(p.wait(), 20)
                except asyncio.TimeoutError:
                    p.kill()
                    await p.wait()
    return {
        "n": n,
        "sessions_create_s": round(t_create, 2),
        "establish_s": round(t_est, 2),
        "connect_concurrency": conc * n_workers,
        "client_processes": n_workers,
        "source_addresses": "one per agent in 127.1.0.0/16 (admission control at its defaults, nothing exempt)",
        "connected": connected,
        "broker_rss_idle_mib": round(rss0, 1),
        "broker_rss_mib": round(rss1, 1),
        "broker_fds": fds1,
        "rss_per_agent_kib": round((rss1 - rss0) * 1024 / n, 1),
        "reconnect_storm_s": round(t_all - t_up, 2),
        "reconnect_storm_from_kill_s": round(t_all - t_kill, 2),
        "reconnected": n_ok,
        "broker_cpu_s_storm": round(storm_cpu, 1),
        "loadavg_1min_after_storm": round(os.getloadavg()[0], 1),
        "broker_rss_after_storm_mib": round(rss2, 1),
        "workers_established": est,
        "workers_reconnected": rec,
    }


def run(tmp: str, n: int, procs: Procs, log: Callable[[str], None], profile_dir: str = "") -> dict[str, Any]:
    os.makedirs(tmp, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it
    fit = (hard - FD_BASE) // 2 if hard != resource.RLIM_INFINITY else n
    m = min(n, fit)
    storm_deadline = max(180.0, 0.05 * m)
    if m < n:
        log(
            f"  RLIMIT_NOFILE hard limit {hard} (cannot be raised here) fits {m} agents (2 fds each): measuring N={m}, "
            f"figures for {n} extrapolated linearly"
        )
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
    res = asyncio.run(_run(tmp, m, procs, log, storm_deadline, profile_dir))
    if m < n:
        measured = dict(res)
        res = {
            "n": n,
            "extrapolated_from": measured,
            "why": f"broker RLIMIT_NOFILE hard limit {hard} (no CAP_SYS_RESOURCE to raise it) allows {fit} sessions at 2 fds each",
            "sessions_create_s": round(measured["sessions_create_s"] * n / m, 2),
            "establish_s": round(measured["establish_s"] * n / m, 2),
            "connect_concurrency": measured["connect_concurrency"],
            "broker_rss_idle_mib": measured["broker_rss_idle_mib"],
            "broker_rss_mib": round(
                measured["broker_rss_idle_mib"]
                + (measured["broker_rss_mib"] - measured["broker_rss_idle_mib"]) * n / m,
                1,
            ),
            "rss_per_agent_kib": measured["rss_per_agent_kib"],
            "reconnect_storm_s": round(measured["reconnect_storm_s"] * n / m, 2),
            "reconnect_storm_from_kill_s": round(measured["reconnect_storm_from_kill_s"] * n / m, 2),
            "broker_rss_after_storm_mib": round(
                measured["broker_rss_idle_mib"]
                + (measured["broker_rss_after_storm_mib"] - measured["broker_rss_idle_mib"]) * n / m,
                1,
            ),
            "connected": measured["connected"],
            "reconnected": measured["reconnected"],
        }
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.scale N [--profile DIR]``: this part alone (figures printed as JSON)."""
    import argparse
    import shutil
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.scale")
    ap.add_argument("n", type=int)
    ap.add_argument("--profile", default="", help="py-spy the restarted broker during the storm; write DIR/storm.md")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    procs = Procs(os.path.join(tmp, "logs"))
    try:
        res = run(tmp, args.n, procs, lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True), args.profile)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("workers_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
