"""One Slurm job-status poller shared by every spawner in the hub process.

Stock batchspawner runs one ``squeue`` per job per poll. Here a single :class:`SlurmJobPoller`
runs at most ONE ``squeue`` per ``interval`` for all watched jobs together::

    squeue -h -t all -o '%i|%T|%R|%N|%S' -j ID1,ID2,...     (or ``-u USER`` when ``user`` is set)

and every spawner reads its job's :class:`JobInfo` from that one result.

Contract:

* ``watch(job_id)`` subscribes a job, ``unwatch(job_id)`` drops it (reference-counted, so two
  watchers of one id are fine). While nothing is watched, no ``squeue`` runs.
* ``await status(job_id)`` answers from the latest result. If the job has not been part of any
  query yet (just submitted, or never watched), it waits for a refresh that includes it.
  ``status(job_id, fresh=True)`` always waits for a query that *started after* the call.
* ``await refresh()`` forces an immediate query. Concurrent callers are coalesced: everyone
  who asks while a query is running shares the single next query; callers who ask while no
  query runs share the one that starts now.
* A job absent from the output (finished and purged, or unknown to Slurm) has state ``GONE``.
* The command runner is pluggable (``runner.run(argv) -> (exit_status, stdout, stderr)``):
  :class:`hub_plugin.remote.LocalRunner` by default, :class:`hub_plugin.remote.LoginNodeRunner`
  when the hub is not on the cluster.
* ``squeue_calls`` counts every status ``squeue`` (periodic and forced).
* Queue positions: while a watched job is pending, each query is followed by one more
  ``squeue -h -t PENDING -o '%i|%P' --sort=-p,i`` (every pending job, highest priority first;
  counted in ``queue_calls``), and a pending job's :class:`JobInfo` carries its ``position``
  among the pending jobs of its partition and their number (``queued``). If that query fails the
  positions are left out; the states are not affected.
* A failing ``squeue`` is logged (once per failure streak) and the previous answers are kept for
  the periodic loop; a forced :meth:`refresh` raises :class:`SlurmQueryError` instead.
* The background loop is started lazily by the first ``watch()`` (inside a running event loop)
  and owned by the poller: ``await close()`` cancels and awaits it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .remote import CommandRunner, LocalRunner, RunnerError

__all__ = ["JobInfo", "SlurmJobPoller", "SlurmQueryError", "GONE", "parse_squeue"]

_log = logging.getLogger(__name__)

GONE = "GONE"
SQUEUE_FORMAT = "%i|%T|%R|%N|%S"
#: the pending queue, highest priority first (ties: older job first)
QUEUE_ARGS = ["-h", "-t", "PENDING", "-o", "%i|%P", "--sort=-p,i"]

# Slurm job states after which a job will never run again.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
        GONE,
    }
)


class SlurmQueryError(RuntimeError):
    """``squeue`` could not be run or failed."""


@dataclass(frozen=True)
class JobInfo:
    """Status of one job as seen by one ``squeue`` run.

    ``state``: Slurm's long state name (``PENDING``, ``RUNNING``, ``COMPLETING``, ``CANCELLED``,
    ...) or ``GONE``. ``reason``: why a pending job waits (``JobHeldUser``, ``Resources``, ...),
    else None. ``node``: node list of a started job, else None. ``start_time``: actual or
    estimated start (naive local time, as squeue prints it), None when unknown. ``seen_at``:
    ``time.monotonic()`` when the query that produced this answer started.
    """

    job_id: str
    state: str
    reason: str | None = None
    node: str | None = None
    start_time: datetime | None = None
    seen_at: float = 0.0
    position: int | None = None  # a pending job's place among its partition's pending jobs (1 = next)
    queued: int | None = None  # how many jobs are pending in that partition
    partition: str | None = None

    @property
    def is_pending(self) -> bool:
        return self.state in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESV_DEL_HOLD")

    @property
    def is_running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL_STATES


def parse_queue(output: str) -> dict[str, tuple[int, int, str]]:
    """Parse the pending queue (:data:`QUEUE_ARGS`) into ``{job_id: (position, queued, partition)}``."""
    by_partition: dict[str, list[str]] = {}
    for line in output.splitlines():
        job_id, sep, partition = line.strip().partition("|")
        if sep and job_id:
            by_partition.setdefault(partition, []).append(job_id)
    return {
        job_id: (i + 1, len(jobs), partition)
        for partition, jobs in by_partition.items()
        for i, job_id in enumerate(jobs)
    }


def _parse_time(text: str) -> datetime | None:
    text = text.strip()
    if not text or text in ("N/A", "Unknown", "None"):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def parse_squeue(output: str, seen_at: float = 0.0) -> dict[str, JobInfo]:
    """Parse ``squeue -h -o '%i|%T|%R|%N|%S'`` output into ``{job_id: JobInfo}``.

    Lines that do not have five fields are skipped. ``%R`` is ``(Reason)`` for jobs that wait
    and the node list for started jobs; only the former is reported as ``reason``.
    """
    jobs: dict[str, JobInfo] = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not parts[0]:
            continue
        job_id, state, reason_or_nodes, nodes, start = (p.strip() for p in parts)
        reason = None
        if reason_or_nodes.startswith("(") and reason_or_nodes.endswith(")"):
            reason = reason_or_nodes[1:-1] or None
            if reason == "None":
                reason = None
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",
            reason=reason,
            node=nodes or None,
            start_time=_parse_time(start),
            seen_at=seen_at,
        )
    return jobs


class SlurmJobPoller:
    """Shared Slurm status poller; see the module docstring for the contract.

    :param runner: object with ``async run(argv, input=None, env=None)``; default LocalRunner.
    :param interval: seconds between periodic queries (while something is watched).
    :param user: if set, query ``squeue -u USER`` instead of listing job ids (one short command
        line however many jobs; answers are still given only for watched ids).
    :param squeue: path of the squeue command on the machine the runner reaches.
    :param timeout: seconds one squeue may take.
    """

    _shared: dict[object, SlurmJobPoller] = {}

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        interval: float = 5.0,
        user: str | None = None,
        squeue: str = "squeue",
        timeout: float = 30.0,
        log: logging.Logger | None = None,
    ):
        if interval <= 0:
            raise ValueError("SlurmJobPoller: interval must be > 0")
        self.runner: CommandRunner = runner or LocalRunner()
        self.interval = float(interval)
        self.user = user
        self.squeue = squeue
        self.timeout = timeout
        self.log = log or _log
        self.squeue_calls = 0
        self.queue_calls = 0
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
    def shared(cls, key: object = "default", **kwargs) -> SlurmJobPoller:
        """Return the process-wide poller for ``key``, creating it with ``kwargs`` the first time.

        Spawners call this so that all of them use one poller (one squeue per interval).
        Pollers are per event loop: the running loop is part of the key.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        full_key = (key, id(loop))
        poller = cls._shared.get(full_key)
        if poller is None or poller._closed:
            poller = cls._shared[full_key] = cls(**kwargs)
        return poller

    # -- subscriptions -------------------------------------------------------------------------

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._watched)

    def watch(self, job_id: str) -> None:
        """Include ``job_id`` in every query until :meth:`unwatch` is called as often."""
        job_id = _check_id(job_id)
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
        job_id = _check_id(job_id)
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
            info = JobInfo(job_id, GONE, seen_at=self._last_query_at)
        return info

    async def refresh(self) -> dict[str, JobInfo]:
        """Run a query now (coalesced with concurrent callers); return the answers.

        Raises :class:`SlurmQueryError` if that query failed.
        """
        return await self._wait_for(self._started + 1)  # the first query that starts after now

    async def _wait_for(self, target: int) -> dict[str, JobInfo]:
        """Wait until query generation ``target`` has finished, requesting it if needed."""
        if self._closed:
            raise SlurmQueryError("poller is closed")
        self._ensure_task()
        assert self._wake is not None and self._changed is not None
        if target > self._started:
            self._wanted = max(self._wanted, target)
            self._wake.set()
        async with self._changed:
            await self._changed.wait_for(lambda: self._done >= target or self._closed)
        if self._closed and self._done < target:
            raise SlurmQueryError("poller closed")
        if self._error_gen >= target and self._last_error is not None:
            raise SlurmQueryError(str(self._last_error)) from self._last_error
        return dict(self._jobs)

    # -- lifecycle -----------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._closed:
            raise SlurmQueryError("poller is closed")
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: started by the first refresh()/status()
        if self._wake is None:
            self._wake = asyncio.Event()
            self._changed = asyncio.Condition()
        self._task = loop.create_task(self._loop(), name="SlurmJobPoller")

    async def close(self) -> None:
        """Stop the background loop and wake every waiter (they get SlurmQueryError)."""
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

    async def __aenter__(self) -> SlurmJobPoller:
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
                    self.log.warning("squeue failed: %s", str(e)[:300])
                self._failing = True
            else:
                if self._failing:
                    self.log.info("squeue works again")
                self._failing = False
            finally:
                self._done = gen
                async with self._changed:
                    self._changed.notify_all()

    def _argv(self, ids: Iterable[str]) -> list[str]:
        argv = [self.squeue, "-h", "-t", "all", "-o", SQUEUE_FORMAT]
        if self.user:
            argv += ["-u", self.user]
        else:
            argv += ["-j", ",".join(sorted(ids, key=_id_sort_key))]
        return argv

    async def _query_once(self) -> None:
        ids = set(self._watched) | self._extra
        self._extra = set()
        self._inflight_ids = frozenset(ids)
        started_at = time.monotonic()
        self._last_query_at = started_at
        if not ids:
            return  # nothing to ask about: no squeue
        self.squeue_calls += 1
        try:
            status, out, err = await self.runner.run(self._argv(ids), timeout=self.timeout)
        except RunnerError as e:
            raise SlurmQueryError(f"squeue could not run: {e}") from None
        if status != 0:
            if "Invalid job id" in err:
                out = ""  # every requested id is unknown to Slurm: all GONE
            else:
                raise SlurmQueryError(f"squeue exited {status}: {err.strip()[:300]}")
        found = parse_squeue(out, seen_at=started_at)
        live = set(self._watched)
        for job_id in ids:
            self._jobs[job_id] = found.get(job_id) or JobInfo(job_id, GONE, seen_at=started_at)
        # drop answers for ids nobody watches any more (one-off ids are kept until next query)
        for job_id in list(self._jobs):
            if job_id not in ids and job_id not in live:
                del self._jobs[job_id]
        self._queried = set(ids)
        self.log.debug("squeue #%d: %d ids, %d found", self.squeue_calls, len(ids), len(found))
        if any(self._jobs[job_id].is_pending for job_id in ids):
            await self._add_positions(ids)

    async def _add_positions(self, ids: Iterable[str]) -> None:
        """Give the pending jobs among *ids* their queue position (see the module docstring)."""
        self.queue_calls += 1
        try:
            status, out, err = await self.runner.run([self.squeue, *QUEUE_ARGS], timeout=self.timeout)
        except RunnerError as e:
            self.log.debug("squeue for queue positions could not run: %s", e)
            return
        if status != 0:
            self.log.debug("squeue for queue positions exited %s: %s", status, err.strip()[:300])
            return
        queue = parse_queue(out)
        for job_id in ids:
            info = self._jobs.get(job_id)
            if info is not None and info.is_pending and job_id in queue:
                position, queued, partition = queue[job_id]
                self._jobs[job_id] = dataclasses.replace(info, position=position, queued=queued, partition=partition)


def _check_id(job_id: object) -> str:
    text = str(job_id).strip()
    # Slurm ids: 123, 123_4 (array task), 123+1 (het component)
    if not text or len(text) > 64 or not all(c.isdigit() or c in "_+" for c in text):
        raise ValueError(f"invalid Slurm job id {text[:64]!r}")
    return text


def _id_sort_key(job_id: str):
    head = job_id.split("_")[0].split("+")[0]
    return (int(head) if head.isdigit() else 0, job_id)
