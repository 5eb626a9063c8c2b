"""SlurmBrokerSpawner: notebooks as Slurm jobs, reached through the broker's tunnel.

Use in ``jupyterhub_config.py``::

    c.JupyterHub.spawner_class = "hub_plugin.slurm.SlurmBrokerSpawner"
    c.BrokerSpawnerMixin.broker_url = "http://127.0.0.1:8091"
    c.SlurmBrokerSpawner.req_partition = "interactive"
    c.SlurmBrokerSpawner.req_runtime = "8:00:00"
    c.SlurmBrokerSpawner.req_path = "/opt/jupyter/bin"        # node-agent, jupyterhub-singleuser
    c.SlurmBrokerSpawner.req_output_dir = "/scratch/jupyter-logs"  # writable by the job's user
    # hub not on the cluster: submit over ONE pooled SSH connection to a login node
    c.SlurmBrokerSpawner.login_node_host = "login1.cluster.example"
    c.SlurmBrokerSpawner.login_node_user = "jupyterhub"
    c.SlurmBrokerSpawner.login_node_key_file = "/etc/jupyterhub/login_ed25519"
    c.SlurmBrokerSpawner.login_node_known_hosts = "/etc/jupyterhub/login_known_hosts"

What differs from batchspawner's ``SlurmSpawner``:

* **One squeue for everyone.** ``query_job_status`` answers from the hub-wide
  :class:`~hub_plugin.slurm_poller.SlurmJobPoller` (at most one ``squeue`` per
  ``slurm_poll_interval`` for all jobs together), never one ``squeue`` per job.
  ``job_status`` is still set to ``"STATE HOST"`` so batchspawner's Slurm regexes and
  ``state_gethost`` keep working.
* **Secrets by name only.** ``sbatch`` always gets ``--export=NAME,NAME,...`` (names of
  ``get_env()``: ``JUPYTERHUB_*``, ``BROKER_*``, ...) on its command line; the values are only in
  sbatch's own environment. The hub's other variables (proxy token, cookie secret) do not reach
  the job, nothing secret is in the script text or on any command line, and nothing is logged.
* **Walltime warning.** ``--signal=B:USR1@<req_walltime_warning>``: Slurm signals the batch
  shell, which *is* the node agent (``exec``), before the time limit; the agent tells the broker
  (``broker status`` shows it).
* **Progress while pending**: job id, Slurm's reason and the estimated start time.
* **Remote submission**: with ``login_node_host`` set, sbatch/scancel/squeue run on the login
  node over ONE shared SSH connection (:class:`~hub_plugin.remote.LoginNodeRunner`); the job
  environment travels over the channel's stdin, never on the remote command line.
* **Identity**: ``submit_as = "service"`` (default) submits every job as the account the hub
  (or the login-node SSH user) runs as, with each user's home at ``home_root/<name>``;
  ``submit_as = "user"`` submits as the user's own Unix account with ``sbatch --uid=<name>
  --gid=<primary group>``
  (needs root or Slurm's SlurmUser on the submit host).
* **No shared nodes without a wall**: with ``submit_as = "service"`` every user's job runs as
  the same account, so unless a container walls each job off (``node-agent launch``, which
  checks that), another user's notebook on the same node could read this job's environment.
  Such jobs are submitted with ``--exclusive`` (``node_exclusivity``; ``"mcs"`` shares a node
  only among one user's jobs, via Slurm's MCS labels), and the options form says so.
  ``--exclusive=user`` would not help: Slurm's "user" is the shared account.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import re
import shlex
import sys
import time
from typing import Any

from batchspawner import SlurmSpawner
from batchspawner.batchspawner import JobStatus
from traitlets import Bool, Enum, Float, Integer, Unicode, default

from .mixin import BrokerSpawnerMixin
from .options import ResourceOptionsMixin
from .remote import CommandRunner, LocalRunner, LoginNodeRunner, RunnerError
from .slurm_poller import GONE, JobInfo, SlurmJobPoller, SlurmQueryError

__all__ = ["SlurmBrokerSpawner"]

#: Tells node-agent launch that this job counts on a container (node_agent/isolation.py).
EXPECT_CONTAINER_ENV = "NODE_AGENT_EXPECT_CONTAINER"

# Non-terminal states in which the job's processes exist (or are being torn down).
_RUNNING_LIKE = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"})

DEFAULT_BATCH_SCRIPT = """#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --output={{output_file}}
{% if partition %}#SBATCH --partition={{partition}}
{% endif %}{% if account %}#SBATCH --account={{account}}
{% endif %}{% if qos %}#SBATCH --qos={{qos}}
{% endif %}{% if reservation %}#SBATCH --reservation={{reservation}}
{% endif %}{% if runtime %}#SBATCH --time={{runtime}}
{% endif %}{% if memory %}#SBATCH --mem={{memory}}
{% endif %}{% if nprocs %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if gres %}#SBATCH --gres={{gres}}
{% elif ngpus %}#SBATCH --gpus={{ngpus}}
{% endif %}{% if walltime_warning %}#SBATCH --signal={% if not srun %}B:{% endif %}USR1@{{walltime_warning}}
{% endif %}{% if options %}#SBATCH {{options}}
{% endif %}{% if node_exclusive %}#SBATCH {{node_exclusive}}
{% endif %}
# Secrets (API token, enrolment secret) arrive in the environment, passed by NAME with
# sbatch --export: they are never written into this script.
set -eu
export PATH={{path}}"${PATH:+:$PATH}"
{% if homedir %}# the user's home (created on first use: a service account's homes live under home_root)
mkdir -p -m 0700 {{homedir}}
export HOME={{homedir}}
cd {{homedir}}
{% endif %}{{prologue}}
{% if srun %}{{srun}} {{cmd}}
{% else %}exec {{cmd}}
{% endif %}{{epilogue}}
"""


class SlurmBrokerSpawner(ResourceOptionsMixin, BrokerSpawnerMixin, SlurmSpawner):
    """Slurm through the broker (see the module docstring).

    Resource options (each ``req_xyz`` is ``{{xyz}}`` in ``batch_script``):

    * ``req_partition`` -> ``--partition``; ``req_account`` -> ``--account``;
      ``req_qos`` -> ``--qos``; ``req_reservation`` -> ``--reservation``
    * ``req_runtime`` -> ``--time`` (Slurm syntax: ``MM``, ``HH:MM:SS``, ``D-HH``, ...)
    * ``req_memory`` -> ``--mem`` (e.g. ``4G``); ``req_nprocs`` -> ``--cpus-per-task``
    * ``req_gres`` -> ``--gres`` (e.g. ``gpu:a100:1``); else ``req_ngpus`` -> ``--gpus``
    * ``req_options``: one more line of sbatch options, e.g. ``--constraint=avx512 --exclusive``
    * ``req_walltime_warning`` -> ``--signal=B:USR1@SECONDS``
    * ``req_path``: directories put first on the job's PATH (where ``node-agent`` and
      ``jupyterhub-singleuser`` live on the compute nodes)
    * ``req_output_dir``: where the job's output file goes; must exist on the compute node and
      be writable by the job's user
    * ``req_prologue`` / ``req_epilogue``: shell lines before / after the server
    """

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    batch_script = Unicode(DEFAULT_BATCH_SCRIPT, help="Template (jinja2) of the Slurm batch script; must contain {{cmd}} (the node agent followed by the server command). Do not put secrets in it: the job environment is passed by name with --export on sbatch's command line.").tag(config=True)

    batch_submit_cmd = Unicode("sbatch --parsable", help="Submit command; the script is read on stdin. --export=NAMES (and --uid when submit_as='user') are appended.").tag(config=True)
    batch_cancel_cmd = Unicode("scancel {job_id}", help="Cancel command.").tag(config=True)

    exec_prefix = Unicode("", help="Prefix for sbatch/scancel (batchspawner's default 'sudo -E -u {username}' is not used: see submit_as).").tag(config=True)

    req_srun = Unicode("", help="Empty (default): the batch shell execs the node agent, so Slurm's USR1 walltime warning reaches it directly. Set e.g. 'srun' to run it in a job step instead (the signal then goes to the steps).").tag(config=True)

    req_walltime_warning = Integer(300, help="Seconds before the time limit at which Slurm sends SIGUSR1 to the node agent (--signal=B:USR1@N; Slurm's resolution is about 60 s). 0 disables. Only has an effect with a time limit (req_runtime or the partition's default).").tag(config=True)

    req_path = Unicode(help="Directories (colon-separated) put first on the job's PATH. Default: the directory of the hub's Python, for clusters that share the hub's installation.").tag(config=True)
    # fmt: on

    @default("req_path")
    def _req_path_default(self) -> str:
        return os.path.dirname(sys.executable)

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    req_output_dir = Unicode("", help="Directory of the job output files (<dir>/jupyterhub-<user>-%j.log). Must be writable by the job's user on the compute node. Default: the user's home directory, or /tmp when there is none.").tag(config=True)

    req_job_name = Unicode("jupyterhub", help="Slurm job name (--job-name).").tag(config=True)

    submit_as = Enum(["service", "user"], "service", help="'service': jobs run as the submitting account (the hub's, or login_node_user), homes under home_root. 'user': sbatch --uid=<username> (needs root or SlurmUser on the submit host); the user must exist on the cluster.").tag(config=True)

    home_root = Unicode("", help="With submit_as='service': each user's home is home_root/<username> (the job's --chdir and HOME). Empty: the user's passwd home, if the account exists.").tag(config=True)

    node_exclusivity = Enum(["node", "mcs", "off"], "node", help="With submit_as='service' and no container (see jobs_in_container), how other users' jobs are kept off this job's node, where they would run as the same account and could read its environment (hub API token), files and sockets. 'node': --exclusive (the job gets the whole node). 'mcs': --exclusive=mcs --mcs-label=<label of the user> (nodes shared only among one user's jobs; needs MCSPlugin=mcs/label and MCSParameters=ondemand,ondemandselect in slurm.conf). 'off': nothing (the cluster keeps users apart some other way). --exclusive=user would not help: all these jobs have the same Slurm user. Not used with submit_as='user' or in a container.").tag(config=True)

    jobs_in_container = Bool(None, allow_none=True, help="Whether each server runs in a container that walls it off from other users' jobs (node-agent launch with the HPC config's container.enabled; launch refuses a container without its own PID namespace and /tmp under a shared account). None (default): true when agent_command runs 'node-agent launch'. Set False when the HPC config has container.enabled = false: a job that counts on a container tells launch so (NODE_AGENT_EXPECT_CONTAINER=1), and launch refuses to run it without one.").tag(config=True)

    slurm_poll_interval = Float(5.0, help="Seconds between the hub-wide squeue queries (ONE squeue per interval for all jobs of this hub). Read by the first spawner that creates the shared poller.").tag(config=True)

    squeue_command = Unicode("squeue", help="squeue executable (on the login node when remote).").tag(config=True)

    login_node_host = Unicode("", help="Submit through SSH to this login node. Empty: run sbatch/squeue/scancel locally.").tag(config=True)
    login_node_port = Integer(22, help="SSH port of the login node.").tag(config=True)
    login_node_user = Unicode("", help="SSH user on the login node (the submitting account).").tag(config=True)
    login_node_key_file = Unicode("", help="Private key file for the login node.").tag(config=True)
    login_node_max_sessions = Integer(8, help="Most commands run at once over the shared login-node connection (each is one SSH session channel). Keep it below the login node's sshd MaxSessions (OpenSSH default 10): sshd refuses channels beyond it, and the runner then reconnects, losing commands in flight.").tag(config=True)
    login_node_known_hosts = Unicode("", help="known_hosts file holding the login node's host key (required: keys are always verified).").tag(config=True)
    # fmt: on

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
                    raise RuntimeError("SlurmBrokerSpawner.login_node_key_file must be set with login_node_host")
                if not self.login_node_known_hosts:
                    raise RuntimeError("SlurmBrokerSpawner.login_node_known_hosts must be set with login_node_host")
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
    def poller(self) -> SlurmJobPoller:
        return SlurmJobPoller.shared(
            (*self._runner_key(), self.squeue_command),
            runner=self.runner,
            interval=self.slurm_poll_interval,
            squeue=self.squeue_command,
            log=self.log,
        )

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
        # PATH for sbatch on the submit host and a fallback for the job (the script prepends req_path)
        env["PATH"] = ":".join(p for p in (self.req_path, "/usr/local/bin:/usr/bin:/bin") if p)
        if self.submit_as == "service" and self.home_root:
            env["HOME"] = self.req_homedir
        if self.submit_as == "service" and self.in_container():
            # launch refuses to run such a job without a container (no one else keeps users apart)
            env[EXPECT_CONTAINER_ENV] = "1"
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
        if self.submit_as == "service" and self.home_root:
            return os.path.join(self.home_root, self.user.name)
        try:
            return pwd.getpwnam(self.user.name).pw_dir
        except KeyError:
            return ""

    # -- keeping users apart (service account, no container) ------------------------------------
    def in_container(self) -> bool:
        """Whether the job's server runs in a container that walls it off (jobs_in_container)."""
        if self.jobs_in_container is not None:
            return bool(self.jobs_in_container)
        return "launch" in shlex.split(self.agent_command)

    def mcs_label(self) -> str:
        """The user's MCS label: readable, [A-Za-z0-9._-] only, and distinct for every name."""
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", self.user.name)[:40]
        digest = hashlib.sha256(self.user.name.encode("utf-8")).hexdigest()[:10]
        return f"jupyterhub-{readable}-{digest}"

    def exclusive_options(self) -> str:
        """sbatch options that keep other users' jobs off this job's node, or ''.

        Only for a shared service account (submit_as='service') without a container: then the
        jobs of all users run as one Unix account, and nothing else keeps one user's notebook
        from reading another's /proc/PID/environ, files and sockets on a shared node.
        """
        if self.submit_as != "service" or self.in_container() or self.node_exclusivity == "off":
            return ""
        if self.node_exclusivity == "mcs":
            return f"--exclusive=mcs --mcs-label={self.mcs_label()}"
        return "--exclusive"

    def options_form_notes(self) -> list[str]:
        notes = list(super().options_form_notes())
        if self.exclusive_options():
            if self.node_exclusivity == "mcs":
                notes.append(
                    "Your server shares its node only with your own jobs: all users' "
                    "notebooks run under one cluster account here, so other users' "
                    "jobs are kept off the node."
                )
            else:
                notes.append(
                    "Your server gets a node to itself: all users' notebooks run under "
                    "one cluster account here, so no other user's job may share the "
                    "node. Starting may take longer while the cluster frees a node."
                )
        return notes

    def get_req_subvars(self) -> dict[str, Any]:
        subvars = super().get_req_subvars()
        subvars["node_exclusive"] = self.exclusive_options()
        out_dir = self.req_output_dir or self.req_homedir or "/tmp"
        safe_user = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.user.name)[:64]
        subvars["output_file"] = os.path.join(out_dir, f"jupyterhub-{safe_user}-%j.log")
        subvars["path"] = shlex.quote(self.req_path) if self.req_path else '""'
        subvars["homedir"] = shlex.quote(self.req_homedir) if self.req_homedir else ""
        return subvars

    async def submit_batch_script(self) -> str:
        saved_options = getattr(self, "user_options", None)
        checked = self._checked_user_options()
        checked.pop("node_exclusive", None)  # never a user's choice, whatever is allowed
        self.user_options = checked
        try:
            return await self._submit_with_export()
        finally:
            self.user_options = saved_options or {}

    async def _submit_with_export(self) -> str:
        names = sorted(self.get_env())
        extra = f" --export={','.join(names)}"
        exclusive = self.exclusive_options()
        if exclusive and "node_exclusive" not in self.batch_script:
            extra += f" {exclusive}"  # a site's own batch_script without the line
        if self.submit_as == "user":
            extra += f" --uid={shlex.quote(self.user.name)}"
            # without --gid the job keeps the submitter's group (root's!)
            try:
                extra += f" --gid={pwd.getpwnam(self.user.name).pw_gid}"
            except KeyError:
                extra += f" --gid={shlex.quote(self.user.name)}"  # user private group on the cluster
        saved = self.batch_submit_cmd
        # the traitlet is per instance: add the options for this submit only
        self.batch_submit_cmd = saved + extra
        try:
            return await super().submit_batch_script()
        finally:
            self.batch_submit_cmd = saved

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
        except SlurmQueryError as e:
            self.job_status = f"slurm_load_jobs error: {str(e)[:200]}"
            self.job_info = None
            return JobStatus.UNKNOWN
        self.job_info = info
        self.job_status = f"{info.state} {info.node}" if info.node else info.state
        if info.state in _RUNNING_LIKE:
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
        key = (info.reason, info.start_time)
        if key == self._last_pending:
            return
        self._last_pending = key
        msg = f"Job {info.job_id} pending"
        if info.reason:
            msg += f" ({info.reason})"
        if info.start_time:
            msg += f"; estimated start {info.start_time.isoformat(sep=' ', timespec='minutes')}"
        self._event(msg, 30)

    def state_ispending(self) -> bool:
        return bool(self.job_info and self.job_info.is_pending)

    def state_isrunning(self) -> bool:
        return bool(self.job_info and self.job_info.state in _RUNNING_LIKE)

    def state_gethost(self) -> str:
        return (self.job_info.node or "") if self.job_info else ""

    async def job_output_tail(self, max_lines: int = 20) -> str:
        if not self.job_id:
            return ""
        return await self.tail_file(self.job_output_file(self.job_id), max_lines) or ""

    async def final_job_state(self, job_id: str, wait: float = 10.0) -> str:
        """Slurm's final state of an ended job (``TIMEOUT``, ``CANCELLED``, ``NODE_FAIL``, ...),
        asking the shared poller for up to *wait* seconds while the job is still completing;
        "" when it is not known (e.g. already purged from squeue after ``MinJobAge``)."""
        deadline = time.monotonic() + wait
        self.poller.watch(job_id)
        try:
            while True:
                try:
                    info = await self.poller.status(job_id, fresh=True)
                except SlurmQueryError:
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

    def job_output_file(self, job_id: str) -> str:
        """The job's output file (``--output``) where the batch commands run ("" for a non-Slurm id)."""
        if not re.fullmatch(r"\d+(_\d+)?", job_id or ""):
            return ""
        return str(self.get_req_subvars()["output_file"]).replace("%j", job_id)

    async def tail_file(self, path: str, max_lines: int = 0, max_bytes: int = 0) -> str | None:
        """``tail -n``/``tail -c`` of *path* through the runner (locally or on the login node)."""
        what = ["-c", str(int(max_bytes))] if max_bytes > 0 else ["-n", str(int(max_lines or 200))]
        try:
            r = await self.runner.run(["tail", *what, "--", path], timeout=30)
        except RunnerError:
            return None
        return r.stdout if r.exit_status == 0 else None

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
