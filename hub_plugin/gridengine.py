"""GridEngineBrokerSpawner: notebooks as Grid Engine jobs (SGE, Son of Grid Engine, Univa/Altair
GE), reached through the broker's tunnel.

Use in ``jupyterhub_config.py``::

    c.JupyterHub.spawner_class = "hub_plugin.gridengine.GridEngineBrokerSpawner"
    c.BrokerSpawnerMixin.broker_url = "http://127.0.0.1:8091"
    c.GridEngineBrokerSpawner.req_partition = "interactive.q"    # the queue (-q)
    c.GridEngineBrokerSpawner.req_runtime = "8:00:00"            # h_rt
    c.GridEngineBrokerSpawner.req_path = "/opt/jupyter/bin"
    c.GridEngineBrokerSpawner.req_output_dir = "/shared/jupyter-logs"

It shares with :class:`~hub_plugin.slurm.SlurmBrokerSpawner` everything that is not Grid Engine
(:class:`~hub_plugin.scheduler_spawner.SchedulerSpawnerMixin`: the runner, optionally ONE SSH
connection to a login node, the hub-wide poller, pending reasons, PATH/HOME). What is Grid
Engine's own (docs/gridengine.md has the option table and the differences from Slurm):

* **Submit**: ``qsub -terse`` with the script on stdin and ``-v NAME,NAME,...``: the job's
  variables by name, values taken from qsub's environment. **Secrets never go through -v**:
  Grid Engine stores ``-v`` values with the job and ``qstat -j`` shows them to every user.
  Variables whose name says token/secret/password/key are written instead to a file
  (``<secrets_dir>/.jupyterhub-env-<random>``, mode 0600, content over the runner's stdin), the
  job gets the file's *path* (``JUPYTERHUB_ENV_FILE``, by name), and the batch script sources
  and deletes it before the agent starts; ``stop()`` deletes it too if the job never started.
  So no secret is in the script, on a command line, or in ``qstat -j``.
* **Status**: ``qstat -xml -u <account>`` ONCE per ``ge_poll_interval`` for all jobs
  (:class:`~hub_plugin.gridengine_poller.GridEngineJobPoller`), plus one ``qstat -j`` for all
  waiting jobs together to read the scheduler's reasons for the progress page.
* **Cancel**: ``qdel <id>``.
* **Walltime**: ``-l h_rt`` is the hard limit (SIGKILL); with ``req_walltime_warning`` > 0 the
  job also gets ``-l s_rt`` that many seconds earlier: Grid Engine then sends SIGUSR1 to the
  job, which reaches the node agent (the script ``exec``\\ s it; the agent starts the server with
  SIGUSR1 ignored, because Grid Engine signals the whole process group), and the agent tells the
  broker. Grid Engine ends the job the queue's ``notify`` time after s_rt at the latest, so
  the queue's ``notify`` should be at least the warning (else the job ends early).
* **Options form**: queues from ``qconf -sql``, their slots and ``h_rt`` from ``qconf -sq``
  (:mod:`hub_plugin.gridengine_queues`); CPUs above 1 need ``parallel_environment``.
* **Identity**: jobs run as the submitting account (the hub's, or ``login_node_user``), with
  each user's home under ``home_root``. Per-user submission (Slurm's ``submit_as = "user"``)
  is not offered: qsub has no ``--uid``.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from typing import Any

from batchspawner import GridengineSpawner
from traitlets import Float, Integer, List, Unicode, default

from .gridengine_poller import GridEngineJobPoller
from .gridengine_queues import format_ge_time, parse_qconf_sq, parse_qconf_sql
from .mixin import BrokerSpawnerMixin
from .options import ResourceOptionsMixin
from .remote import RunnerError
from .resources import OptionsError, Partition, parse_slurm_time
from .scheduler_spawner import SchedulerSpawnerMixin

__all__ = ["GridEngineBrokerSpawner"]

#: The job variable naming the secrets file (a path, not a secret).
ENV_FILE_VAR = "JUPYTERHUB_ENV_FILE"

DEFAULT_BATCH_SCRIPT = """#!/bin/bash
#$ -S /bin/bash
#$ -N {{job_name}}
#$ -o {{output_file}}
#$ -j y
{% if partition %}#$ -q {{partition}}
{% endif %}{% if hard_runtime %}#$ -l h_rt={{hard_runtime}}
{% endif %}{% if soft_runtime %}#$ -l s_rt={{soft_runtime}}
{% endif %}{% if memory and memory_resource %}#$ -l {{memory_resource}}={{memory}}
{% endif %}{% if parallel_env and nprocs %}#$ -pe {{parallel_env}} {{nprocs}}
{% endif %}{% if options %}#$ {{options}}
{% endif %}
# Variables arrive by NAME (qsub -v); secrets in a 0600 file named by $JUPYTERHUB_ENV_FILE,
# read and deleted here: no secret is in this script.
set -eu
if [ -n "${JUPYTERHUB_ENV_FILE:-}" ]; then
    set -a; . "$JUPYTERHUB_ENV_FILE"; set +a
    rm -f "$JUPYTERHUB_ENV_FILE"; unset JUPYTERHUB_ENV_FILE
