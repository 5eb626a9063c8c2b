"""The broker flow for any batchspawner class.

``class MySpawner(BrokerSpawnerMixin, SomeBatchSpawner)`` keeps the batch system's submit,
query and cancel, and replaces how the server is found:

1. ``start()`` registers a session with the broker (user, server, routespec) and receives a
   one-time enrolment secret plus the broker's SSH address and host key;
2. it submits the job; the secret and the broker settings travel in the job's environment
   (``get_env``), never in the script text, on a command line or in a log;
3. it waits for the broker's ``ready`` event (long-poll, no hostname parsing, no
   ``/etc/hosts``), checking the job between waits so a job that dies fails the spawn at
   once, and returns the broker's hub-side address for the session.

``poll()`` returns None while the job runs and the session is live, and an exit status
otherwise (closing the session so no stale route remains). ``stop()`` cancels the job and
closes the session. ``get_state``/``load_state`` keep ``job_id`` and ``session_id`` so a
restarted hub picks running servers up again.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import AsyncIterator
from typing import Any

from batchspawner.batchspawner import JobStatus, format_template
from traitlets import Float, Unicode, default

from broker.client import BrokerClient, BrokerError
from wire import contract
from wire.contract import MAINTENANCE_PREFIX

from . import config_check
from .spawner_api import BatchSpawnerAPI

ALIVE = (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.UNKNOWN)


class BrokerSpawnerMixin(BatchSpawnerAPI):
    """Adds the broker flow to a batchspawner ``BatchSpawnerBase`` subclass."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        config_check.check(self.config, type(self), self.log)  # once per process (hub_plugin.config_check)

    broker_url = Unicode(
        help="URL of the broker's REST API, e.g. http://127.0.0.1:8091 or unix:/run/broker/api.sock (env BROKER_API_URL)."
    ).tag(config=True)
    broker_token = Unicode(help="Bearer token of the broker's REST API (env BROKER_API_TOKEN).").tag(config=True)
    agent_command = Unicode(
        "node-agent run --",
        help="Command in the batch script that starts the node agent; the server command follows it.",
    ).tag(config=True)
    broker_wait_interval = Float(
        2.0, help="Seconds per long-poll to the broker while starting; the job is checked between polls."
    ).tag(config=True)
    ready_timeout = Float(
        600.0,
        help="Seconds a started job may run before its server is ready; then the spawn fails and the "
        "job is cancelled. Bounds the time after the queue, so that Spawner.start_timeout can be sized "
        "for queue waits alone. 0: no limit of its own.",
    ).tag(config=True)

    session_id = Unicode("")
    last_session: dict[str, Any] = {}

    @default("broker_url")
    def _broker_url_default(self) -> str:
        return os.environ.get("BROKER_API_URL", "")

    @default("broker_token")
    def _broker_token_default(self) -> str:
        return os.environ.get("BROKER_API_TOKEN", "")

    # -- plumbing ------------------------------------------------------------------------
    _clients: dict[tuple[str, str], BrokerClient] = {}

    @property
    def broker(self) -> BrokerClient:
        """One client per (url, token) shared by all spawners of this hub."""
        key = (self.broker_url, self.broker_token)
        if not self.broker_url or not self.broker_token:
            raise RuntimeError(f"{type(self).__name__}.broker_url and .broker_token must be set")
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = BrokerClient(*key)
        return client

    def _event(self, message: str, progress: int | None = None) -> None:
        ev: dict[str, Any] = {"message": message}
        if progress is not None:
            ev["progress"] = progress
        self._progress_events.append(ev)
        self._progress_changed.set()
        self.log.info("%s: %s", self._log_name, message)

    def _reset_progress(self) -> None:
        self._progress_events: list[dict[str, Any]] = []
        self._progress_changed = asyncio.Event()

    user_options_allowed = Unicode(
        "partition,account,qos,reservation,runtime,memory,nprocs,ngpus,gres,profile,image",
        help="Comma-separated user_options keys that may fill batch-script template values "
        "(from an options form or the REST API body). Others are ignored, and values must be "
        "single lines, so users cannot replace the command or add script lines.",
    ).tag(config=True)

    def _checked_user_options(self) -> dict[str, str]:
        """The user's options that may reach the batch script (deny by default)."""
        allowed = {k.strip() for k in self.user_options_allowed.split(",") if k.strip()}
        out: dict[str, str] = {}
        for key, value in (getattr(self, "user_options", None) or {}).items():
            if key not in allowed:
                self.log.warning(
                    "%s: ignoring user option %r (not in user_options_allowed)", self._log_name, str(key)[:40]
                )
                continue
            value = str(value)
            if "\n" in value or "\r" in value or len(value) > 500:
                raise ValueError(f"user option {key!r} must be one line of at most 500 characters")
            out[key] = value
        return out

    # -- batch script --------------------------------------------------------------------
    def cmd_formatted_for_batch(self) -> str:
        """The agent followed by the server command, each word shell-quoted."""
        words = [*shlex.split(self.agent_command), *self.cmd, *self.get_args()]
        return " ".join(shlex.quote(w) for w in words)

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        env.update(getattr(self, "_broker_env", {}))
        env.setdefault("PATH", os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        return env

    async def submit_batch_script(self) -> str:
        """Submit like batchspawner does, minus its logging of the environment and script."""
        subvars = self.get_req_subvars()
        cmd = " ".join(
            (format_template(self.exec_prefix, **subvars), format_template(self.batch_submit_cmd, **subvars))
        )
        subvars.update(self._checked_user_options())
        subvars["cmd"] = self.cmd_formatted_for_batch()  # after the options: never overridable
        script = await self._get_batch_script(**subvars)
        self.log.info("%s: submitting job: %s", self._log_name, cmd)
        out = await self.run_command(cmd, input=script, env=self.get_env())
        self.job_id = self.parse_job_id(out) if out else ""
        return self.job_id

    # -- spawner API ---------------------------------------------------------------------
    async def start(self) -> str:
        self._reset_progress()
        self.job_id = ""
        self.job_status = ""
        self._event("Registering the session with the broker", 5)
        try:
            session = await self.broker.create_session(self.user.name, self.name or "", self.proxy_spec)
        except BrokerError as e:
            raise RuntimeError(f"The broker did not accept the session: {e.message}") from None
        self.session_id = session["id"]
        ssh = session["ssh"]
        self._broker_env = {
            contract.ENV_SSH_HOST: ssh["host"],
            contract.ENV_SSH_PORT: str(ssh["port"]),
            contract.ENV_HOST_KEY: ssh["host_key"],
            contract.ENV_SESSION_ID: session["id"],
            contract.ENV_ENROL_SECRET: session.pop("secret"),
        }
        try:
            self._event("Submitting the batch job", 10)
            try:
                job_id = await self.submit_batch_script()
            except Exception as e:
                # e.g. sbatch: "Requested node configuration is not available": the user's request
                raise RuntimeError(f"The batch system refused the job: {str(e).strip()[:1500]}") from None
            if not job_id:
                raise RuntimeError("The batch system did not return a job id")
            await self.broker.update_session(self.session_id, job_id=job_id)
            self._event(f"Job {job_id} submitted to the queue", 20)
        except Exception:
            await self._close_session("submit failed")
            raise
        finally:
            self._broker_env = {}  # the secret lives only in the submitted job from here on
        return await self._wait_ready()

    async def _wait_ready(self) -> str:
        """Wait for the broker's ready event; progress stages are reported in this order, each
        once, with rising percentages: queued (30, with the scheduler's reason when known),
        running on NODE (50), tunnel connected (70), server ready (100)."""
        seen: set[str] = set()
        started = time.monotonic()
        running_since: list[float] = []  # when the job was first seen running
        job_host: list[str] = []  # where the batch system said the job runs

        def stage(name: str, message: str, progress: int) -> None:
            if name not in seen:
                seen.add(name)
                self._event(message, progress)

        def running(node: str = "") -> None:
            if "running" in seen:
                return
            host = ""
            try:
                host = self.state_gethost() or ""
            except Exception:
                pass
            host = host or node
            if host:
                job_host.append(host)
            stage("running", f"Job {self.job_id} running{' on ' + host if host else ''}; waiting for the agent", 50)
            running_since.append(time.monotonic())
            self.note_job_started()

        while True:
            s = await self.broker.wait_session(self.session_id, "ready", self.broker_wait_interval)
            if s["state"] == "closed":
                raise RuntimeError(
                    await self.job_failure_message(
                        f"The session ended before the server was ready ({s.get('end_reason') or 'no reason given'})."
                    )
                )
            if s["state"] in ("connected", "ready"):
                node = (
                    s.get("node") or s.get("node_reported") or ""
                )  # hub-side if known, else the agent's claim (escaped)
                running(node)
                # the agent's hello may not be in yet: then the batch system's word for the host
                node = node or (job_host[0] if job_host else "")
                stage("connected", f"Tunnel connected from {node or 'the node'}; starting Jupyter", 70)
            if s["state"] == "ready":
                self._event(f"Server ready after {time.monotonic() - started:.1f}s", 100)
                return s["target"]
            if running_since and self.ready_timeout and time.monotonic() - running_since[0] > self.ready_timeout:
                await self._close_session("server not ready in time")
                await self.cancel_batch_job()
                raise RuntimeError(
                    await self.job_failure_message(
                        f"Job {self.job_id} ran for {self.ready_timeout:g} s without its server becoming "
                        f"ready ({type(self).__name__}.ready_timeout); it was cancelled."
                    )
                )
            n_events = len(self._progress_events)
            status = await self.query_job_status()
            if status == JobStatus.PENDING:
                # a backend may have reported its own pending event (reason, estimated start)
                if len(self._progress_events) == n_events:
                    stage("queued", f"Job {self.job_id} queued; waiting for resources", 30)
                else:
                    seen.add("queued")
            elif status == JobStatus.RUNNING:
                running()
            elif status != JobStatus.UNKNOWN:
                await self._close_session("job ended before the server was ready")
                raise RuntimeError(await self.job_failure_message())

    def note_job_started(self) -> None:
        """Hook: called once when the job is first seen running (walltime bookkeeping)."""

    async def job_output_tail(self, max_lines: int = 20) -> str:
        """The last lines of the job's output, if this backend can read them (else "")."""
        return ""

    async def job_failure_message(self, headline: str = "") -> str:
        """A message for the user when the job ended before the server was ready.

        A maintenance notice from ``node-agent launch`` is passed on as it is; otherwise the
        job's final state (and the scheduler's reason, when known) and its last output lines
        are shown (these never contain secrets: the agent and the launcher do not print
        environments).
        """
        tail = await self.job_output_tail()
        for line in tail.splitlines():
            if line.startswith(MAINTENANCE_PREFIX):
                return line[len(MAINTENANCE_PREFIX) :].strip() or "The cluster is in maintenance."
        state = str(getattr(self, "job_status", "") or "").strip()
        info = getattr(self, "job_info", None)
        reason = str(getattr(info, "reason", "") or "").strip()
        detail = ", ".join(x for x in (state, reason if reason and reason != "None" else "") if x)
        msg = headline or f"Job {self.job_id} ended before the server was ready{f' ({detail})' if detail else ''}."
        if tail.strip():
            msg += " Last lines of the job's output:\n" + tail.strip()[-1500:]
        return msg

    async def _close_session(self, reason: str) -> None:
        if not self.session_id:
            return
        try:
            await self.broker.close_session(self.session_id, reason)
        except BrokerError as e:
            if e.status != 404:
                self.log.warning("%s: could not close broker session: %s", self._log_name, e)

    async def poll(self) -> int | None:
        if not self.job_id and not self.session_id:
            return 0
        if self.session_id:
            try:
                s = await self.broker.get_session(self.session_id)
            except BrokerError as e:
                if e.status != 404:
                    # broker down or restarting: the job's state alone decides for now
                    self.log.warning("%s: broker not answering (%s); judging by the job", self._log_name, e)
                    s = {"state": "unknown"}
                else:
                    s = {"state": "closed", "exit_status": None}
            self.last_session = s  # e.g. the walltime warning, for the options mixin
            if s["state"] == "closed":
                if self.job_id:
                    status = await self.query_job_status()
                    if status in ALIVE:
                        await self.cancel_batch_job()
                code = s.get("exit_status")
                self.clear_state()
                return code if isinstance(code, int) and code != 0 else 1 if code is None else 0
        status = await self.query_job_status()
        if status in ALIVE:
            return None
        await self._close_session(f"job {self.job_id} ended")
        self.clear_state()
        return 1

    async def stop(self, now: bool = False) -> None:
        # Close the session first: the broker stops publishing the route and drops the
        # tunnel (the agent, refused on reconnect, stops the server), then cancel the job.
        await self._close_session("stopped by the hub")
        if self.job_id:
            await super().stop(now=now)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        if not hasattr(self, "_progress_events"):
            self._reset_progress()
        sent = 0
        while True:
            while sent < len(self._progress_events):
                yield self._progress_events[sent]
                sent += 1
            self._progress_changed.clear()
            await self._progress_changed.wait()

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.session_id:
            state["session_id"] = self.session_id
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.session_id = state.get("session_id", "")

    def clear_state(self) -> None:
        super().clear_state()
        self.session_id = ""


config_check.warn_at_hub_start()  # inside a starting hub: warn about settings that do nothing here
