"""The embedded local batch system: batch jobs that are plain processes on this machine.

It lets the whole stack run on one laptop with the same code path as a real cluster: the
spawner submits, queries and cancels jobs through a small command line, exactly as it
would call ``sbatch`` / ``squeue`` / ``scancel``.

Command line (all state lives in the spool directory, one sub-directory per job)::

    python -m hub_plugin.localbatch submit --spool DIR          < script
    python -m hub_plugin.localbatch query  --spool DIR JOBID
    python -m hub_plugin.localbatch cancel --spool DIR [--grace SECONDS] JOBID

``submit`` reads a bash script on stdin, stores it as ``DIR/<jobid>/script`` (job dir mode
0700), starts it detached (new session, stdin ``/dev/null``, stdout and stderr appended to
``DIR/<jobid>/output.log``) and prints the job id, a decimal integer, as the only line on
stdout. It returns at once. The job inherits the submit command's environment unchanged:
that is the only channel for secrets (never argv, never the script text).

``query`` prints exactly one line, one of::

    RUNNING <hostname>
    PENDING
    COMPLETED 0
    FAILED <exit>          (<exit> is the script's exit status; 128+N if killed by signal N;
                            -1 if the job's wrapper vanished without recording a status)
    CANCELLED

and exits 0, or exits 1 with a message on stderr if the job id is unknown.

``cancel`` sends SIGTERM to every process of the job's session, waits up to the grace
period (default 5 s) and then sends SIGKILL to whatever is left; it returns when the
processes are gone (or after a short final wait). A job that had not ended is recorded as
CANCELLED. Cancelling an ended job is a no-op (its status is kept) and exits 0.

Each job runs under a tiny wrapper (``_run``, internal) that is the session leader: it runs
``bash script``, waits, writes ``DIR/<jobid>/exit_status`` atomically and then cleans up
any processes the script left behind in its session, as a real batch system does.
``job.json`` records the wrapper's pid, its start time (``/proc/PID/stat`` field 22, so a
recycled pid is never mistaken for the job), the host and the submit time.

Liveness never trusts ``kill -0``: PID 1 on these machines may reap zombies lazily, so a
process in state ``Z`` counts as ended.

This module uses the standard library only and does not import its package, so it can
also be run by path (``python -I .../localbatch.py``) from an environment that does not
have the project on ``sys.path``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROG = "localbatch"
JOB_ID_RE = re.compile(r"^[0-9]{1,18}$")
DEFAULT_GRACE = 5.0
# After the script ends, leftover processes of its session get this long after SIGTERM.
LEFTOVER_GRACE = 2.0
POLL = 0.05

SCRIPT = "script"
JOB_JSON = "job.json"
EXIT_STATUS = "exit_status"
CANCELLED = "cancelled"
OUTPUT = "output.log"
SEQ = ".seq"


class LocalBatchError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 1."""


# --------------------------------------------------------------------------- /proc helpers


def read_stat(pid: int) -> tuple[str, int, int, int] | None:
    """Return (state, pgrp, session, starttime) from /proc/PID/stat, or None if gone.

    The command name (field 2) may contain spaces and parentheses, so fields are
    counted from the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return rest[0].decode(), int(rest[2]), int(rest[3]), int(rest[19])


def is_alive(pid: int, starttime: int | None = None) -> bool:
    """True if PID exists, is not a zombie and (if given) started at STARTTIME."""
    st = read_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return starttime is None or st[3] == starttime


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) pids whose session or process group is SID."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        st = read_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        if st[1] == sid or st[2] == sid:
            found.append(pid)
    return found


def signal_session(sid: int, sig: int) -> None:
    """Send SIG to the process group SID and to every other member of session SID.

    The caller itself is spared (the job wrapper cleans up its own session).
    """
    if os.getpgrp() != sid:
        try:
            os.killpg(sid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_session_gone(sid: int, timeout: float) -> bool:
    """Wait up to TIMEOUT seconds until session SID has no live members."""
    deadline = time.monotonic() + timeout
    while True:
        if not session_members(sid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def terminate_session(sid: int, grace: float) -> None:
    """SIGTERM the session, SIGKILL what survives GRACE seconds, wait briefly for the end."""
    signal_session(sid, signal.SIGTERM)
    if wait_session_gone(sid, grace):
        return
    signal_session(sid, signal.SIGKILL)
    wait_session_gone(sid, 2.0)


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write TEXT to PATH atomically (temp file in the same dir, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def prepare_spool(spool: Path) -> Path:
    """Create SPOOL (mode 0700) if missing; refuse one owned by someone else or writable by others."""
    spool = spool.absolute()
    try:
        spool.mkdir(mode=0o700, parents=True)
        os.chmod(spool, 0o700)
    except FileExistsError:
        pass
    st = os.stat(spool)
    if st.st_uid != os.geteuid():
        raise LocalBatchError(f"spool directory {spool} is not owned by uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise LocalBatchError(f"spool directory {spool} is writable by group or others")
    return spool


def allocate_job_dir(spool: Path) -> tuple[str, Path]:
    """Allocate the next job id under an exclusive lock and create its 0700 directory."""
    fd = os.open(spool / SEQ, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.read(fd, 64).decode().strip()
        n = int(raw) + 1 if raw.isdigit() else 1
        while True:
            jobdir = spool / str(n)
            try:
                jobdir.mkdir(mode=0o700)
                break
            except FileExistsError:
                n += 1
        os.chmod(jobdir, 0o700)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)  # releases the lock
    return str(n), jobdir


def job_dir(spool: Path, job_id: str) -> Path:
    """Return the directory of an existing job, or raise LocalBatchError('unknown job id')."""
    if not JOB_ID_RE.match(job_id):
        raise LocalBatchError(f"unknown job id {job_id!r} (job ids are decimal integers)")
    d = spool.absolute() / job_id
    if not d.is_dir():
        raise LocalBatchError(f"unknown job id {job_id!r} in spool {spool.absolute()}")
    return d


def load_job(d: Path) -> dict | None:
    """Return job.json's content, or None while submit has not written it yet."""
    try:
        return json.loads((d / JOB_JSON).read_text())
    except FileNotFoundError:
        return None


