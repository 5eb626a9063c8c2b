"""``broker accounting``: per-user reports from the real session store (+ real sacct).

Sessions are created and closed through an in-process Broker (real SQLite store), then given
chosen timestamps, job ids and byte counts, so every number in the report can be checked
against the sessions that ran. The CLI runs as a real subprocess reading the store read-only.

Slurm accounting: ``test_real_sacct_with_slurmdbd`` brings up its own single-node Slurm with
slurmdbd + MariaDB (``SLURM_ACCOUNTING=1 scripts/slurm.sh``) inside a private mount+network
namespace — so it never touches the shared development cluster — runs a real job, and checks
the report's CPU hours against sacct. ``test_sacct_disabled_is_reported`` uses the shared
cluster's real sacct, whose accounting storage is disabled.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import time

import asyncssh
import pytest

from broker import accounting as acct
from broker.core import Broker
from broker.store import SessionStore

from slurm_cluster import accounting_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

# Real output of `sacct -n -P -j 2 -o JobID,CPUTimeRAW,AllocTRES,Elapsed` for `sbatch -c 2 --wrap "sleep 3"`
# on scripts/slurm.sh with SLURM_ACCOUNTING=1 (Slurm 22.05.8, Debian 12), captured 2026-11-25.
REAL_SACCT = "2|6|billing=2,cpu=2,node=1|00:00:03\n2.batch|6|cpu=2,mem=0,node=1|00:00:03\n"


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()  # local time, like the CLI's dates


# user, job, created, connected, ready, closed (None = live), bytes in/out
PLAN = [
    ("zoe", "101", "2026-03-01T09:00", "2026-03-01T09:02", "2026-03-01T09:03", "2026-03-01T11:02", 1000, 5000),
    ("zoe", "102", "2026-03-10T14:00", "2026-03-10T14:30", "2026-03-10T14:31", "2026-03-10T15:00", 24, 76),
    ("秀樹", "103", "2026-03-15T08:00", "2026-03-15T08:00", "2026-03-15T08:01", "2026-03-15T12:00", 7, 3),
    ("zoe", "104", "2026-03-20T10:00", None, None, "2026-03-20T10:10", 0, 0),  # never started
    ("zoe", "099", "2026-02-27T10:00", "2026-02-27T10:01", "2026-02-27T10:02", "2026-02-27T11:00", 9, 9),  # before
    ("50fia", "105", "2026-04-01T00:00", "2026-04-01T00:01", "2026-04-01T00:02", "2026-04-01T01:00", 1, 1),  # after
]


def make_store(path: str) -> None:
    async def go() -> None:
        store = SessionStore(path)
        broker = Broker(
            store=store, host_key=asyncssh.generate_private_key("ssh-ed25519"), hub_api=("127.0.0.1", 1), chp=None
        )
        await broker.start()
        try:
            for user, job, created, connected, ready, closed, bi, bo in PLAN:
                s, _ = await broker.create_session(user, "", f"/user/{user}/")
                broker.update(s.id, job_id=job, node="cn01")
                await broker.close_session(s.id, "stopped by the hub")
                store.update(
                    s.id,
                    created=ts(created),
                    connected_at=connected and ts(connected),
                    ready_at=ready and ts(ready),
                    closed_at=ts(closed),
                    bytes_in=bi,
                    bytes_out=bo,
                )
        finally:
            await broker.stop()
            store.close()

    asyncio.run(go())


def run_cli(
    state_dir: str, *args: str, env_extra: dict | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.path.dirname(PY) + os.pathsep + "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "HOME": state_dir,
        **(env_extra or {}),
    }
    return subprocess.run(
        [PY, "-m", "broker.app", "accounting", f"--BrokerApp.state_dir={state_dir}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=cwd or state_dir,
    )


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    make_store(str(d / "broker.sqlite"))
    return str(d)


MARCH = ["--since", "2026-03-01", "--until", "2026-04-01"]


def test_json_numbers_match_the_sessions(state):
    r = run_cli(state, *MARCH, "--format", "json", "--no-sacct")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    users = {u["user"]: u for u in rep["users"]}
    assert set(users) == {"zoe", "秀樹"}  # 099 (February) and 105 (April) are outside
    zoe = users["zoe"]
    assert zoe["sessions"] == 3 and zoe["live_sessions"] == 0
    # 09:02 -> 11:02 = 2 h; 14:30 -> 15:00 = 0.5 h; never connected = 0 h
    assert zoe["hours"] == pytest.approx(2.5)
    assert (zoe["bytes_in"], zoe["bytes_out"]) == (1024, 5076)
    assert sorted(zoe["jobs"]) == ["101", "102", "104"]
    assert users["秀樹"]["hours"] == pytest.approx(4.0)
    assert (users["秀樹"]["bytes_in"], users["秀樹"]["bytes_out"]) == (7, 3)
    assert rep["totals"]["sessions"] == 4 and rep["totals"]["hours"] == pytest.approx(6.5)
    assert rep["sacct"]["available"] is False and "disabled" in rep["sacct"]["note"]
    assert zoe["cpu_hours"] is None and zoe["gpu_hours"] is None
    assert rep["period"]["since_epoch"] == ts("2026-03-01T00:00")


def test_table_csv_user_filter_and_periods(state):
    r = run_cli(state, *MARCH, "--no-sacct")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Sessions registered 2026-03-01T00:00:00")
    assert "CPU/GPU time: sacct not queried" in lines[1]
    rows = {ln.split()[0]: ln.split() for ln in lines[3:]}
    assert rows["USER"] == ["USER", "SESSIONS", "HOURS", "IN", "OUT", "CPU_HOURS", "GPU_HOURS"]
    assert rows["zoe"] == ["zoe", "3", "2.50", "1.0KiB", "5.0KiB", "-", "-"]
    assert rows["秀樹"] == ["秀樹", "1", "4.00", "7B", "3B", "-", "-"]
    assert rows["TOTAL"][:3] == ["TOTAL", "4", "6.50"]

    r = run_cli(state, *MARCH, "--format=csv", "--no-sacct")
    assert r.returncode == 0
    assert "CPU/GPU columns empty" in r.stderr
    got = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [g["user"] for g in got] == ["zoe", "秀樹"]
    assert got[0] == {
        "user": "zoe",
        "sessions": "3",
        "hours": "2.5",
        "bytes_in": "1024",
        "bytes_out": "5076",
        "cpu_hours": "",
        "gpu_hours": "",
    }

    r = run_cli(state, "--user", "zoe", "--format", "json", "--no-sacct")  # whole history, one user
    rep = json.loads(r.stdout)
    assert [u["user"] for u in rep["users"]] == ["zoe"]
    assert rep["users"][0]["sessions"] == 4
    assert rep["users"][0]["hours"] == pytest.approx(2.5 + 59 / 60, abs=1e-3)  # + February's 10:01 -> 11:00

    # periods split by registration time: consecutive periods never count a session twice
    parts = [
        run_cli(state, "--since", a, "--until", b, "--format", "json", "--no-sacct")
        for a, b in (("2026-01-01", "2026-03-10"), ("2026-03-10", "2026-05-01"))
    ]
    counts = [json.loads(p.stdout)["totals"]["sessions"] for p in parts]
    assert counts == [2, 4] and sum(counts) == len(PLAN)
    # an ISO date-time with an offset works too
    r = run_cli(
        state, "--since", "2026-03-15T08:00:00", "--until", "2026-03-15T08:00:01", "--format", "json", "--no-sacct"
    )
    assert [u["user"] for u in json.loads(r.stdout)["users"]] == ["秀樹"]


def test_live_session_hours_run_until_now(tmp_path):
    path = str(tmp_path / "s" / "broker.sqlite")

    async def go() -> None:
        store = SessionStore(path)
        broker = Broker(
            store=store, host_key=asyncssh.generate_private_key("ssh-ed25519"), hub_api=("127.0.0.1", 1), chp=None
        )
        s, _ = await broker.create_session("zoe", "", "/user/zoe/")
        store.update(s.id, state="ready", connected_at=time.time() - 1800, ready_at=time.time() - 1790)
        store.close()

    asyncio.run(go())
    r = run_cli(str(tmp_path / "s"), "--format", "json", "--no-sacct")
    rep = json.loads(r.stdout)
    assert rep["users"][0]["live_sessions"] == 1
    assert rep["users"][0]["hours"] == pytest.approx(0.5, abs=0.01)


def test_store_is_opened_read_only(state):
    db = os.path.join(state, "broker.sqlite")
    before = os.stat(db).st_mtime_ns
    os.chmod(db, 0o400)
    try:
        r = run_cli(state, "--format", "json", "--no-sacct")
        assert r.returncode == 0, r.stderr
    finally:
        os.chmod(db, 0o600)
    assert os.stat(db).st_mtime_ns == before


def test_errors(tmp_path, state):
    r = run_cli(str(tmp_path / "nothing-here"), "--no-sacct", cwd=str(tmp_path))
    assert r.returncode == 1 and "no session database" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(state, "--since", "last tuesday")
    assert r.returncode == 1 and "not a date" in r.stderr
    r = run_cli(state, "--since", "2026-03-02", "--until", "2026-03-01")
    assert r.returncode == 1 and "--until" in r.stderr
    r = run_cli(state, "--format", "xml")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# -- sacct ------------------------------------------------------------------------------------


def test_parse_real_sacct_output():
    usage = acct.parse_sacct(REAL_SACCT)
    assert usage == {"2": {"cpu_seconds": 6.0, "gpu_seconds": 0.0, "elapsed_seconds": 3.0}}
    # GPU TRES as Slurm writes it (total and typed), days in Elapsed, array ids, steps skipped
    text = (
        "77|7200|billing=4,cpu=4,gres/gpu=2,gres/gpu:a100=2,mem=8G,node=1|00:30:00\n"
        "77.batch|7200|cpu=4,gres/gpu=2,mem=8G,node=1|00:30:00\n77.extern|7200|x|00:30:00\n"
        "78_3|172800|cpu=1,gres/gpu:v100=1,node=1|2-00:00:00\n79|0||\n"
    )
    u = acct.parse_sacct(text)
    assert u["77"]["gpu_seconds"] == 2 * 1800 and u["77"]["cpu_seconds"] == 7200
    assert u["78_3"]["gpu_seconds"] == 2 * 86400
    assert u["79"] == {"cpu_seconds": 0.0, "gpu_seconds": 0.0, "elapsed_seconds": 0.0}
    assert acct.parse_elapsed("01:02.500") == pytest.approx(62.5)


def test_sacct_missing_and_failing(tmp_path):
    usage, note = acct.sacct_usage(["1"], sacct=str(tmp_path / "no-sacct"))
    assert usage is None and "not found" in note
    fake = tmp_path / "sacct"
    fake.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    fake.chmod(0o755)
    usage, note = acct.sacct_usage(["1", "local-7"], sacct=str(fake))
    assert usage is None and note.startswith("Slurm accounting storage is disabled")
    usage, note = acct.sacct_usage(["local-7"], sacct=str(fake))  # no Slurm ids: sacct not run
    assert usage == {} and "no Slurm job ids" in note


@pytest.mark.skipif(shutil.which("sacct") is None, reason="no sacct on this machine")
def test_sacct_disabled_is_reported(state):
    """The shared dev cluster's real sacct (accounting storage none): the report says so."""
    probe = subprocess.run(["sacct", "-n", "-P", "-j", "1", "-o", acct.SACCT_FIELDS], capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("this machine's Slurm has accounting enabled")
    r = run_cli(state, *MARCH, "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["sacct"]["available"] is False
    if "accounting storage is disabled" in (probe.stderr + probe.stdout).lower():
        assert "Slurm accounting storage is disabled" in rep["sacct"]["note"]
    assert all(u["cpu_hours"] is None for u in rep["users"])
    r = run_cli(state, *MARCH)
    assert "CPU/GPU time: " in r.stdout and " - " in r.stdout.splitlines()[4] + " "


# -- a real Slurm with slurmdbd, in its own namespace -----------------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_real_sacct_with_slurmdbd(tmp_path):
    with accounting_cluster() as cluster:
        job = cluster.ns("sbatch", "--parsable", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 3").stdout.strip()
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline:
            out = cluster.ns("sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State,CPUTimeRAW").stdout
            line = out.strip().splitlines()[0] if out.strip() else ""
            if "COMPLETED" in line:
                break
            time.sleep(1)
        assert "COMPLETED" in line, line
        cpu_raw = int(line.split("|")[2])
        assert cpu_raw >= 6  # 2 CPUs x >= 3 s

        state = tmp_path / "state"
        make_store(str(state / "broker.sqlite"))
        store = SessionStore(str(state / "broker.sqlite"))
        sid = [s for s in store.list(live_only=False) if s.job_id == "101"][0].id
        store.update(sid, job_id=job)  # zoe's first March session ran as this real job
        store.close()
        r = cluster.ns(
            PY,
            "-m",
            "broker.app",
            "accounting",
            f"--BrokerApp.state_dir={state}",
            *MARCH,
            "--format",
            "json",
            env={"PATH": os.path.dirname(PY) + ":/usr/bin:/bin", "PYTHONPATH": REPO},
        )
        rep = json.loads(r.stdout)
        assert rep["sacct"]["available"] is True, rep["sacct"]
        assert "1 of 4 jobs found" in rep["sacct"]["note"]  # 102-104 never ran on this cluster
        zoe = {u["user"]: u for u in rep["users"]}["zoe"]
        assert zoe["cpu_hours"] == pytest.approx(cpu_raw / 3600, abs=1e-4)
        assert zoe["gpu_hours"] == 0
        assert {u["user"]: u for u in rep["users"]}["秀樹"]["cpu_hours"] == 0
