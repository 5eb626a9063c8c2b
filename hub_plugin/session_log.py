"""The job's output log through the hub, for the session card's "log" link.

Enable it in ``jupyterhub_config.py`` (a handler inside the hub: it reads the log with the
spawner's own backend, locally or on the login node)::

    import hub_plugin.session_log
    c.JupyterHub.extra_handlers = hub_plugin.session_log.HANDLERS

(JupyterHub logs that ``extra_handlers`` is deprecated; it still works in JupyterHub 5 and 6.)

``GET /hub/session-log/<user>`` (default server) or ``/hub/session-log/<user>/<server>``: a
page with the last :data:`PAGE_LINES` lines of the output of the server's current job, or of
its last ended job; ``?download=1`` returns the log as a file (its last
``job_log_download_max_bytes`` bytes). Deny by default: only the server's owner (a signed-in
user of that name) and whoever holds ``admin:servers`` on that user (hub admins, the admin role,
or a role that grants it for the user or their group) get it; anyone else gets 403, also for a
user or server that does not exist (so names cannot be probed). The page is not cached (``Cache-Control: no-store``).
"""

from __future__ import annotations

from typing import Any

from jupyterhub.handlers.base import BaseHandler
from jupyterhub.user import User
from tornado import web

__all__ = ["HANDLERS", "PAGE_LINES", "SessionLogHandler"]

#: Lines of the log shown on the page.
PAGE_LINES = 200


def _job_of(spawner: Any) -> str:
    """The server's current job, else its last ended job ("" when there is none)."""
    return str(getattr(spawner, "job_id", "") or (getattr(spawner, "ended_job", None) or {}).get("job_id") or "")


class SessionLogHandler(BaseHandler):
    """The log page and download (see the module docstring)."""

    @web.authenticated
    async def get(self, user_name: str, server_name: str | None = None) -> None:
        server_name = server_name or ""
        current = self.current_user
        if current is None:  # pragma: no cover - web.authenticated redirects first
            raise web.HTTPError(403)
        owner = isinstance(current, User) and current.name == user_name
        if not (owner or self.has_scope(f"admin:servers!user={user_name}")):
            raise web.HTTPError(403, "the job log is for the server's owner and hub admins only")
        user = self.find_user(user_name)
        if user is None or server_name not in user.orm_user.orm_spawners:
            raise web.HTTPError(404, "no such server")
        spawner = user.spawners[server_name]
        job_id = _job_of(spawner)
        read = getattr(spawner, "read_job_output", None)
        if not job_id or read is None:
            raise web.HTTPError(404, "this server has no batch job log")
        self.set_header("Cache-Control", "no-store")
        if self.get_argument("download", ""):
            text = await read(job_id, max_bytes=int(getattr(spawner, "job_log_download_max_bytes", 20 * 2**20)))
            if text is None:
                raise web.HTTPError(404, f"the output of job {job_id} cannot be read")
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Content-Disposition", f'attachment; filename="job-{job_id}.log"')
            self.finish(text)
            return
        text = await read(job_id, max_lines=PAGE_LINES)
        html = await self.render_template(
            "session_log.html",
            owner=user_name,
            server_name=server_name,
            job_id=job_id,
            lines=PAGE_LINES,
            log_text=text,
        )
        self.finish(html)


#: For ``c.JupyterHub.extra_handlers`` (paths under the hub's prefix, ``/hub/``).
HANDLERS = [(r"/session-log/([^/]+)(?:/([^/]*))?/?", SessionLogHandler)]
