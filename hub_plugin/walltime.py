"""The session's walltime: when the job's time runs out, as the hub sees it.

:class:`WalltimeMixin` (a base of :class:`~hub_plugin.options.ResourceOptionsMixin`; it
needs :class:`~hub_plugin.mixin.BrokerSpawnerMixin` after it in the bases):

* **The job knows its own end.** The batch script's prologue exports
  ``JUPYTERHUB_WALLTIME_END`` (epoch seconds, computed in the job when it starts) and the job
  environment ``JUPYTERHUB_WALLTIME_SECONDS`` (``req_runtime``).
* **The hub counts from when it first saw the job running** (``note_job_started``, called by
  the broker mixin; at the latest when the server is ready) and keeps that across hub restarts
  (``get_state``/``load_state``).
* **The home page shows the time left** (``hub_plugin/templates/home.html`` calls
  :meth:`WalltimeMixin.walltime_status`), with a warning in the last
  ``walltime_warning_minutes`` or once the broker passed on the batch system's walltime notice
  (SIGUSR1 to the agent; ``poll()`` reads it from the session).
* **Per server**: the session card (:mod:`hub_plugin.session_card`, a base of this mixin) shows
  the time left of each server, named ones included.
* **With ``walltime_enforce``** the hub stops the server when the time is up (for backends
  without a scheduler that does it; :class:`~hub_plugin.options.ResourceOptionsMixin` turns
  it on for the local backend).
"""

from __future__ import annotations

import time
from typing import Any

from traitlets import Bool, Float, Unicode

from .resources import human_duration, parse_slurm_time
from .session_card import SessionCardMixin

__all__ = ["WalltimeMixin"]


class WalltimeMixin(SessionCardMixin):
    """Walltime bookkeeping for a broker spawner (see the module docstring)."""

    walltime_warning_minutes = Float(
        10.0, help="The hub home page warns when less than this many minutes are left."
    ).tag(config=True)
    walltime_enforce = Bool(
        False,
        help="Stop the server from the hub when its walltime is over (default: on for backends "
        "without a scheduler that enforces it, i.e. the local backend).",
    ).tag(config=True)

    # state kept across hub restarts
    job_started_at = Float(0.0)
    walltime_seconds = Float(0.0)
    walltime_notice = Unicode("")

    def _runtime_seconds(self) -> int:
        """``req_runtime`` in seconds (0 when unset or not a Slurm time)."""
        try:
            return parse_slurm_time(str(getattr(self, "req_runtime", "") or "")) or 0
        except ValueError:
            return 0

    def note_job_started(self) -> None:
        """Called (by the broker mixin) when the job is first seen running."""
        if not self.job_started_at:
            self.job_started_at = time.time()
            self.walltime_seconds = float(self._runtime_seconds())

    def walltime_end(self) -> float:
        """Epoch seconds when the job's time runs out (as seen by the hub; 0 = unknown)."""
        if self.job_started_at and self.walltime_seconds:
            return self.job_started_at + self.walltime_seconds
        return 0.0

    def walltime_status(self) -> dict[str, Any]:
        """For the home page: end (epoch s), seconds left, human text, warning flag and notice."""
        end = self.walltime_end()
        if not end:
            return {}
        left = end - time.time()
        warn = left <= self.walltime_warning_minutes * 60 or bool(self.walltime_notice)
        return {
            "end": int(end),
            "left": int(max(0, left)),
            "text": human_duration(left),
            "warning": warn,
            "warning_seconds": int(self.walltime_warning_minutes * 60),
            "notice": self.walltime_notice,
        }

    # -- job environment and script ----------------------------------------------------------
    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        secs = self._runtime_seconds()
        if secs:
            env["JUPYTERHUB_WALLTIME_SECONDS"] = str(secs)
        return env

    def get_req_subvars(self) -> dict[str, Any]:
        """The prologue exports the job's own end time (computed when the job starts)."""
        subvars = super().get_req_subvars()
        secs = self._runtime_seconds()
        if secs:
            line = f'export JUPYTERHUB_WALLTIME_END="$(( $(date +%s) + {int(secs)} ))"'
            subvars["prologue"] = f"{subvars.get('prologue') or ''}\n{line}".strip()
        return subvars

    # -- spawner API -------------------------------------------------------------------------
    async def start(self) -> str:
        self.job_started_at = 0.0
        self.walltime_seconds = 0.0
        self.walltime_notice = ""
        url = await super().start()
        self.note_job_started()  # at the latest when ready
        return url

    async def poll(self) -> int | None:
        status = await super().poll()
        if status is None:
            # the broker mixin's poll keeps the session it read (walltime warning from the agent)
            s = self.last_session or {}
            if s.get("walltime_warning"):
                self.walltime_notice = str(s["walltime_warning"])[:200]
            end = self.walltime_end()
            if self.walltime_enforce and end and time.time() >= end:
                self.log.info(
                    "%s: walltime of %s is over; stopping the server",
                    self._log_name,
                    human_duration(self.walltime_seconds),
                )
                self._stop_cause = "walltime reached"
                await self.stop()
                self.clear_state()
                return 0
        return status

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.job_started_at:
            state["job_started_at"] = self.job_started_at
            state["walltime_seconds"] = self.walltime_seconds
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_started_at = float(state.get("job_started_at") or 0.0)
        self.walltime_seconds = float(state.get("walltime_seconds") or 0.0)

    def clear_state(self) -> None:
        super().clear_state()
        self.job_started_at = 0.0
        self.walltime_seconds = 0.0
        self.walltime_notice = ""
