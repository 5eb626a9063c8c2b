"""Admin status page: the broker's live tunnels, as a JupyterHub service (hub OAuth, admins only).

Run by the hub (``c.JupyterHub.services``, see docs/admin.md)::

    c.JupyterHub.services = [{
        "name": "broker-status",
        "url": "http://127.0.0.1:10101",
        "command": [sys.executable, "-m", "hub_plugin.status_service"],
        "oauth_no_confirm": True,
        "environment": {"BROKER_API_URL": "http://127.0.0.1:8091", "BROKER_API_TOKEN": "..."},
    }]

Users reach it at ``/services/broker-status/``. Login is the hub's OAuth
(:class:`jupyterhub.services.auth.HubOAuthenticated`); then only users whose hub model says
``admin`` (``c.Authenticator.admin_users`` or the admin flag), or who belong to one of the
groups in ``BROKER_STATUS_GROUPS`` (comma-separated), see the page; everyone else gets 403.
The table has the columns of ``broker status``, fetched from the broker's REST API on each
request; ``?format=json`` returns the same sessions as JSON.
"""

from __future__ import annotations

import html
import json
import os
import secrets
import sys
import time
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import ioloop, web

from broker.client import BrokerClient, BrokerError
from broker.status import COLUMNS, _cell

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Broker status</title>
<meta http-equiv="refresh" content="{refresh}">
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-family:monospace}} th{{background:#eee}}
.err{{color:#a00}}</style></head>
<body><h1>Live tunnels</h1>
<p>{count} live session(s) at {now} &middot; signed in as {user} &middot; refreshes every {refresh}s
&middot; <a href="?format=json">JSON</a></p>
{body}
</body></html>
"""


def allowed_groups() -> set[str]:
    return {g.strip() for g in os.environ.get("BROKER_STATUS_GROUPS", "").split(",") if g.strip()}


def is_allowed(user: dict) -> bool:
    return bool(user.get("admin")) or bool(allowed_groups() & set(user.get("groups") or []))


def render_rows(sessions: list[dict]) -> str:
    now = time.time()
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(k, s, now))}</td>" for _, k in COLUMNS) + "</tr>" for s in sessions
    )
    if not sessions:
        rows = f'<tr><td colspan="{len(COLUMNS)}">(no live sessions)</td></tr>'
    return f'<table id="sessions"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


class StatusHandler(HubOAuthenticated, web.RequestHandler):
    @web.authenticated
    async def get(self) -> None:
        user = self.current_user
        if not is_allowed(user):
            raise web.HTTPError(403, "broker status is for hub administrators only")
        client: BrokerClient = self.settings["broker_client"]
        error = ""
        try:
            sessions = await client.list_sessions()
        except BrokerError as e:
            sessions, error = [], str(e)
        if self.get_argument("format", "") == "json":
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"sessions": sessions, "error": error or None}, ensure_ascii=False))
            return
        self.set_header("Cache-Control", "no-store")
        body = f'<p class="err">{html.escape(error)}</p>' if error else render_rows(sessions)
        self.finish(
            PAGE.format(
                refresh=int(self.settings["refresh"]),
                count=len(sessions),
                now=time.strftime("%Y-%m-%d %H:%M:%S"),
                user=html.escape(user.get("name", "?")),
                body=body,
            )
        )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc_info = kwargs.get("exc_info")  # (type, value, traceback) when an exception caused it
        error = exc_info[1] if exc_info else None
        if isinstance(error, web.HTTPError) and error.log_message:
            reason = error.log_message
        self.finish(f"<!doctype html><title>{status_code}</title><h1>{status_code}</h1><p>{html.escape(reason)}</p>")


def make_app() -> web.Application:
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/broker-status/")
    url = os.environ.get("BROKER_API_URL", "")
    token = os.environ.get("BROKER_API_TOKEN", "")
    if not url or not token:
        raise SystemExit("broker-status: BROKER_API_URL and BROKER_API_TOKEN must be set in the service's environment")
    return web.Application(
        [
            (prefix, StatusHandler),
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            (prefix.rstrip("/"), web.RedirectHandler, {"url": prefix}),
        ],
        cookie_secret=secrets.token_bytes(32),
        broker_client=BrokerClient(url, token, timeout=10),
        refresh=float(os.environ.get("BROKER_STATUS_REFRESH", "10")),
        xsrf_cookies=False,
    )


def main() -> int:
    service_url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101"))
    app = make_app()
    app.listen(service_url.port or 80, service_url.hostname or "127.0.0.1")
    print(f"broker-status: serving on {service_url.geturl()}", file=sys.stderr, flush=True)
    ioloop.IOLoop.current().start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
