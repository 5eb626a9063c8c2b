"""What every spawner on a real batch scheduler shares: the command runner (local or ONE pooled
SSH connection to a login node), the hub-wide job poller, job state from it, pending reasons on
the progress page, and the job's PATH/HOME.

:class:`SchedulerSpawnerMixin` sits between :class:`~hub_plugin.options.ResourceOptionsMixin`
and :class:`~hub_plugin.mixin.BrokerSpawnerMixin` in a spawner's bases; the scheduler-specific
subclass provides :attr:`SchedulerSpawnerMixin.poller` (a :class:`~hub_plugin.job_poller.JobPoller`
subclass, shared hub-wide), the submit/cancel commands and the batch script. Users:
:class:`hub_plugin.slurm.SlurmBrokerSpawner`, :class:`hub_plugin.gridengine.GridEngineBrokerSpawner`.

* ``query_job_status`` answers from the shared poller (never one status command per job);
  ``job_status`` is ``"STATE HOST"`` as batchspawner's regexes expect.
* While ``start()`` waits, a pending job's reason (and estimated start, where the scheduler
  knows one) goes to the progress page once per change.
* ``stop()`` asks for a query that started after the cancel, so a stopped job is seen gone.
* ``run_command`` runs batchspawner's command strings through the runner without a shell; the
  job environment goes through the runner's environment mechanism, never a command line.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from batchspawner.batchspawner import JobStatus
from traitlets import Integer, Unicode, default

from .job_poller import GONE, JobInfo, JobPoller, JobQueryError
from .remote import CommandRunner, LocalRunner, LoginNodeRunner, RunnerError
from .spawner_api import BatchSpawnerAPI

if TYPE_CHECKING:
    from .mixin import BrokerSpawnerMixin

    _Base = BrokerSpawnerMixin
else:
    _Base = BatchSpawnerAPI

__all__ = ["SchedulerSpawnerMixin"]


class SchedulerSpawnerMixin(_Base):
    """Runner, shared poller and job state for a scheduler spawner (see the module docstring)."""

    #: job_status text when the status command fails (batchspawner's Slurm regexes know Slurm's)
    status_error_prefix = "status query error"

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    req_path = Unicode(help="Directories (colon-separated) put first on the job's PATH. Default: the directory of the hub's Python, for clusters that share the hub's installation.").tag(config=True)
    req_output_dir = Unicode("", help="Directory of the job output files (<dir>/jupyterhub-<user>-<job id>.log). Must be writable by the job's user on the compute node. Default: the user's home directory, or /tmp when there is none.").tag(config=True)

    req_job_name = Unicode("jupyterhub", help="Job name (sbatch --job-name, qsub -N).").tag(config=True)
    home_root = Unicode("", help="With submit_as='service': each user's home is home_root/<username> (the job's working directory and HOME). Empty: the user's passwd home, if the account exists.").tag(config=True)
    login_node_host = Unicode("", help="Submit through SSH to this login node. Empty: run the scheduler commands (sbatch/squeue/scancel, qsub/qstat/qdel) locally.").tag(config=True)
    login_node_port = Integer(22, help="SSH port of the login node.").tag(config=True)
    login_node_user = Unicode("", help="SSH user on the login node (the submitting account).").tag(config=True)
    login_node_key_file = Unicode("", help="Private key file for the login node.").tag(config=True)
    login_node_max_sessions = Integer(8, help="Most commands run at once over the shared login-node connection (each is one SSH session channel). Keep it below the login node's sshd MaxSessions (OpenSSH default 10): sshd refuses channels beyond it, and the runner then reconnects, losing commands in flight.").tag(config=True)
    login_node_known_hosts = Unicode("", help="known_hosts file holding the login node's host key (required: keys are always verified).").tag(config=True)
    # fmt: on

    @default("req_path")
    def _req_path_default(self) -> str:
        return os.path.dirname(sys.executable)

    def submits_as_service(self) -> bool:
        """Whether every job runs as the submitting (service) account (``submit_as``)."""
        return getattr(self, "submit_as", "service") == "service"

    # -- shared runner and poller ------------------------------------------------------------
    _runners: dict[tuple[Any, ...], CommandRunner] = {}

    def _runner_key(self) -> tuple[Any, ...]:
        if not self.login_node_host:
            return ("local",)
        return (
            "ssh",
            self.login_node_host,
            self.login_node_port,
            self.login_node_user,
            self.login_node_key_file,
            self.login_node_known_hosts,
        )

    @property
    def runner(self) -> CommandRunner:
        """The hub-wide command runner: one LocalRunner, or ONE pooled LoginNodeRunner."""
        try:
            loop_id = id(asyncio.get_running_loop())
        except RuntimeError:
            loop_id = None
        key = (*self._runner_key(), loop_id)
        runner = self._runners.get(key)
        if runner is None or getattr(runner, "_closed", False):
            if not self.login_node_host:
                runner = LocalRunner(log=self.log)
            else:
                if not self.login_node_key_file:
                    raise RuntimeError(f"{type(self).__name__}.login_node_key_file must be set with login_node_host")
                if not self.login_node_known_hosts:
                    raise RuntimeError(f"{type(self).__name__}.login_node_known_hosts must be set with login_node_host")
                runner = LoginNodeRunner(
                    self.login_node_host,
                    port=self.login_node_port,
                    username=self.login_node_user or None,
                    client_keys=[self.login_node_key_file],
                    known_hosts=self.login_node_known_hosts,
                    log=self.log,
                    max_sessions=max(1, self.login_node_max_sessions),
                )
            self._runners[key] = runner
        return runner

    @property
    def poller(self) -> JobPoller:
        """The hub-wide job poller of this scheduler (``JobPoller.shared(...)``)."""
        raise NotImplementedError

    # -- commands ------------------------------------------------------------------------------
    async def run_command(self, cmd: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        """Run a batchspawner command string through the shared runner (no local shell).

        ``env`` goes to the runner's environment mechanism (never the command line); stdout is
        returned, a non-zero exit raises RuntimeError(stderr) as batchspawner expects.
        """
        argv = shlex.split(cmd)
        try:
            result = await self.runner.run(argv, input=input, env=env)
        except RunnerError as e:
            raise RuntimeError(str(e)) from None
        if result.exit_status != 0:
            err = result.stderr.strip()[:2000]
            self.log.error("%s: %s exited %s: %s", self._log_name, argv[0], result.exit_status, err)
            raise RuntimeError(err or f"{argv[0]} exited {result.exit_status}")
        return result.stdout.strip()

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        # PATH for the submit command and a fallback for the job (the script prepends req_path)
        env["PATH"] = ":".join(p for p in (self.req_path, "/usr/local/bin:/usr/bin:/bin") if p)
        if self.submits_as_service() and self.home_root:
            env["HOME"] = self.req_homedir
        return env

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        """USER/HOME/SHELL like batchspawner, tolerating users without a local account."""
        env["USER"] = self.user.name
        try:
            pw = pwd.getpwnam(self.user.name)
        except KeyError:
            pw = None
        if pw is not None:
            if pw.pw_dir:
                env["HOME"] = pw.pw_dir
            if pw.pw_shell:
                env["SHELL"] = pw.pw_shell
        return env

    @default("req_homedir")
    def _req_homedir_default(self) -> str:
        if self.submits_as_service() and self.home_root:
            return os.path.join(self.home_root, self.user.name)
        try:
            return pwd.getpwnam(self.user.name).pw_dir
        except KeyError:
            return ""

    # -- job status from the shared poller -------------------------------------------------------
    _watching = ""  # job id this spawner has subscribed in the poller
    _fresh_status = False  # stop(): wait for queries that started after the cancel
    _in_start = False
    _last_pending: tuple[Any, ...] | None = None
    job_info: JobInfo | None = None

    def _watch(self) -> None:
        if self._watching != self.job_id:
            self._unwatch()
            self.poller.watch(self.job_id)
            self._watching = self.job_id

    def _unwatch(self) -> None:
        if self._watching:
            try:
                self.poller.unwatch(self._watching)
            finally:
                self._watching = ""

    async def query_job_status(self) -> JobStatus:
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        self._watch()
        try:
            info = await self.poller.status(self.job_id, fresh=self._fresh_status)
        except JobQueryError as e:
            self.job_status = f"{self.status_error_prefix}: {str(e)[:200]}"
            self.job_info = None
            return JobStatus.UNKNOWN
        self.job_info = info
        self.job_status = f"{info.state} {info.node}" if info.node else info.state
        if info.is_running:
            status = JobStatus.RUNNING
        elif info.is_pending:
            status = JobStatus.PENDING
            if self._in_start:
                self._report_pending(info)
        elif info.is_finished:
            status = JobStatus.NOTFOUND
        else:
            status = JobStatus.UNKNOWN
        return status

    def _report_pending(self, info: JobInfo) -> None:
        key = (info.reason, info.start_time, info.position, info.queued)
        if key == self._last_pending:
            return
        self._last_pending = key
        msg = f"Job {info.job_id} pending"
        if info.reason:
            msg += f" ({info.reason})"
        if info.position and info.queued:
            msg += f"; position {info.position} of {info.queued} waiting in partition {info.partition}"
        if info.start_time:
            msg += f"; estimated start {info.start_time.isoformat(sep=' ', timespec='minutes')}"
        self._event(msg, 30)

    def state_ispending(self) -> bool:
        return bool(self.job_info and self.job_info.is_pending)

    def state_isrunning(self) -> bool:
        return bool(self.job_info and self.job_info.is_running)

    def state_gethost(self) -> str:
        return (self.job_info.node or "") if self.job_info else ""

    def job_output_file(self, job_id: str) -> str:
        """Path of job *job_id*'s output file where the batch commands run ("" when unknown or not
        one of this scheduler's ids)."""
        return ""

    async def tail_file(self, path: str, max_lines: int = 0, max_bytes: int = 0) -> str | None:
        """``tail -n``/``tail -c`` of *path* through the runner (locally or on the login node); None
        when it cannot be read."""
        what = ["-c", str(int(max_bytes))] if max_bytes > 0 else ["-n", str(int(max_lines or 200))]
        try:
            r = await self.runner.run(["tail", *what, "--", path], timeout=30)
        except RunnerError:
            return None
        return r.stdout if r.exit_status == 0 else None

    async def job_output_tail(self, max_lines: int = 20) -> str:
        path = self.job_output_file(self.job_id) if self.job_id else ""
        if not path:
            return ""
        return await self.tail_file(path, max_lines) or ""

    async def final_job_state(self, job_id: str, wait: float = 40.0) -> str:
        """The scheduler's final state of an ended job (Slurm: ``TIMEOUT``, ``CANCELLED``,
        ``NODE_FAIL``, ...), asking the shared poller for up to *wait* seconds while the job is
        still completing (Slurm keeps a job COMPLETING up to KillWait, 30 s by default, and longer on a
        busy node; the session card shows "ending" meanwhile); "" when it is not known (Slurm: purged from squeue after ``MinJobAge``;
        Grid Engine: finished jobs leave qstat at once)."""
        deadline = time.monotonic() + wait
        self.poller.watch(job_id)
        try:
            while True:
                try:
                    info = await self.poller.status(job_id, fresh=True)
                except JobQueryError:
                    return ""
                if info.state == GONE:
                    return ""
                if info.is_finished:
                    return info.state
                if time.monotonic() >= deadline:
                    return ""
                await asyncio.sleep(1.0)
        finally:
            self.poller.unwatch(job_id)

    # -- spawner API -----------------------------------------------------------------------------
    async def start(self) -> str:
        self._in_start = True
        self._last_pending = None
        try:
            return await super().start()
        finally:
            self._in_start = False

    async def stop(self, now: bool = False) -> None:
        self._fresh_status = True
        try:
            await super().stop(now=now)
        finally:
            self._fresh_status = False

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_info = None

    def clear_state(self) -> None:
        self._unwatch()
        self.job_info = None
        super().clear_state()