fi
export PATH={{path}}"${PATH:+:$PATH}"
{% if homedir %}mkdir -p -m 0700 {{homedir}}
export HOME={{homedir}}
cd {{homedir}}
{% endif %}{{prologue}}
exec {{cmd}}
{{epilogue}}
"""

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|COOKIE", re.IGNORECASE)


class GridEngineBrokerSpawner(ResourceOptionsMixin, SchedulerSpawnerMixin, BrokerSpawnerMixin, GridengineSpawner):
    """Grid Engine through the broker (see the module docstring).

    Resource options (each ``req_xyz`` is ``{{xyz}}`` in ``batch_script``): ``req_partition`` ->
    ``-q`` (the queue), ``req_runtime`` -> ``-l h_rt`` (Slurm-style time as in the form:
    ``MM``, ``H:MM:SS``, ``D-HH``), ``req_walltime_warning`` -> ``-l s_rt``, ``req_memory`` ->
    ``-l <memory_resource>=`` (only when ``memory_resource`` is set), ``req_nprocs`` -> ``-pe
    <parallel_environment> N`` (only when set), ``req_options``: one more line of qsub options.
    """

    status_error_prefix = "qstat error"

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    batch_script = Unicode(DEFAULT_BATCH_SCRIPT, help="Template (jinja2) of the Grid Engine job script; must contain {{cmd}}. Do not put secrets in it: variables are passed by name with -v, secrets through a 0600 file (secrets_dir).").tag(config=True)
    batch_submit_cmd = Unicode("qsub -terse", help="Submit command; the script is read on stdin. -v NAMES is appended.").tag(config=True)
    batch_cancel_cmd = Unicode("qdel {job_id}", help="Cancel command.").tag(config=True)
    exec_prefix = Unicode("", help="Prefix for qsub/qdel (batchspawner's default 'sudo -E -u {username}' is not used: jobs run as the submitting account).").tag(config=True)
    req_walltime_warning = Integer(300, help="Seconds before h_rt at which Grid Engine sends SIGUSR1 to the job (-l s_rt=h_rt-N), passed on by the node agent as the walltime warning. 0 disables. The queue's 'notify' time should be at least this long: Grid Engine kills the job 'notify' seconds after s_rt.").tag(config=True)
    memory_resource = Unicode("", help="Grid Engine resource the form's memory choice requests (e.g. 'h_vmem' or 'mem_free'; per slot). Empty: memory is not requested.").tag(config=True)
    parallel_environment = Unicode("", help="Parallel environment for more than one CPU (-pe NAME N). Empty: jobs get one slot and the form offers 1 CPU.").tag(config=True)
    secrets_dir = Unicode("", help="Directory for the per-job 0600 secrets file, on storage the submit host and the compute nodes share, not readable by other users. Default: req_output_dir, else the user's home.").tag(config=True)
    secret_env_names = List(Unicode(), help="More job variables to pass through the secrets file rather than qsub -v (besides every name containing TOKEN, SECRET, PASSWORD, PASSWD, KEY or COOKIE).").tag(config=True)
    ge_poll_interval = Float(5.0, help="Seconds between the hub-wide qstat queries (ONE qstat per interval for all jobs of this hub, plus one qstat -j while some job waits). Read by the first spawner that creates the shared poller.").tag(config=True)
    qstat_command = Unicode("qstat", help="qstat executable (on the login node when remote).").tag(config=True)
    qstat_user = Unicode("", help="Whose jobs qstat lists (qstat -u): default the submitting account (login_node_user, else the hub's); '*' = everybody's.").tag(config=True)
    qconf_command = Unicode("qconf", help="qconf executable, for the queue list and limits of the options form.").tag(config=True)
    # fmt: on

    @default("walltime_enforce")
    def _walltime_enforce_default(self) -> bool:
        return False  # Grid Engine ends the job at h_rt

    # -- poller ----------------------------------------------------------------------------------
    def _qstat_user(self) -> str:
        if self.qstat_user:
            return self.qstat_user
        if self.login_node_host:
            return self.login_node_user or "*"
        import getpass

        return getpass.getuser()

    @property
    def poller(self) -> GridEngineJobPoller:
        return GridEngineJobPoller.shared(
            (*self._runner_key(), self.qstat_command, self._qstat_user()),
            runner=self.runner,
            interval=self.ge_poll_interval,
            user=self._qstat_user(),
            qstat=self.qstat_command,
            log=self.log,
        )

    # -- options form: queues from qconf ---------------------------------------------------------
    _queue_cache: dict[Any, tuple[float, list[Partition]]] = {}

    async def cluster_partitions(self) -> list[Partition]:
        """The cluster queues (qconf -sql, qconf -sq), cached hub-wide for partitions_cache_seconds."""
        key = (self._runner_key(), self.qconf_command, self.parallel_environment)
        hit = self._queue_cache.get(key)
        if hit and time.monotonic() - hit[0] < self.partitions_cache_seconds:
            parts = hit[1]
        else:
            try:
                names = parse_qconf_sql(await self.run_command(f"{self.qconf_command} -sql"))
                if self.partitions_allowed:
                    names = [n for n in names if n in self.partitions_allowed]
                out = await self.run_command(f"{self.qconf_command} -sq {','.join(names)}") if names else ""
            except Exception as e:
                self.log.error("%s: reading the queues with qconf failed: %s", self._log_name, str(e)[:300])
                raise OptionsError(
                    "The cluster's queue list could not be read right now; please try again in a minute."
                ) from None
            parts = parse_qconf_sq(out, parallel=bool(self.parallel_environment))
            self._queue_cache[key] = (time.monotonic(), parts)
        if self.partitions_allowed:
            parts = [p for p in parts if p.name in self.partitions_allowed]
        if parts and not any(p.default for p in parts):
            configured = self._configured_req().get("partition", "")
            first = next((p for p in parts if p.name == configured), parts[0])
            parts = [Partition(**{**p.__dict__, "default": p is first}) for p in parts]
        return parts

    # -- the script ------------------------------------------------------------------------------
    def get_req_subvars(self) -> dict[str, Any]:
        subvars = super().get_req_subvars()
        out_dir = self.req_output_dir or self.req_homedir or "/tmp"
        safe_user = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.user.name)[:64]
        subvars["output_file"] = os.path.join(out_dir, f"jupyterhub-{safe_user}-$JOB_ID.log")
        subvars["path"] = shlex.quote(self.req_path) if self.req_path else '""'
        subvars["homedir"] = shlex.quote(self.req_homedir) if self.req_homedir else ""
        hard = self._hard_runtime_seconds()
        subvars["hard_runtime"] = format_ge_time(hard) if hard else ""
        warn = int(self.req_walltime_warning or 0)
        subvars["soft_runtime"] = format_ge_time(hard - warn) if hard and 0 < warn < hard else ""
        subvars["memory_resource"] = self.memory_resource
        subvars["parallel_env"] = self.parallel_environment
        return subvars

    def _hard_runtime_seconds(self) -> int:
        try:
            return parse_slurm_time(str(self.req_runtime or "")) or 0
        except ValueError:
            raise ValueError(f"req_runtime {self.req_runtime!r} is not a time (H:MM:SS, MM, D-HH)") from None

    def job_output_file(self, job_id: str) -> str:
        if not re.fullmatch(r"\d+", job_id or ""):
            return ""
        return str(self.get_req_subvars()["output_file"]).replace("$JOB_ID", job_id)

    def parse_job_id(self, output: str) -> str:
        """``qsub -terse`` prints the id; plain ``qsub`` prints 'Your job ID ("name") has been ...'."""
        m = re.search(r"^(\d+)(?:\.\S+)?\s*$", output.strip(), re.MULTILINE) or re.search(r"Your job (\d+)", output)
        if not m:
            raise ValueError(f"no job id in qsub's answer: {output.strip()[:200]!r}")
        return m.group(1)

    # -- submit: variables by name, secrets through a 0600 file -----------------------------------
    secrets_file = ""  # path of this job's secrets file until the job (or stop()) deletes it

    def _is_secret(self, name: str) -> bool:
        return bool(_SECRET_NAME.search(name)) or name in self.secret_env_names

    async def submit_batch_script(self) -> str:
        saved_options = getattr(self, "user_options", None)
        self.user_options = self._checked_user_options()
        try:
            return await self._submit_by_name()
        finally:
            self.user_options = saved_options or {}

    async def _submit_by_name(self) -> str:
        env = self.get_env()
        hidden = {k: v for k, v in env.items() if self._is_secret(k)}
        if hidden:
            directory = self.secrets_dir or self.req_output_dir or self.req_homedir or "/tmp"
            path = os.path.join(directory, f".jupyterhub-env-{secrets.token_hex(12)}")
            content = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(hidden.items()))
            await self._write_private_file(path, content)
            self.secrets_file = path
        names = sorted(k for k in env if k not in hidden)
        if hidden:
            names.append(ENV_FILE_VAR)
        saved_cmd = self.batch_submit_cmd
        submit_env = {k: env[k] for k in names if k in env}
        if hidden:
            submit_env[ENV_FILE_VAR] = self.secrets_file
        # qsub reads the values of -v NAME from its own environment: give it only those
        self._submit_env = submit_env
        self.batch_submit_cmd = f"{saved_cmd} -v {','.join(names)}"
        try:
            return await super().submit_batch_script()
        except BaseException:
            await self._remove_secrets_file()
            raise
        finally:
            self.batch_submit_cmd = saved_cmd
            self._submit_env = None

    _submit_env: dict[str, str] | None = None

    def get_env(self) -> dict[str, str]:
        """The job's variables; while submitting, only those qsub passes by name (no secrets)."""
        if self._submit_env is not None:
            return dict(self._submit_env)
        return super().get_env()

    async def _write_private_file(self, path: str, content: str) -> None:
        """Create *path* mode 0600 with *content* (over stdin) on the submit host; never overwrite."""
        script = 'umask 077 && set -C && cat > "$1"'
        try:
            r = await self.runner.run(["sh", "-c", script, "sh", path], input=content, timeout=30)
        except RunnerError as e:
            raise RuntimeError(f"could not write the job's secrets file: {e}") from None
        if r.exit_status != 0:
            raise RuntimeError(
                f"could not write the job's secrets file in {os.path.dirname(path)}: {r.stderr.strip()[:300]}"
            )

    async def _remove_secrets_file(self) -> None:
        path, self.secrets_file = self.secrets_file, ""
        if path:
            try:
                await self.runner.run(["rm", "-f", path], timeout=30)
            except RunnerError as e:
                self.log.warning("%s: could not remove the secrets file: %s", self._log_name, str(e)[:200])

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)
        finally:
            await self._remove_secrets_file()  # a job that never started did not delete it

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.secrets_file:
            state["secrets_file"] = self.secrets_file
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.secrets_file = str(state.get("secrets_file") or "")

    def clear_state(self) -> None:
        super().clear_state()
        self.secrets_file = ""
