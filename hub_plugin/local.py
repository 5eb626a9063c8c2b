"""LocalBatchSpawner: batchspawner driving the embedded local batch system.

The embedded default runs every notebook job as a local process through
``hub_plugin.localbatch`` (see that module for the command-line contract), so one machine
can run the whole stack with the same code path a Slurm cluster uses: batchspawner's
``submit_batch_script`` / ``query_job_status`` / ``cancel_batch_job`` call the local
batch CLI just as they would call ``sbatch`` / ``squeue`` / ``scancel``.

This class holds no broker logic. The broker-aware spawner composes it elsewhere
(``class LocalBrokerSpawner(BrokerSpawnerMixin, LocalBatchSpawner)``); the mixin relies on
the three batchspawner methods above behaving as in batchspawner.

Jobs run as the hub's own user (no ``sudo``), with the environment returned by
``get_env()``; secrets travel only there, never in the script or on a command line.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import sys

from batchspawner import BatchSpawnerRegexStates
from batchspawner.batchspawner import format_template
from traitlets import Bool, Float, Unicode, default

from . import localbatch
from .session_card import tail_local_file

_JOB_ID_RE = re.compile(r"^[0-9]+$")


class LocalBatchSpawner(BatchSpawnerRegexStates):
    """Spawn single-user servers as jobs of the embedded local batch system."""

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    exec_prefix = Unicode("", help="Prefix for the batch commands. Empty: jobs run as the hub's own user (the embedded backend is for one-machine setups; batchspawner's default 'sudo -E -u {username}' is not used).").tag(config=True)

    spool_dir = Unicode("localbatch-spool", help="Directory holding one sub-directory per job (script, output.log, job.json, exit status). A relative path is taken relative to the hub's working directory. Created with mode 0700 on the first submit; must not be writable by others.").tag(config=True)

    localbatch_cmd = Unicode(help="Shell words that run the local batch CLI, already shell-quoted. Default: this Python interpreter (sys.executable) in isolated mode running hub_plugin/localbatch.py by path, so it works even when the submit environment does not put the project on sys.path.").tag(config=True)
    # fmt: on

    @default("localbatch_cmd")
    def _localbatch_cmd_default(self):
        return shlex.join([sys.executable, "-I", os.path.abspath(localbatch.__file__)])

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    cancel_grace = Float(localbatch.DEFAULT_GRACE, help="Seconds between SIGTERM and SIGKILL when a job is cancelled.").tag(config=True)

    inherit_path = Bool(True, help="If the spawner environment has no PATH (JupyterHub >= 6 no longer passes it), give the job the hub's PATH with the directory of the hub's Python prepended, so the job finds the same jupyterhub-singleuser / node-agent as the hub.").tag(config=True)
    # fmt: on

    batch_script = Unicode(
        """#!/bin/bash