def read_exit_status(d: Path) -> int | None:
    try:
        return int((d / EXIT_STATUS).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- commands


def cmd_submit(spool: Path) -> str:
    """Store the script from stdin, start it detached, return the job id."""
    script = sys.stdin.buffer.read()
    spool = prepare_spool(spool)
    job_id, d = allocate_job_dir(spool)
    try:
        fd = os.open(d / SCRIPT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(script)
        out_fd = os.open(d / OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "_run", str(d)],
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=out_fd,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(out_fd)
        st = read_stat(proc.pid)
        # The wrapper cannot have been reaped (we are its parent), so st is only None if
        # /proc is unusable; then the start time cannot guard against pid reuse.
        job = {
            "job_id": job_id,
            "pid": proc.pid,
            "start_time": st[3] if st else None,
            "submit_time": time.time(),
            "host": socket.gethostname(),
        }
        write_atomic(d / JOB_JSON, json.dumps(job, indent=1) + "\n")
        # Forget the child without waiting: it runs on in its own session and is reaped
        # by whoever inherits it when we exit. (Marking it done stops Popen.__del__ from
        # warning about a still-running child.)
        proc.returncode = 0
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return job_id


def job_state(d: Path) -> str:
    """Compute the one-line state of the job in directory D (see module docstring)."""
    if (d / CANCELLED).exists():
        return "CANCELLED"
    status = read_exit_status(d)
    if status is None:
        job = load_job(d)
        if job is None:
            return "PENDING"
        if is_alive(job["pid"], job.get("start_time")):
            return f"RUNNING {job['host']}"
        # The wrapper writes exit_status before it exits: read again to close the race.
        status = read_exit_status(d)
        if status is None:
            return "FAILED -1"
    return "COMPLETED 0" if status == 0 else f"FAILED {status}"


def cmd_query(spool: Path, job_id: str) -> str:
    return job_state(job_dir(spool, job_id))


def cmd_cancel(spool: Path, job_id: str, grace: float) -> None:
    """Terminate the job's session; record CANCELLED unless the job had already ended."""
    d = job_dir(spool, job_id)
    job = load_job(d)
    deadline = time.monotonic() + 2.0
    while job is None and time.monotonic() < deadline:  # submit still writing job.json
        time.sleep(POLL)
        job = load_job(d)
    ended = read_exit_status(d) is not None or (d / CANCELLED).exists()
    if job is None:
        if not ended:
            write_atomic(d / CANCELLED, f"{time.time()}\n")
        return
    pid, start = job["pid"], job.get("start_time")
    leader = read_stat(pid)
    if leader is not None and start is not None and leader[3] != start:
        # The pid now belongs to another process: the job and all of its session are
        # gone (the kernel does not reuse a pid still in use as a session id).
        alive = False
    else:
        alive = is_alive(pid, start) or bool(session_members(pid))
    # Read the status after the liveness check: the wrapper records it before exiting.
    # A job that is not alive and has no status ended abnormally (FAILED -1): keep that.
    ended = ended or read_exit_status(d) is not None or not alive
    if not ended:
        write_atomic(d / CANCELLED, f"{time.time()}\n")
    if alive:
        terminate_session(pid, grace)


def cmd_run(d: Path) -> int:
    """Job wrapper (session leader): run the script, record its exit status, clean up."""
    children: list[subprocess.Popen] = []

    def forward(signum, _frame):
        # A Python handler (not SIG_IGN) so the script does not inherit an ignored signal.
        # A signal sent to the whole group reaches the script already; forwarding covers a
        # signal sent to this pid only.
        for child in children:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    proc = subprocess.Popen(
        [shutil.which("bash") or "/bin/bash", str(d / SCRIPT)],
        stdin=subprocess.DEVNULL,
    )
    children.append(proc)
    rc = proc.wait()
    if rc < 0:
        rc = 128 - rc
    write_atomic(d / EXIT_STATUS, f"{rc}\n")
    # Like a real batch system, nothing of the job outlives it.
    me = os.getpid()
    if session_members(me):
        terminate_session(me, LEFTOVER_GRACE)
    return rc


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Embedded local batch system.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit the bash script read from stdin; print the job id")
    s.add_argument("--spool", required=True, type=Path, help="spool directory")
    q = sub.add_parser("query", help="print the job's state as one line")
    q.add_argument("--spool", required=True, type=Path, help="spool directory")
    q.add_argument("job_id")
    c = sub.add_parser("cancel", help="terminate the job (SIGTERM, then SIGKILL)")
    c.add_argument("--spool", required=True, type=Path, help="spool directory")
    c.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help=f"seconds between SIGTERM and SIGKILL (default {DEFAULT_GRACE:g})",
    )
    c.add_argument("job_id")
    r = sub.add_parser("_run")  # internal: the job wrapper
    r.add_argument("jobdir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "submit":
            print(cmd_submit(args.spool), flush=True)
        elif args.command == "query":
            print(cmd_query(args.spool, args.job_id), flush=True)
        elif args.command == "cancel":
            cmd_cancel(args.spool, args.job_id, args.grace)
        elif args.command == "_run":
            return cmd_run(args.jobdir.absolute())
    except LocalBatchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
