"""The single-user server's side of JupyterLab's time-left extension (``labextension/``).

A jupyter_server extension, enabled by the file the wheel installs in
``etc/jupyter/jupyter_server_config.d/`` (``jupyterhub-hpc-timeleft.json``). It adds one
authenticated endpoint, ``GET <base_url>api/hpc/timeleft``, answering JSON::

    {"end": 1790000000 | null, "now": 1789990000.5, "warning": null | {"message": "...", "at": 1789999700.0}}

* ``end``: when the batch job's time runs out (epoch seconds). From Slurm when the server runs in
  a Slurm job and ``squeue`` answers (so ``scontrol update TimeLimit=`` is seen; asked at most every
  :data:`SQUEUE_EVERY` seconds), else from ``JUPYTERHUB_WALLTIME_END`` (exported by the batch
  script's prologue, see :mod:`hub_plugin.walltime`). ``null`` outside a batch job or without a
  time limit: the extension then shows nothing.
* ``warning``: the notice the node agent wrote when the walltime warning arrived (SIGUSR1, Slurm's
  ``--signal``) to the file named by ``JUPYTERHUB_WALLTIME_NOTICE_FILE``; ``null`` before that.
* ``now``: the server's clock, so the browser counts down from the server's time.

This module imports jupyter_server only when the server loads it; the agent never imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime
from typing import Any

NOTICE_VAR = "JUPYTERHUB_WALLTIME_NOTICE_FILE"  # = node_agent.agent.WALLTIME_NOTICE_VAR
END_VAR = "JUPYTERHUB_WALLTIME_END"
SQUEUE_EVERY = 30.0
ROUTE = "api/hpc/timeleft"


def end_from_env(env: dict[str, str] | os._Environ[str]) -> float | None:
    """``JUPYTERHUB_WALLTIME_END`` as epoch seconds (None when unset or not a number)."""
    try:
        end = float(env.get(END_VAR, "") or 0)
    except ValueError:
        return None
    return end if end > 0 else None


def parse_squeue_end(text: str) -> float | None:
    """``squeue -o %e`` output (local ISO time, or ``N/A``/``NONE`` without a limit) as epoch seconds."""
    text = text.strip()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def read_notice(path: str) -> dict[str, Any] | None:
    """The agent's walltime notice, or None when there is none (yet) or it is unreadable."""
    if not path:
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {"message": str(data.get("message", ""))[:200], "at": float(data.get("at") or 0)}


class JobEnd:
    """When the job ends: Slurm's answer (cached), else the environment's."""

    def __init__(self, env: dict[str, str] | os._Environ[str]) -> None:
        self.env_end = end_from_env(env)
        self.job_id = env.get("SLURM_JOB_ID", "")
        self._squeue_end: float | None = None
        self._asked = 0.0
        self._squeue_works = bool(self.job_id)

    async def _ask_squeue(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "squeue",
                "-h",
                "-j",
                self.job_id,
                "-o",
                "%e",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            self._squeue_works = False  # e.g. no Slurm client in the container
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return
        if proc.returncode == 0:
            self._squeue_end = parse_squeue_end(out.decode(errors="replace"))

    async def get(self) -> float | None:
        if self._squeue_works and time.monotonic() - self._asked >= SQUEUE_EVERY:
            self._asked = time.monotonic()
            await self._ask_squeue()
        return self._squeue_end or self.env_end


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "lab_timeleft"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.base.handlers import APIHandler
    from jupyter_server.utils import url_path_join
    from tornado import web

    job_end = JobEnd(os.environ)
    notice_file = os.environ.get(NOTICE_VAR, "")

    class TimeLeftHandler(APIHandler):
        @web.authenticated
        async def get(self) -> None:
            self.set_header("Cache-Control", "no-store")
            self.finish(
                json.dumps({"end": await job_end.get(), "now": time.time(), "warning": read_notice(notice_file)})
            )

    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], ROUTE)
    web_app.add_handlers(".*$", [(route, TimeLeftHandler)])
    serverapp.log.info("hpc time left: %s (job end %s)", route, job_end.env_end or "unknown")
