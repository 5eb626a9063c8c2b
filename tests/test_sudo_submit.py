"""Per-user submission through sudo (SlurmBrokerSpawner.submit_as = "sudo") on the real
single-node Slurm, from an unprivileged service account governed by the shipped sudoers file
(examples/production/sudoers, installed with only the account and group names substituted):
locally (the spawner runs as the service account) and through the login node (a real sshd,
tests/sshd.py, logged in as the service account).

Each job's "agent" is a shell line that writes the SHA-256 of the enrolment secret it received to
its output and sleeps: that proves the secret reached the job by name. While submitting, every
process's command line (/proc/*/cmdline) is sampled; sudo writes its log to a file (a test-only
``Defaults logfile``); neither may contain the secret.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import pwd
import secrets
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from hub_plugin.slurm import SlurmBrokerSpawner

from harness import REPO, wait_until
from slurm_cluster import JOB_TAG, SBIN, Accounts, others_can_reach, others_can_run_python, real_binary, run

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300), pytest.mark.usefixtures("cancel_leftover_jobs")]

#: the job's stand-in for the node agent: prove the secret arrived (its hash), then stay running
AGENT = 'sh -c \'printf %s "$BROKER_ENROL_SECRET" | sha256sum; echo "user=$(id -un)"; sleep 120\' --'


def spawner_settings(acc: Accounts) -> dict:
    return dict(
        submit_as="sudo",
        agent_command=AGENT,
        req_job_name=JOB_TAG,
        req_output_dir=str(acc.out_dir),
        req_runtime="10",
        req_walltime_warning=0,
        req_path="/usr/bin:/bin",
        slurm_poll_interval=1.0,
    )


def make_spawner(user: str, secret: str, **kw) -> SlurmBrokerSpawner:
    """A SlurmBrokerSpawner for *user* as start() leaves it just before submitting."""
    hub = SimpleNamespace(public_host="", api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/")
    u = SimpleNamespace(name=user, url=f"/user/{user}/", escaped_name=user)
    sp = SlurmBrokerSpawner(user=u, hub=hub, cmd=["jupyterhub-singleuser"], **kw)
    sp._broker_env = {"BROKER_ENROL_SECRET": secret, "BROKER_SESSION_ID": "s-" + user}
    sp.api_token = secrets.token_hex(16)
    return sp


class CmdlineWatch:
    """Samples every process's command line until stopped; ``seen`` holds those naming a job command."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        text = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if any(w in text for w in ("sbatch", "sudo", "bash -s", "scancel")):
                    self.seen.append(text)
            time.sleep(0.001)

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def job_owner(job_id: str) -> str:
    return run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%u").stdout.strip()


def check_job_ran_as_user_with_the_secret(acc: Accounts, job_id: str, secret: str) -> None:
    out = acc.out_dir / f"jupyterhub-{acc.user}-{job_id}.log"
    wait_until(lambda: out.exists() and "user=" in out.read_text(), 60, what="the job's output")
    text = out.read_text()
    assert hashlib.sha256(secret.encode()).hexdigest() in text, text  # the secret arrived, by name
    assert f"user={acc.user}" in text
    assert job_owner(job_id) == acc.user


def sudo_entries(log: str) -> list[str]:
    """sudo's log file, one entry per item (sudo indents an entry's continuation lines)."""
    entries: list[str] = []
    for line in log.splitlines():
        if line[:1].isspace() and entries:
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(line)
    return entries


def check_no_secret_leaked(acc: Accounts, watch: CmdlineWatch, secret: str, job_id: str) -> None:
    assert not [c for c in watch.seen if secret in c]
    log = acc.sudo_log.read_text()
    lines = [x for x in sudo_entries(log) if "sbatch --parsable" in x]
    assert lines and "--export=" in lines[-1] and "BROKER_ENROL_SECRET" in lines[-1], log
    assert secret not in log, log
    assert not [x for x in lines if "ENV=" in x], lines  # no variable passed with its value
    script = run("scontrol", "write", "batch_script", job_id, "-").stdout
    assert secret not in script


# -- locally: the hub's own account submits ---------------------------------------------------


