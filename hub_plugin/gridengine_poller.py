"""The Grid Engine part of the hub-wide job poller (:mod:`hub_plugin.job_poller` has the shared
part and the contract).

One :class:`GridEngineJobPoller` runs at most ONE ``qstat`` per ``interval`` for all watched jobs::

    qstat -xml -u USER          (USER: the submitting account, default '*' = everybody's jobs)

``qstat`` has no job-list filter for its summary, so it lists the account's jobs and the poller
keeps the watched ones. Jobs that finished are no longer listed: they are ``GONE``.

Pending reasons: Grid Engine keeps them per job (``qstat -j``'s "scheduling info", when the
scheduler's ``schedd_job_info`` is true). While at least one watched job waits, the same round
runs one more command for all waiting jobs together, ``qstat -j ID,ID,...``, and reads the
reasons from it. A round with no waiting job runs ``qstat`` once. ``calls`` counts both kinds.

Grid Engine's state letters, as phases: ``qw``/``hqw``/``Eqw`` (and anything else with ``q`` or
``w`` that is not being deleted) wait; ``r``, ``t``, ``R``, ``s``, ``S``, ``T`` (running,
transferring, restarted, suspended) run; a waiting job being deleted (``dqw``) is finished.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import datetime

from .job_poller import JobInfo, JobPoller, JobQueryError, Phase
from .remote import CommandRunner, RunnerError

__all__ = ["GridEngineJobPoller", "ge_phase", "parse_qstat_xml", "parse_qstat_j_reasons"]

_log = logging.getLogger(__name__)


def ge_phase(state: str) -> Phase:
    """A Grid Engine state (``qw``, ``hqw``, ``r``, ``dr``, ``Eqw``, ...) as a phase."""
    if any(c in state for c in "rtRsST"):
        return "running"  # processes exist (also while being deleted: 'dr')
    if "d" in state:
        return "finished"  # deleted before it ran
    if "q" in state or "w" in state or "h" in state:
        return "pending"
    return "unknown"


def _reason_from_state(state: str) -> str | None:
    if "E" in state:
        return "error state (see qstat -j)"
    if "h" in state:
        return "on hold"
    return None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def parse_qstat_xml(output: str, seen_at: float = 0.0) -> dict[str, JobInfo]:
    """``{job_id: JobInfo}`` from ``qstat -xml`` (running and waiting jobs). ``node`` is the host
    of the queue instance (``all.q@node1`` -> ``node1``); waiting jobs carry a reason only when
    their state tells one (hold, error): :func:`parse_qstat_j_reasons` has the scheduler's."""
    try:
        root = ET.fromstring(output)
    except ET.ParseError as e:
        raise JobQueryError(f"qstat -xml printed no valid XML: {e}") from None
    jobs: dict[str, JobInfo] = {}
    for el in root.iter("job_list"):
        job_id = (el.findtext("JB_job_number") or "").strip()
        state = (el.findtext("state") or "").strip()
        if not job_id.isdigit():
            continue
        queue = (el.findtext("queue_name") or "").strip()
        node = queue.split("@", 1)[1] if "@" in queue else None
        phase = ge_phase(state)
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state or "UNKNOWN",
            reason=_reason_from_state(state) if phase == "pending" else None,
            node=node if phase == "running" else None,
            start_time=_parse_time(el.findtext("JAT_start_time")),
            seen_at=seen_at,
            phase=phase,
        )
    return jobs


_JOB_NUMBER = re.compile(r"^job_number:\s+(\d+)\s*$")
_FIELD = re.compile(r"^[a-z_]+(?:\s[a-z]+)?:\s")


def parse_qstat_j_reasons(output: str) -> dict[str, str]:
    """``{job_id: reason}`` from ``qstat -j ID,...``: each job's "scheduling info" lines (and
    "error reason" of a job in error state), joined with "; ". Jobs without any are left out."""
    reasons: dict[str, list[str]] = {}
    current = ""
    in_info = False
    for line in output.splitlines():
        m = _JOB_NUMBER.match(line)
        if m:
            current, in_info = m.group(1), False
            continue
        if not current:
            continue
        if line.startswith("scheduling info:") or line.startswith("error reason"):
            in_info = True
            text = line.split(":", 1)[1].strip()
        elif in_info and line[:1].isspace():
            text = line.strip()
        else:
            in_info = in_info and not (_FIELD.match(line) or line.startswith("="))
            continue
        if text and "turned off" not in text:
            reasons.setdefault(current, []).append(text)
    return {job_id: "; ".join(lines)[:300] for job_id, lines in reasons.items()}


class GridEngineJobPoller(JobPoller):
    """The shared poller on ``qstat`` (see the module docstring and :mod:`hub_plugin.job_poller`).

    :param runner: object with ``async run(argv, input=None, env=None)``; default LocalRunner.
    :param interval: seconds between periodic queries (while something is watched).
    :param user: whose jobs ``qstat -u`` lists: the submitting account, or ``*``.
    :param qstat: path of the qstat command on the machine the runner reaches.
    :param reasons: also read pending reasons with ``qstat -j`` (see the module docstring).
    :param timeout: seconds one qstat may take.
    """

    command_name = "qstat"

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        interval: float = 5.0,
        user: str = "*",
        qstat: str = "qstat",
        reasons: bool = True,
        timeout: float = 30.0,
        log: logging.Logger | None = None,
    ):
        super().__init__(runner, interval=interval, timeout=timeout, log=log or _log)
        self.user = user or "*"
        self.qstat = qstat
        self.reasons = reasons

    @property
    def qstat_calls(self) -> int:
        return self.calls

    def argv(self, ids: Iterable[str]) -> list[str]:
        return [self.qstat, "-xml", "-u", self.user]

    def parse(self, exit_status: int, out: str, err: str, seen_at: float) -> dict[str, JobInfo]:
        if exit_status != 0:
            raise JobQueryError(f"qstat exited {exit_status}: {err.strip()[:300]}")
        return parse_qstat_xml(out, seen_at)

    async def _query_once(self) -> None:
        await super()._query_once()
        if not self.reasons:
            return
        waiting = sorted(
            (i for i in self._queried if (info := self._jobs.get(i)) is not None and info.is_pending), key=int
        )
        if not waiting:
            return
        self.calls += 1
        try:
            status, out, _err = await self.runner.run([self.qstat, "-j", ",".join(waiting)], timeout=self.timeout)
        except RunnerError as e:
            self.log.debug("qstat -j could not run: %s", e)
            return
        if status != 0 and not out:
            return  # the jobs left meanwhile: keep what the summary said
        for job_id, reason in parse_qstat_j_reasons(out).items():
            info = self._jobs.get(job_id)
            if info is not None and info.is_pending:
                self._jobs[job_id] = JobInfo(
                    info.job_id, info.state, reason, info.node, info.start_time, info.seen_at, info.phase
                )
