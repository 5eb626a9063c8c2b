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
* **Progress while pending**: job id, Slurm's reason, the job's position among its partition's
  pending jobs and the estimated start time.
* **Remote submission**: with ``login_node_host`` set, sbatch/scancel/squeue run on the login
  node over ONE shared SSH connection (:class:`~hub_plugin.remote.LoginNodeRunner`); the job
  environment travels over the channel's stdin, never on the remote command line.
* **Identity**: ``submit_as = "service"`` (default) submits every job as the account the hub
  (or the login-node SSH user) runs as, with each user's home at ``home_root/<name>``;
  ``submit_as = "user"`` submits as the user's own Unix account with ``sbatch --uid=<name>
  --gid=<primary group>``
  (needs root or Slurm's SlurmUser on the submit host); ``submit_as = "sudo"`` submits as the
  user's account through ``exec_prefix`` (default ``sudo -n -u {username} --``) from an
  unprivileged hub or login-node account, locally or on the login node. sudo passes the job's
  variables by name only: the sudoers rule keeps them (``env_keep``, see
  ``examples/production/sudoers``), never ``--preserve-env`` (sudo logs the values of those).
* **No shared nodes without a wall**: with ``submit_as = "service"`` every user's job runs as
  the same account, so unless a container walls each job off (``node-agent launch``, which
  checks that), another user's notebook on the same node could read this job's environment.
  Such jobs are submitted with ``--exclusive`` (``node_exclusivity``; ``"mcs"`` shares a node
  only among one user's jobs, via Slurm's MCS labels), and the options form says so.
  ``--exclusive=user`` would not help: Slurm's "user" is the shared account.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
from typing import Any

from batchspawner import SlurmSpawner
from traitlets import Bool, Enum, Float, Integer, List, Unicode, default

from . import slurm_assoc
from .choices import SchedulerChoices
from .mixin import BrokerSpawnerMixin
from .options import ResourceOptionsMixin
from .scheduler_spawner import SchedulerSpawnerMixin
from .slurm_poller import SlurmJobPoller

__all__ = ["SlurmBrokerSpawner"]

#: Tells node-agent launch that this job counts on a container (node_agent/isolation.py).
EXPECT_CONTAINER_ENV = "NODE_AGENT_EXPECT_CONTAINER"

#: exec_prefix with submit_as="sudo": no password prompt (-n), the user's account, no options after.
SUDO_PREFIX = "sudo -n -u {username} --"
#: What a user name must look like to be put into a sudo command line (a POSIX account name).
_ACCOUNT_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")

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


class SlurmBrokerSpawner(ResourceOptionsMixin, SchedulerSpawnerMixin, BrokerSpawnerMixin, SlurmSpawner):
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

    exec_prefix = Unicode(help="Prefix for sbatch/scancel. Default: empty, or with submit_as='sudo' 'sudo -n -u {username} --' (batchspawner's 'sudo -E -u {username}' is not used: -E would hand sbatch the hub's whole environment; the sudoers rule keeps the job's variables by name).").tag(config=True)

    req_srun = Unicode("", help="Empty (default): the batch shell execs the node agent, so Slurm's USR1 walltime warning reaches it directly. Set e.g. 'srun' to run it in a job step instead (the signal then goes to the steps).").tag(config=True)

    req_walltime_warning = Integer(300, help="Seconds before the time limit at which Slurm sends SIGUSR1 to the node agent (--signal=B:USR1@N; Slurm's resolution is about 60 s). 0 disables. Only has an effect with a time limit (req_runtime or the partition's default).").tag(config=True)

    submit_as = Enum(["service", "user", "sudo"], "service", help="'service': jobs run as the submitting account (the hub's, or login_node_user), homes under home_root. 'user': sbatch --uid=<username> (needs root or SlurmUser on the submit host). 'sudo': sbatch/scancel run as the user through exec_prefix ('sudo -n -u {username} --'), from an unprivileged account allowed only the scheduler commands (docs/deploy.md, sudoers); locally or on the login node. With 'user' and 'sudo' the user must exist on the cluster.").tag(config=True)

    node_exclusivity = Enum(["node", "mcs", "off"], "node", help="With submit_as='service' and no container (see jobs_in_container), how other users' jobs are kept off this job's node, where they would run as the same account and could read its environment (hub API token), files and sockets. 'node': --exclusive (the job gets the whole node). 'mcs': --exclusive=mcs --mcs-label=<label of the user> (nodes shared only among one user's jobs; needs MCSPlugin=mcs/label and MCSParameters=ondemand,ondemandselect in slurm.conf). 'off': nothing (the cluster keeps users apart some other way). --exclusive=user would not help: all these jobs have the same Slurm user. Not used with submit_as='user' or in a container.").tag(config=True)

    jobs_in_container = Bool(None, allow_none=True, help="Whether each server runs in a container that walls it off from other users' jobs (node-agent launch with the HPC config's container.enabled; launch refuses a container without its own PID namespace and /tmp under a shared account). None (default): true when agent_command runs 'node-agent launch'. Set False when the HPC config has container.enabled = false: a job that counts on a container tells launch so (NODE_AGENT_EXPECT_CONTAINER=1), and launch refuses to run it without one.").tag(config=True)

    slurm_poll_interval = Float(5.0, help="Seconds between the hub-wide squeue queries (ONE squeue per interval for all jobs of this hub). Read by the first spawner that creates the shared poller.").tag(config=True)

    squeue_command = Unicode("squeue", help="squeue executable (on the login node when remote).").tag(config=True)

    form_slurm_choices = List(Unicode(), list(slurm_assoc.FIELDS), help="Slurm choices the options form offers from the user's associations and the cluster's reservations: any of 'account', 'qos', 'reservation' (empty: none). Values sent for a field not offered are refused.").tag(config=True)
    sacctmgr_command = Unicode("sacctmgr", help="sacctmgr executable (run like sbatch: locally or on the login node); needs slurmdbd.").tag(config=True)
    scontrol_command = Unicode("scontrol", help="scontrol executable, for the reservation list.").tag(config=True)
    slurm_choices_cache_seconds = Float(60.0, help="How long a user's associations and the reservation list are reused.").tag(config=True)
    # fmt: on

    status_error_prefix = "slurm_load_jobs error"

    @default("exec_prefix")
    def _exec_prefix_default(self) -> str:
        return SUDO_PREFIX if self.submit_as == "sudo" else ""

    choice_field_names = slurm_assoc.FIELDS

    async def scheduler_choices(self) -> SchedulerChoices:
        """Accounts, QoS and reservations for this user (:mod:`hub_plugin.slurm_assoc`)."""
        return await slurm_assoc.slurm_choices(
            self.run_command,
            user=self.user.name,
            fields=self.form_slurm_choices,
            sacctmgr=self.sacctmgr_command,
            scontrol=self.scontrol_command,
            cache_key=self._runner_key(),
            cache_seconds=self.slurm_choices_cache_seconds,
            preferred_account=self._configured_req().get("account", ""),
            log=self.log,
        )

    @property
    def poller(self) -> SlurmJobPoller:
        return SlurmJobPoller.shared(
            (*self._runner_key(), self.squeue_command),
            runner=self.runner,
            interval=self.slurm_poll_interval,
            squeue=self.squeue_command,
            log=self.log,
        )

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        if self.submit_as == "service" and self.in_container():
            # launch refuses to run such a job without a container (no one else keeps users apart)
            env[EXPECT_CONTAINER_ENV] = "1"
        return env

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
        if self.submit_as == "sudo" and not _ACCOUNT_NAME.match(self.user.name):
            raise RuntimeError(
                f"SlurmBrokerSpawner.submit_as='sudo': {self.user.name[:64]!r} is not a Unix account name "
                "(lower-case letters, digits, '_', '.', '-'); map hub users to accounts, e.g. with the "
                "authenticator's username_map"
            )
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

    def job_output_file(self, job_id: str) -> str:
        """The job's output file (``--output``) where the batch commands run ("" for a non-Slurm id)."""
        if not re.fullmatch(r"\d+(_\d+)?", job_id or ""):
            return ""
        return str(self.get_req_subvars()["output_file"]).replace("%j", job_id)