def as_service(acc: Accounts, request: dict) -> dict:
    """Run the spawner's submit or cancel as the service account (a separate process)."""
    code = (
        "import asyncio, json, sys\n"
        "from hub_plugin.slurm import SlurmBrokerSpawner\n"
        "from types import SimpleNamespace\n"
        "r = json.loads(sys.stdin.read())\n"
        "u = SimpleNamespace(name=r['user'], url='/user/x/', escaped_name=r['user'])\n"
        "hub = SimpleNamespace(public_host='', api_url='http://127.0.0.1:8081/hub/api', base_url='/hub/')\n"
        "sp = SlurmBrokerSpawner(user=u, hub=hub, cmd=['jupyterhub-singleuser'], **r['settings'])\n"
        "sp._broker_env = {'BROKER_ENROL_SECRET': r['secret'], 'BROKER_SESSION_ID': 's1'}\n"
        "async def go():\n"
        "    if r['job_id']:\n"
        "        sp.job_id = r['job_id']\n"
        "        await sp.cancel_batch_job()\n"
        "        return r['job_id']\n"
        "    return await sp.submit_batch_script()\n"
        "print(json.dumps({'job_id': asyncio.run(go())}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": f"/home/{acc.service}", "LANG": "C.UTF-8"}
    r = subprocess.run(
        [SBIN + "runuser", "-u", acc.service, "--", sys.executable, "-c", code],
        input=json.dumps(request),  # the secret: not on this command line either
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/tmp",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_local_sudo_submission_runs_the_job_as_the_user(accounts):
    acc = accounts
    secret = secrets.token_urlsafe(24)
    request = {"user": acc.user, "secret": secret, "settings": spawner_settings(acc), "job_id": ""}
    with others_can_run_python(), CmdlineWatch() as watch:
        job_id = as_service(acc, request)["job_id"]
        assert job_id.isdigit()
        check_job_ran_as_user_with_the_secret(acc, job_id, secret)
        as_service(acc, {**request, "job_id": job_id})  # scancel through sudo, as the user
    wait_until(
        lambda: (
            run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip() in ("", "CANCELLED")
        ),
        20,
        what="job cancelled through sudo",
    )
    check_no_secret_leaked(acc, watch, secret, job_id)
    assert pwd.getpwnam(acc.service).pw_uid != 0


def test_the_sudoers_rule_refuses_anything_but_the_scheduler_commands(accounts):
    acc = accounts
    assert acc.user in grp.getgrnam(acc.group).gr_mem

    def sudo(*argv: str) -> subprocess.CompletedProcess[str]:
        return run(SBIN + "runuser", "-u", acc.service, "--", "sudo", "-n", *argv)

    # allowed: the scheduler commands, as a member of the users' group
    assert sudo("-u", acc.user, "--", "/usr/bin/sbatch", "--version").returncode == 0
    # refused: another command as the user, the scheduler commands as root or the service account
    for argv in (
        ("-u", acc.user, "--", "/bin/sh", "-c", "id"),
        ("-u", acc.user, "--", "/usr/bin/env"),
        ("-u", "root", "--", "/usr/bin/sbatch", "--version"),
        ("-u", acc.service, "--", "/usr/bin/sbatch", "--version"),
    ):
        r = sudo(*argv)
        refused = ("a password is required" in r.stderr) or ("is not allowed to execute" in r.stderr)
        assert r.returncode == 1 and refused, (argv, r.stderr)
    # a variable the rule does not keep cannot be smuggled in by name
    r = run(
        SBIN + "runuser",
        "-u",
        acc.service,
        "--",
        "/usr/bin/env",
        "SITE_SETTING=x",
        "sudo",
        "-n",
        "--preserve-env=SITE_SETTING",
        "-u",
        acc.user,
        "--",
        "/usr/bin/sbatch",
        "--version",
    )
    assert r.returncode == 1 and "not allowed to" in r.stderr, r.stderr


# -- through the login node ---------------------------------------------------------------------


def test_sudo_submission_through_the_login_node(accounts, sshd):
    acc = accounts
    secret = secrets.token_urlsafe(24)
    settings = spawner_settings(acc) | dict(
        login_node_host="127.0.0.1",
        login_node_port=sshd.port,
        login_node_user=acc.service,
        login_node_key_file=str(sshd.client_key),
        login_node_known_hosts=str(sshd.known_hosts),
    )

    async def go() -> str:
        sp = make_spawner(acc.user, secret, **settings)
        try:
            job_id = await sp.submit_batch_script()
            await asyncio.to_thread(check_job_ran_as_user_with_the_secret, acc, job_id, secret)
            # a non-scheduler command over the same login-node account is refused by the rule
            r = await sp.runner.run(["sudo", "-n", "-u", acc.user, "--", "/usr/bin/id"])
            assert r.exit_status == 1 and "a password is required" in r.stderr, r
            await sp.cancel_batch_job()
            return job_id
        finally:
            await sp.runner.close()
            SlurmBrokerSpawner._runners.clear()

    # sshd reads the (test sshd's one) authorized_keys file as the service account
    with others_can_reach(str(sshd.root / "authorized_keys")), CmdlineWatch() as watch:
        job_id = asyncio.run(go())
    wait_until(
        lambda: (
            run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip() in ("", "CANCELLED")
        ),
        20,
        what="job cancelled through sudo on the login node",
    )
    check_no_secret_leaked(acc, watch, secret, job_id)
    assert secret not in sshd.log.read_text(errors="replace")
    assert f"Accepted publickey for {acc.service}" in sshd.log.read_text(errors="replace")
