"""Part 5: scheduler load with 100 sessions -- squeue invocations per minute, ours vs batchspawner.

100 real Slurm jobs stand in for 100 running notebook sessions (100 real notebook servers do not
fit on 2 cores): ``sbatch --hold --job-name=TAG --wrap 'sleep 600'``. They are *held* (PENDING,
reason JobHeldUser) so they occupy no CPU slot on the shared single-node cluster -- other test
suites use it at the same time. For the poll counts a held job is as good as a running one: both
are answered by squeue, and neither model polls less for a pending job.

During one 60 s window, side by side:

(a) ours: ONE :class:`hub_plugin.slurm_poller.SlurmJobPoller` (what every SlurmBrokerSpawner of a
    hub shares) watching all 100 ids, with SlurmBrokerSpawner's default ``slurm_poll_interval``;
(b) stock batchspawner: 100 real ``batchspawner.SlurmSpawner`` objects (stand-in user/hub
    objects, ``job_id`` set to one job each) whose ``poll()`` is called on JupyterHub's schedule:
    every ``Spawner.poll_interval`` (default 30 s) per spawner, first calls spread uniformly over
    one interval (users start at different times). Each ``poll()`` runs the spawner's own
    ``batch_query_cmd`` (``squeue -h -j ID -o '%T %B'``) through its ``run_command``.

Each side's squeue is a wrapper script (its own log file) that records one line per call and
execs the real squeue, so the figures are real invocations, counted over the full 60 s.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

N_JOBS = 100


def _real(cmd: str) -> str:
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        p = os.path.join(d, cmd)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(cmd) or cmd


def slurm_up() -> tuple[bool, str]:
    """True when squeue answers; else try `scripts/slurm.sh start` (idempotent) once."""

    def answers() -> bool:
        try:
            return subprocess.run([_real("squeue"), "-h", "-o", "%i"], capture_output=True, timeout=15).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if answers():
        return True, ""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "slurm.sh")
    if os.geteuid() != 0 or not os.path.exists(script):
        return False, "Slurm is not running (starting it needs root and scripts/slurm.sh)"
    r = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not answers():
        return False, f"scripts/slurm.sh start failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return True, ""


def make_wrapper(bindir: str, name: str) -> tuple[str, str]:
    os.makedirs(bindir, exist_ok=True)
    log = os.path.join(bindir, f"{name}.calls")
    open(log, "w").close()
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {log}\nexec {_real("squeue")} "$@"\n')
    os.chmod(path, 0o755)
    return path, log


def calls(log: str, t0: float, t1: float) -> int:
    n = 0
    with open(log) as f:
        for line in f:
            try:
                ts = float(line.split()[0])
            except (ValueError, IndexError):
                continue
            if t0 <= ts <= t1:
                n += 1
    return n


class _User(SimpleNamespace):
    pass


def batchspawners(job_ids: list[str], squeue: str) -> list[Any]:
    from batchspawner import SlurmSpawner

    out = []
    for i, jid in enumerate(job_ids):
        user = _User(
            name=f"bench{i}",
            id=i + 1,
            url=f"/user/bench{i}/",
            escaped_name=f"bench{i}",
            server=None,
            spawners={},
            settings={},
        )
        sp = SlurmSpawner(
            user=user,
            hub=SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/"),
            exec_prefix="",
            req_homedir="/tmp",
            req_username=user.name,
            req_keepvars="PATH",
            batch_query_cmd=f"{squeue} -h -j {{job_id}} -o '%T %B'",
        )
        sp.job_id = jid
        out.append(sp)
    return out


async def _measure(
    job_ids: list[str],
    ours_sq: str,
    ours_log: str,
    bs_sq: str,
    bs_log: str,
    window: float,
    ours_interval: float,
    bs_interval: float,
) -> dict[str, Any]:
    from hub_plugin.slurm_poller import SlurmJobPoller

    spawners = batchspawners(job_ids, bs_sq)
    # sanity: each stock spawner sees its job
    first = await spawners[0].poll()
    states = {"first_poll_result": first, "first_job_status": spawners[0].job_status}
    open(bs_log, "w").close()

    poller = SlurmJobPoller(interval=ours_interval, squeue=ours_sq)
    bs_polls = 0
    t0 = time.time()
    t_end = time.monotonic() + window

    async def hub_schedule(sp: Any, offset: float) -> None:
        nonlocal bs_polls
        await asyncio.sleep(offset)
        while time.monotonic() < t_end:
            r = await sp.poll()
            bs_polls += 1
            if r is not None:
                states.setdefault("stock_poll_not_running", []).append(sp.job_id)
            await asyncio.sleep(bs_interval)

    tasks = [asyncio.ensure_future(hub_schedule(sp, random.uniform(0, bs_interval))) for sp in spawners]
    for jid in job_ids:
        poller.watch(jid)
    info = await poller.status(job_ids[-1])
    await asyncio.sleep(max(0.0, t_end - time.monotonic()))
    t1 = time.time()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for jid in job_ids:
        poller.unwatch(jid)
    await poller.close()
    mins = (t1 - t0) / 60
    n_ours, n_bs = calls(ours_log, t0, t1), calls(bs_log, t0, t1)
    return {
        "window_s": round(t1 - t0, 1),
        "ours_squeue_calls": n_ours,
        "batchspawner_squeue_calls": n_bs,
        "ours_per_min": round(n_ours / mins, 1),
        "batchspawner_per_min": round(n_bs / mins, 1),
        "ours_interval_s": ours_interval,
        "batchspawner_poll_interval_s": bs_interval,
        "batchspawner_polls": bs_polls,
        "ours_poller_squeue_calls_counter": poller.squeue_calls,
        "ours_last_state": info.state,
        **states,
    }


def run(tmp: str, log: Callable[[str], None], window: float = 60.0) -> dict[str, Any]:
    ok, why = slurm_up()
    if not ok:
        log(f"scheduler load: skipped: {why}")
        return {"skipped": why}
    from batchspawner import SlurmSpawner
    from jupyterhub.spawner import Spawner

    from hub_plugin.slurm import SlurmBrokerSpawner

    ours_interval = SlurmBrokerSpawner.slurm_poll_interval.default_value
    bs_interval = (
        SlurmSpawner.poll_interval.default_value
        if "poll_interval" in SlurmSpawner.class_trait_names()
        else Spawner.poll_interval.default_value
    )
    tag = f"bench-sq-{uuid.uuid4().hex[:6]}"
    bindir = os.path.join(tmp, "squeue-wrappers")
    ours_sq, ours_log = make_wrapper(bindir, "squeue-ours")
    bs_sq, bs_log = make_wrapper(bindir, "squeue-batchspawner")
    job_ids: list[str] = []
    try:
        for _ in range(N_JOBS):
            r = subprocess.run(
                [
                    _real("sbatch"),
                    "--parsable",
                    "--hold",
                    f"--job-name={tag}",
                    "--output=/dev/null",
                    "--time=15",
                    "--wrap",
                    "sleep 600",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode != 0:
                raise RuntimeError(f"sbatch: {r.stderr.strip()}")
            job_ids.append(r.stdout.strip().split(";")[0])
        log(
            f"scheduler load: {len(job_ids)} held jobs ({tag}); 60 s of SlurmJobPoller (interval {ours_interval} s) "
            f"and 100 batchspawner.SlurmSpawner.poll() (every {bs_interval} s) side by side"
        )
        res = asyncio.run(_measure(job_ids, ours_sq, ours_log, bs_sq, bs_log, window, ours_interval, bs_interval))
    finally:
        subprocess.run([_real("scancel"), "-n", tag], capture_output=True, timeout=60)
    res.update(
        n_sessions=len(job_ids), job_name=tag, jobs="sbatch --hold --wrap 'sleep 600' (held: no CPU slots taken)"
    )
    log(f"  squeue calls/min with 100 sessions: ours {res['ours_per_min']}, batchspawner {res['batchspawner_per_min']}")
    return res
