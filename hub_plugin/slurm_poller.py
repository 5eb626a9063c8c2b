"""The Slurm part of the hub-wide job poller (:mod:`hub_plugin.job_poller` has the shared part
and the contract).

One :class:`SlurmJobPoller` runs at most ONE ``squeue`` per ``interval`` for all watched jobs::

    squeue -h -t all -o '%i|%T|%R|%N|%S' -j ID1,ID2,...     (or ``-u USER`` when ``user`` is set)

``squeue_calls`` counts the calls. ``Invalid job id`` (every requested id unknown) means all GONE.

Queue positions: while a watched job is pending, each query is followed by one more
``squeue -h -t PENDING -o '%i|%P' --sort=-p,i`` (every pending job, highest priority first;
counted in ``queue_calls``), and a pending job's :class:`JobInfo` carries its ``position``
among the pending jobs of its partition and their number (``queued``). If that query fails the
positions are left out; the states are not affected.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from datetime import datetime

from .job_poller import GONE, JobInfo, JobPoller, JobQueryError, Phase
from .remote import CommandRunner, RunnerError

__all__ = ["JobInfo", "SlurmJobPoller", "SlurmQueryError", "GONE", "parse_squeue", "parse_queue"]

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


# Non-terminal states in which the job's processes exist (or are being torn down).
RUNNING_LIKE = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"})
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESV_DEL_HOLD"})

#: The Slurm name of :class:`~hub_plugin.job_poller.JobQueryError`.
SlurmQueryError = JobQueryError


def slurm_phase(state: str) -> Phase:
    """Slurm's long state name as a scheduler-neutral phase."""
    if state in RUNNING_LIKE:
        return "running"
    if state in PENDING_STATES:
        return "pending"
    if state in TERMINAL_STATES:
        return "finished"
    return "unknown"


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
        state = state.split()[0] if state else "UNKNOWN"
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state,
            phase=slurm_phase(state),
            reason=reason,
            node=nodes or None,
            start_time=_parse_time(start),
            seen_at=seen_at,
        )
    return jobs


class SlurmJobPoller(JobPoller):
    """The shared poller on ``squeue`` (see :mod:`hub_plugin.job_poller` for the contract).

    :param runner: object with ``async run(argv, input=None, env=None)``; default LocalRunner.
    :param interval: seconds between periodic queries (while something is watched).
    :param user: if set, query ``squeue -u USER`` instead of listing job ids (one short command
        line however many jobs; answers are still given only for watched ids).
    :param squeue: path of the squeue command on the machine the runner reaches.
    :param timeout: seconds one squeue may take.
    """

    command_name = "squeue"

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
        super().__init__(runner, interval=interval, timeout=timeout, log=log)
        self.user = user
        self.squeue = squeue
        self.queue_calls = 0

    @property
    def squeue_calls(self) -> int:
        return self.calls

    def check_id(self, job_id: object) -> str:
        return _check_id(job_id)

    def argv(self, ids: Iterable[str]) -> list[str]:
        argv = [self.squeue, "-h", "-t", "all", "-o", SQUEUE_FORMAT]
        if self.user:
            argv += ["-u", self.user]
        else:
            argv += ["-j", ",".join(sorted(ids, key=_id_sort_key))]
        return argv

    def parse(self, exit_status: int, out: str, err: str, seen_at: float) -> dict[str, JobInfo]:
        if exit_status != 0:
            if "Invalid job id" in err:
                return {}  # every requested id is unknown to Slurm: all GONE
            raise SlurmQueryError(f"squeue exited {exit_status}: {err.strip()[:300]}")
        return parse_squeue(out, seen_at=seen_at)

    async def after_query(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if any(self._jobs[job_id].is_pending for job_id in ids if job_id in self._jobs):
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