# Job script for the embedded local batch system (hub_plugin.localbatch).
# Secrets arrive in the environment only: never write them into this script.
export PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}"
{{prologue}}
{{cmd}}
{{epilogue}}
""",
        help="Template (jinja2) of the bash job script; must contain {{cmd}}. Traits "
        "named req_xyz are available as {{xyz}}.",
    ).tag(config=True)

    # one option a line: a table to read (not formatted into repeated blocks)
    # fmt: off
    batch_submit_cmd = Unicode("{localbatch} submit --spool {spool}", help="Command that submits the script read on stdin and prints the job id. {localbatch} and {spool} are the shell-quoted CLI and spool directory.").tag(config=True)

    batch_query_cmd = Unicode("{localbatch} query --spool {spool} {job_id}", help="Command that prints the job state as one line: 'RUNNING <host>', 'PENDING', 'COMPLETED 0', 'FAILED <exit>' or 'CANCELLED'.").tag(config=True)

    batch_cancel_cmd = Unicode("{localbatch} cancel --spool {spool} --grace {grace} {job_id}", help="Command that cancels the job (SIGTERM to its session, SIGKILL after {grace} = cancel_grace seconds).").tag(config=True)

    # how batchspawner reads the state from the `localbatch query` line (hub_plugin.localbatch)
    state_pending_re = Unicode(r"^PENDING\b", help="Regex for a job not started yet.").tag(config=True)
    state_running_re = Unicode(r"^RUNNING\b", help="Regex for a running job.").tag(config=True)
    state_exechost_re = Unicode(r"^RUNNING\s+(\S+)", help="Regex whose first group is the host.").tag(config=True)
    # fmt: on

    # Jobs run as the hub user, who may not exist in the passwd database under the
    # JupyterHub user's name: batchspawner's default (getpwnam) would raise KeyError.
    @default("req_homedir")
    def _req_homedir_default(self):
        try:
            return pwd.getpwnam(self.user.name).pw_dir
        except KeyError:
            return ""

    def spool_path(self) -> str:
        """Absolute spool directory (relative spool_dir resolves against the hub's cwd)."""
        return os.path.abspath(os.path.expanduser(self.spool_dir))

    def job_output_file(self, job_id: str) -> str:
        """The job's output file in the spool ("" for an id that is not a local batch id)."""
        if not _JOB_ID_RE.match(job_id or ""):
            return ""
        return os.path.join(self.spool_path(), job_id, localbatch.OUTPUT)

    async def tail_file(self, path: str, max_lines: int = 0, max_bytes: int = 0) -> str | None:
        """The end of a spool file (the hub reads it directly: the jobs run on this machine)."""
        return tail_local_file(path, max_lines, max_bytes)

    def get_req_subvars(self):
        """batchspawner's substitution variables plus localbatch, spool and grace."""
        subvars = super().get_req_subvars()
        subvars["localbatch"] = self.localbatch_cmd
        subvars["spool"] = shlex.quote(self.spool_path())
        subvars["grace"] = shlex.quote(f"{self.cancel_grace:g}")
        return subvars

    def get_env(self):
        """Spawner environment plus a sane PATH (see inherit_path)."""
        env = super().get_env()
        if self.inherit_path and "PATH" not in env:
            parts = [os.path.dirname(sys.executable)]
            parts += [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p]
            env["PATH"] = os.pathsep.join(dict.fromkeys(parts))  # without repeats, first one kept
        return env

    def parse_job_id(self, output):
        """The submit command prints the job id (a decimal integer) as its last line."""
        lines = output.strip().splitlines()
        job_id = lines[-1].strip() if lines else ""
        if not _JOB_ID_RE.match(job_id):
            raise ValueError(f"no job id in submit output: {output!r}")
        return job_id

    def state_gethost(self):
        """Host of the running job, from 'RUNNING <host>'."""
        return super().state_gethost()

    async def submit_batch_script(self):
        """Submit the job script; same contract as batchspawner's.

        Differs only in logging: batchspawner logs the whole submit environment at debug
        level, which would put secrets (API token, enrollment secret) into the hub log.
        Here only the variable names are logged.
        """
        subvars = self.get_req_subvars()
        cmd = " ".join(
            (
                format_template(self.exec_prefix, **subvars),
                format_template(self.batch_submit_cmd, **subvars),
            )
        ).strip()
        subvars.update(
            {
                k: str(v)
                for k, v in (getattr(self, "user_options", None) or {}).items()
                if k not in ("cmd", "prologue", "epilogue")
            }
        )
        subvars["cmd"] = self.cmd_formatted_for_batch()  # never overridable by user options
        script = await self._get_batch_script(**subvars)
        env = self.get_env()
        self.log.info("Spawner submitting command: %s", cmd)
        self.log.debug("Spawner submitting script:\n%s", script)
        self.log.debug("Spawner submitting environment names: %s", sorted(env))
        out = await self.run_command(cmd, input=script, env=env)
        try:
            self.log.info("Job submitted. output: %s", out)
            self.job_id = self.parse_job_id(out)
        except Exception:
            self.log.error("Job submission failed. output: %s", out)
            self.job_id = ""
        return self.job_id
