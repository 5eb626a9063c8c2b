"""The session card on the hub home page, one per server (the way Open OnDemand shows sessions).

:class:`SessionCardMixin` (a base of :class:`~hub_plugin.walltime.WalltimeMixin`, so of every
spawner with :class:`~hub_plugin.options.ResourceOptionsMixin`; it needs
:class:`~hub_plugin.mixin.BrokerSpawnerMixin` after it in the bases):

* :meth:`SessionCardMixin.session_card` is what ``hub_plugin/templates/home.html`` shows: job
  id, partition, node, state (``submitting``; ``queued`` with the scheduler's reason and estimated
  start; ``starting``; ``running``), time left, or for a stopped server the last job's ``ended``
  record.
* **The ended record** is made when the spawner lets go of its job (``clear_state``: every path
  that ends a job goes through it: the job died, the hub stopped it, the walltime ran out, the
  start failed) from what is known then: the batch system's final state (Slurm keeps finished
  jobs visible to ``squeue -t all`` for ``MinJobAge``), the exit status the node agent reported to
  the broker, and whether the hub asked for the stop. :func:`end_reason` words it. A job let go
  while still completing is "ending" until ``poll()`` has asked the backend for its final state
  (``final_job_state``; Slurm: a few seconds). The record is
  kept in the spawner's state (``get_state``/``load_state``) until the next job ends, so it
  survives hub restarts and shows for named servers too.
* The job's output log is read by :meth:`SessionCardMixin.read_job_output` (the backend's
  ``job_output_file`` and ``tail_file``), for the handler in :mod:`hub_plugin.session_log`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from traitlets import Dict, Integer, Unicode

from .spawner_api import BatchSpawnerAPI

if TYPE_CHECKING:
    from .mixin import BrokerSpawnerMixin

    _Base = BrokerSpawnerMixin
else:
    _Base = BatchSpawnerAPI

__all__ = ["SessionCardMixin", "end_reason"]

#: How long a card says "ending" while the batch system's final state is asked for (after that,
#: e.g. when the hub restarted meanwhile, it says "ended" with what is known).
SETTLE_SHOW_S = 60.0

#: The batch system's final job state -> what the card says (Slurm's names; others fall through).
FINAL_STATES = {
    "TIMEOUT": "walltime reached",
    "CANCELLED": "cancelled",
    "NODE_FAIL": "node failure",
    "OUT_OF_MEMORY": "out of memory",
    "PREEMPTED": "preempted",
    "BOOT_FAIL": "node failed to boot",
    "DEADLINE": "deadline reached",
    "FAILED": "failed",
    "COMPLETED": "completed",
}


def end_reason(final_state: str, exit_status: int | None, stop_cause: str = "", broker_reason: str = "") -> str:
    """Why a job ended, in a few words: the batch system's final state first (walltime,
    cancelled, node failure, ...), else the hub's own stop (*stop_cause*), else the broker's
    reason; with the server's exit status when it is not 0."""
    state = (final_state or "").split()[0].rstrip("+") if final_state else ""
    if state in FINAL_STATES:
        reason = FINAL_STATES[state]
        if state == "CANCELLED" and stop_cause:
            reason = f"cancelled ({stop_cause})"
    elif stop_cause:
        reason = stop_cause
    elif broker_reason:
        reason = broker_reason
    else:
        reason = "ended"
    if isinstance(exit_status, int) and exit_status != 0 and state not in ("TIMEOUT", "CANCELLED"):
        reason += f", exit status {exit_status}"
    return reason


