"""One job-status poller shared by every spawner of a hub: the scheduler-neutral part.

Stock batchspawner runs one status command per job per poll. A :class:`JobPoller` runs at most
ONE status command per ``interval`` for all watched jobs together, and every spawner reads its
job's :class:`JobInfo` from that one result. The scheduler-specific parts (the command line and
how its output reads) are two methods of a subclass: :class:`hub_plugin.slurm_poller.SlurmJobPoller`
(``squeue``) and :class:`hub_plugin.gridengine_poller.GridEngineJobPoller` (``qstat``).

Contract:

* ``watch(job_id)`` subscribes a job, ``unwatch(job_id)`` drops it (reference-counted, so two
  watchers of one id are fine). While nothing is watched, no command runs.
* ``await status(job_id)`` answers from the latest result. If the job has not been part of any
  query yet (just submitted, or never watched), it waits for a refresh that includes it.
  ``status(job_id, fresh=True)`` always waits for a query that *started after* the call.
* ``await refresh()`` forces an immediate query. Concurrent callers are coalesced: everyone
  who asks while a query is running shares the single next query; callers who ask while no
  query runs share the one that starts now.
* A job absent from the output (finished and purged, or unknown to the scheduler) has state
  ``GONE``.
* The command runner is pluggable (``runner.run(argv) -> (exit_status, stdout, stderr)``):
  :class:`hub_plugin.remote.LocalRunner` by default, :class:`hub_plugin.remote.LoginNodeRunner`
  when the hub is not on the cluster.
* ``calls`` counts every invocation of the status command (periodic and forced).
* A failing command is logged (once per failure streak) and the previous answers are kept for
  the periodic loop; a forced :meth:`refresh` raises :class:`JobQueryError` instead.
* The background loop is started lazily by the first ``watch()`` (inside a running event loop)
  and owned by the poller: ``await close()`` cancels and awaits it.

A subclass implements :meth:`JobPoller.argv` (the command for a set of ids) and
:meth:`JobPoller.parse` (its exit status and output -> ``{job_id: JobInfo}``), and may override
:meth:`JobPoller.check_id`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from .remote import CommandRunner, LocalRunner, RunnerError

__all__ = ["GONE", "JobInfo", "JobPoller", "JobQueryError", "Phase"]

_log = logging.getLogger(__name__)

GONE = "GONE"

#: Where a job is in its life, whatever the scheduler calls its state.
Phase = Literal["pending", "running", "finished", "unknown"]

P = TypeVar("P", bound="JobPoller")


class JobQueryError(RuntimeError):
    """The status command could not be run or failed."""


@dataclass(frozen=True)
class JobInfo:
    """Status of one job as seen by one query.

    ``state``: the scheduler's own state name (Slurm ``PENDING``, ``RUNNING``, ...; Grid Engine
    ``qw``, ``r``, ...) or ``GONE``. ``phase``: the same, scheduler-neutral (``running`` means the
    job's processes exist, also while they are suspended or torn down). ``reason``: why a
    pending job waits, else None. ``node``: host(s) of a started job, else None. ``start_time``:
    actual or estimated start (naive local time), None when unknown. ``seen_at``:
    ``time.monotonic()`` when the query that produced this answer started. ``position`` /
    ``queued`` / ``partition``: where a pending job stands in its partition's queue, when the
    poller knows (see :meth:`JobPoller.after_query`).
    """

    job_id: str
    state: str
    reason: str | None = None
    node: str | None = None
    start_time: datetime | None = None
    seen_at: float = 0.0
    phase: Phase = "unknown"
    position: int | None = None  # a pending job's place among its partition's/queue's pending jobs (1 = next)
    queued: int | None = None  # how many jobs are pending there
    partition: str | None = None  # the partition (queue) of that count

    @classmethod
    def gone(cls, job_id: str, seen_at: float = 0.0) -> JobInfo:
        """A job the scheduler no longer (or never) knew."""
        return cls(job_id, GONE, seen_at=seen_at, phase="finished")

    @property
    def is_pending(self) -> bool:
        return self.phase == "pending"

    @property
    def is_running(self) -> bool:
        return self.phase == "running"

    @property
    def is_finished(self) -> bool:
        return self.phase == "finished" or self.state == GONE


class JobPoller:
    """Shared job-status poller; see the module docstring for the contract.

    :param runner: object with ``async run(argv, input=None, env=None)``; default LocalRunner.
    :param interval: seconds between periodic queries (while something is watched).
    :param timeout: seconds one query may take.
    """

    _shared: dict[object, JobPoller] = {}

    #: Name of the status command, for logs and errors (set by subclasses).
    command_name = "status query"

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        interval: float = 5.0,
        timeout: float = 30.0,
        log: logging.Logger | None = None,
    ):
        if interval <= 0:
            raise ValueError(f"{type(self).__name__}: interval must be > 0")
        self.runner: CommandRunner = runner or LocalRunner()
        self.interval = float(interval)
        self.timeout = timeout
        self.log = log or _log
        self.calls = 0
        self._watched: Counter[str] = Counter()
        self._extra: set[str] = set()  # one-off ids for the next query (status() of unwatched ids)
        self._jobs: dict[str, JobInfo] = {}
        self._queried: set[str] = set()  # ids included in the latest successful query
        self._inflight_ids: frozenset[str] = frozenset()  # ids of the query now running
        self._last_query_at = 0.0
        self._started = 0  # generation of the last query started
        self._done = 0  # generation of the last query finished (ok or failed)
        self._wanted = 0  # highest generation some caller waits for
        self._last_error: BaseException | None = None
        self._error_gen = 0
        self._wake: asyncio.Event | None = None
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._failing = False

    # -- sharing -------------------------------------------------------------------------------

    @classmethod
    def shared(cls: type[P], key: object = "default", **kwargs: Any) -> P:
        """Return the process-wide poller for ``key``, creating it with ``kwargs`` the first time.

        Spawners call this so that all of them use one poller (one query per interval).
        Pollers are per event loop: the running loop is part of the key.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        full_key = (cls, key, id(loop))  # a Slurm and a Grid Engine poller never share
        poller = cls._shared.get(full_key)
        if poller is None or poller._closed:
            poller = cls._shared[full_key] = cls(**kwargs)
        return poller  # type: ignore[return-value]

    # -- subscriptions -------------------------------------------------------------------------

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._watched)

    def watch(self, job_id: str) -> None:
        """Include ``job_id`` in every query until :meth:`unwatch` is called as often."""
        job_id = self.check_id(job_id)
        self._watched[job_id] += 1
        self._ensure_task()
        if self._wake is not None:
            self._wake.set()  # let an idle loop recompute when the next periodic query is due

    def unwatch(self, job_id: str) -> None:
        job_id = str(job_id)
        if self._watched.get(job_id, 0) > 1:
            self._watched[job_id] -= 1
            return
        self._watched.pop(job_id, None)
        self._jobs.pop(job_id, None)
        self._queried.discard(job_id)

    # -- answers -------------------------------------------------------------------------------

    def cached(self, job_id: str) -> JobInfo | None:
        """Latest known answer for ``job_id`` without waiting (None if never queried)."""
        return self._jobs.get(str(job_id))

    async def status(self, job_id: str, *, fresh: bool = False) -> JobInfo:
        """Status of ``job_id`` from the shared query (see module docstring)."""
        job_id = self.check_id(job_id)
        if not fresh and job_id in self._queried:
            return self._jobs[job_id]
        if not fresh and self._started > self._done and job_id in self._inflight_ids:
            await self._wait_for(self._started)  # the running query includes it: share it
        else:
            if job_id not in self._watched:
                self._extra.add(job_id)
            await self.refresh()
        info = self._jobs.get(job_id)
        if info is None:  # only possible if unwatched meanwhile
            info = JobInfo.gone(job_id, self._last_query_at)
        return info

    async def refresh(self) -> dict[str, JobInfo]:
        """Run a query now (coalesced with concurrent callers); return the answers.

        Raises :class:`JobQueryError` if that query failed.
        """
        return await self._wait_for(self._started + 1)  # the first query that starts after now

    async def _wait_for(self, target: int) -> dict[str, JobInfo]:
        """Wait until query generation ``target`` has finished, requesting it if needed."""
        if self._closed:
            raise JobQueryError("poller is closed")
        self._ensure_task()
        assert self._wake is not None and self._changed is not None
        if target > self._started:
            self._wanted = max(self._wanted, target)
            self._wake.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._done >= target or self._closed)
        if self._closed and self._done < target:
            raise JobQueryError("poller closed")
        if self._error_gen >= target and self._last_error is not None:
            raise JobQueryError(str(self._last_error)) from self._last_error
        return dict(self._jobs)

    # -- lifecycle -----------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._closed:
            raise JobQueryError("poller is closed")
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: started by the first refresh()/status()
        if self._wake is None:
            self._wake = asyncio.Event()
            self._changed = asyncio.Condition()
        self._task = loop.create_task(self._loop(), name=type(self).__name__)

    async def close(self) -> None:
        """Stop the background loop and wake every waiter (they get JobQueryError)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()
        for key, poller in list(self._shared.items()):
            if poller is self:
                del self._shared[key]

    async def __aenter__(self: P) -> P:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None and self._changed is not None
        while True:
            if self._wanted <= self._done:
                # idle: sleep until the next periodic tick (only while something is watched)
                # or until refresh()/watch() wakes us, then re-evaluate
                timeout = None
                if self._watched:
                    timeout = self._last_query_at + self.interval - time.monotonic()
                if timeout is None or timeout > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                    continue
            self._started += 1
            gen = self._started
            try:
                await self._query_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep polling; forced callers see the error
                self._last_error = e
                self._error_gen = gen
                if not self._failing:
                    self.log.warning("%s failed: %s", self.command_name, str(e)[:300])
                self._failing = True
            else:
                if self._failing:
                    self.log.info("%s works again", self.command_name)
                self._failing = False
            finally:
                self._done = gen
                async with self._changed:
                    self._changed.notify_all()

    # -- the scheduler-specific part -----------------------------------------------------------

    def check_id(self, job_id: object) -> str:
        """*job_id* as text; ValueError if it cannot be a job id of this scheduler."""
        text = str(job_id).strip()
        if not text or len(text) > 64 or not text.isdigit():
            raise ValueError(f"invalid job id {text[:64]!r}")
        return text

    def argv(self, ids: Iterable[str]) -> list[str]:
        """The status command for *ids* (all watched or asked-for ids)."""
        raise NotImplementedError

    def parse(self, exit_status: int, out: str, err: str, seen_at: float) -> dict[str, JobInfo]:
        """``{job_id: JobInfo}`` from one run of :meth:`argv`; raise JobQueryError on failure.
        Ids missing from the answer count as GONE."""
        raise NotImplementedError

    async def _query_once(self) -> None:
        ids = set(self._watched) | self._extra
        self._extra = set()
        self._inflight_ids = frozenset(ids)
        started_at = time.monotonic()
        self._last_query_at = started_at
        if not ids:
            return  # nothing to ask about: no command
        self.calls += 1
        try:
            status, out, err = await self.runner.run(self.argv(ids), timeout=self.timeout)
        except RunnerError as e:
            raise JobQueryError(f"{self.command_name} could not run: {e}") from None
        found = self.parse(status, out, err, started_at)
        live = set(self._watched)
        for job_id in ids:
            self._jobs[job_id] = found.get(job_id) or JobInfo.gone(job_id, started_at)
        # drop answers for ids nobody watches any more (one-off ids are kept until next query)
        for job_id in list(self._jobs):
            if job_id not in ids and job_id not in live:
                del self._jobs[job_id]
        self._queried = set(ids)
        self.log.debug("%s #%d: %d ids, %d found", self.command_name, self.calls, len(ids), len(found))
        await self.after_query(ids)

    async def after_query(self, ids: Iterable[str]) -> None:
        """Hook run after each successful query with the ids it asked about (default: nothing).
        A subclass may enrich the answers (e.g. queue positions); it must not raise."""