class SessionCardMixin(_Base):
    """The card's facts for a broker spawner (see the module docstring)."""

    job_log_download_max_bytes = Integer(
        20 * 2**20, help="The most bytes (the end of the log) a download of the job's output log returns."
    ).tag(config=True)

    # state kept across hub restarts (and across stops: the last job's card)
    ended_job = Dict()
    _stop_cause = Unicode("")

    # -- the job's output (backends provide job_output_file(job_id) and tail_file(path, ...)) --
    async def read_job_output(self, job_id: str, max_lines: int = 0, max_bytes: int = 0) -> str | None:
        """The end of *job_id*'s output (last *max_lines* lines, or last *max_bytes* bytes), read
        where the batch commands run; None when the backend cannot read it or there is no file.

        The backend (the concrete spawner class, which comes after this mixin in the bases)
        provides ``job_output_file(job_id) -> str`` and ``async tail_file(path, max_lines,
        max_bytes) -> str | None``."""
        path_of = getattr(self, "job_output_file", None)
        tail = getattr(self, "tail_file", None)
        if path_of is None or tail is None or not job_id:
            return None
        path = path_of(job_id)
        return await tail(path, max_lines, max_bytes) if path else None

    # -- the card ----------------------------------------------------------------------------
    def _partition(self) -> str:
        opts = getattr(self, "user_options", None) or {}
        return str(opts.get("partition") or getattr(self, "req_partition", "") or "")

    def _node(self) -> str:
        host = ""
        try:
            host = self.state_gethost() or ""
        except Exception:
            pass
        s = self.last_session or {}
        return str(host or s.get("node") or s.get("node_reported") or "")

    def _live_state(self) -> dict[str, Any]:
        """state, reason, estimated start of the current job."""
        if not self.job_id:
            return {"state": "submitting"}
        info = getattr(self, "job_info", None)  # Slurm's JobInfo, when the backend has one
        try:
            pending = bool(self.state_ispending())
        except Exception:
            pending = False
        if pending:
            out: dict[str, Any] = {"state": "queued"}
            reason = getattr(info, "reason", None)
            if reason and reason != "None":
                out["reason"] = str(reason)
            start = getattr(info, "start_time", None)
            if start is not None:
                out["start_estimate"] = start.isoformat(sep=" ", timespec="minutes")
            return out
        if self.ready:
            return {"state": "running"}
        return {"state": "starting"}

    def session_card(self) -> dict[str, Any]:
        """For the home page: the live job's facts while the server is active, else the last
        ended job's record ({} when there is none)."""
        if self.active:
            card: dict[str, Any] = {
                "job_id": self.job_id,
                "partition": self._partition(),
                "node": self._node(),
                **self._live_state(),
            }
            walltime = getattr(self, "walltime_status", None)
            card["walltime"] = (walltime() if walltime and card["state"] != "queued" else {}) or {}
            return card
        if self.ended_job:
            rec = dict(self._ended_job_now())
            settling = rec.pop("settling", False) and time.time() - float(rec.get("ended_at") or 0) < SETTLE_SHOW_S
            return {**rec, "state": "ending" if settling else "ended"}
        return {}

    def _ended_job_now(self) -> dict[str, Any]:
        """The last job's record, settled if any copy of it is. After a stop the hub drops this
        Spawner object and makes a new one from the database, possibly while the old one is still
        asking the batch system for the final state (:meth:`_settle_end`); the old one writes the
        settled record into the database, where the new one finds it here."""
        rec = self.ended_job
        if not rec.get("settling"):
            return rec
        orm_spawner = getattr(self, "orm_spawner", None)
        saved = (getattr(orm_spawner, "state", None) or {}).get("ended_job") if orm_spawner is not None else None
        if isinstance(saved, dict) and saved.get("job_id") == rec.get("job_id") and not saved.get("settling"):
            self.ended_job = rec = dict(saved)
        return rec

    def _end_record(self) -> dict[str, Any]:
        info = getattr(self, "job_info", None)
        final = str(getattr(info, "state", "") or "") or str(getattr(self, "job_status", "") or "")
        s = self.last_session or {}
        exit_status = s.get("exit_status")
        broker_reason = str(s.get("end_reason") or "")
        state = final.split()[0] if final else ""
        settling = state not in FINAL_STATES and getattr(self, "final_job_state", None) is not None
        return {
            "settling": settling,
            "job_id": self.job_id,
            "partition": self._partition(),
            "node": self._node(),
            "final_state": state,
            "exit_status": exit_status if isinstance(exit_status, int) else None,
            "reason": end_reason(final, exit_status, self._stop_cause, broker_reason),
            "stop_cause": self._stop_cause,
            "broker_reason": broker_reason,
            "ended_at": int(time.time()),
        }

    async def _settle_end(self, job_id: str) -> None:
        """When the job was let go before the batch system had its final state (e.g. still
        COMPLETING), ask the backend once more (``final_job_state(job_id) -> str``, if it has one)."""
        rec = self.ended_job
        finder = getattr(self, "final_job_state", None)
        if rec.get("job_id") != job_id or not rec.get("settling") or finder is None:
            return
        state = ""
        try:
            state = await finder(job_id)
        except Exception as e:
            self.log.warning("%s: final state of job %s unknown: %s", self._log_name, job_id, e)
        rec = {**self.ended_job, "settling": False}
        if state:
            reason = end_reason(state, rec.get("exit_status"), rec.get("stop_cause", ""), rec.get("broker_reason", ""))
            rec.update(final_state=state, reason=reason)
        self.ended_job = rec
        self.log.info("%s: job %s ended: %s", self._log_name, job_id, rec.get("reason"))
        self._persist_ended_job()

    def _persist_ended_job(self) -> None:
        """Write the settled record into the hub's database now: the hub may already have saved
        this (stopped) server's state with the record still settling, and the home page of a
        stopped server reads only the database."""
        orm_spawner = getattr(self, "orm_spawner", None)
        db = getattr(self, "db", None)
        if orm_spawner is None or db is None:
            return
        try:
            orm_spawner.state = {**(orm_spawner.state or {}), "ended_job": dict(self.ended_job)}
            db.commit()
        except Exception as e:  # the card must never break polling or stopping
            self.log.warning("%s: could not save the ended job: %s", self._log_name, e)

    # -- spawner API -------------------------------------------------------------------------
    async def start(self) -> str:
        self._stop_cause = ""
        return await super().start()

    async def poll(self) -> int | None:
        job_id = self.job_id
        status = await super().poll()
        if status is not None and job_id:
            await self._settle_end(job_id)
        return status

    async def stop(self, now: bool = False) -> None:
        if self.job_id and not self._stop_cause:
            self._stop_cause = "stopped from the hub"
        await super().stop(now=now)

    def clear_state(self) -> None:
        if self.job_id:
            try:
                self.ended_job = self._end_record()
            except Exception as e:  # the card must never keep a server from stopping
                self.log.warning("%s: could not record the ended job: %s", self._log_name, e)
            self._stop_cause = ""
        super().clear_state()

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.ended_job:
            state["ended_job"] = dict(self._ended_job_now())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        ended = state.get("ended_job")
        self.ended_job = dict(ended) if isinstance(ended, dict) else {}


def tail_local_file(path: str, max_lines: int = 0, max_bytes: int = 0, window: int = 2**20) -> str | None:
    """The last *max_bytes* bytes of a local file, or its last *max_lines* lines (read from at
    most the last *window* bytes); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            want = max_bytes if max_bytes > 0 else window
            f.seek(max(0, size - want))
            data = f.read()
    except OSError:
        return None
    text = data.decode(errors="replace")
    if max_lines > 0 and not max_bytes:
        text = "".join(text.splitlines(keepends=True)[-max_lines:])
    return text
