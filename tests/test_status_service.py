"""The admin status page as a real JupyterHub service: real hub OAuth, a real spawned session.

A Stack (CHP + broker + JupyterHub) runs the service from docs/admin.md's config; users log in
through the shared-password form in a cookie-keeping HTTP client, then open
/services/broker-status/ (the hub's OAuth redirects happen for real, through CHP)."""

from __future__ import annotations

import http.cookiejar
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request

import pytest

from devstack.stack import free_port

from e2e import Hub
from harness import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN_PASSWORD = secrets.token_hex(20)

SERVICE_CONFIG = """
import sys
c.Authenticator.admin_users = {{"boss"}}
# SharedPasswordAuthenticator: admins log in with their own (>= 32 characters) password
c.SharedPasswordAuthenticator.admin_password = {admin_password!r}
c.JupyterHub.services.append({{
    "name": "broker-status",
    "url": "http://127.0.0.1:{port}",
    "command": [sys.executable, "-m", "hub_plugin.status_service"],
    "oauth_no_confirm": True,
    "environment": {{"BROKER_API_URL": c.BrokerSpawnerMixin.broker_url,
                     "BROKER_API_TOKEN": os.environ["BROKER_API_TOKEN"],
                     "PYTHONPATH": {repo!r}}},
}})
# let every user through the hub's OAuth, so that the service's own admin check is what refuses
c.JupyterHub.load_roles.append({{"name": "user", "scopes": ["self", "access:services!service=broker-status"]}})
"""


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): the status service from docs/admin.md's config."""
    return dict(
        name="stack",
        logs="status-service-logs",
        poll_interval=2,
        reconcile_interval=1.0,
        extra_hub_config=SERVICE_CONFIG.format(port=free_port(), repo=REPO, admin_password=ADMIN_PASSWORD),
    )


class Browser:
    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str, data: dict | None = None) -> tuple[int, str, str]:
        body = None if data is None else urllib.parse.urlencode(data).encode()
        try:
            with self.opener.open(self.base + path, data=body, timeout=30) as r:
                return r.status, r.read().decode(errors="replace"), r.geturl()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace"), e.geturl()

    def login(self, user: str, password: str) -> None:
        status, page, _ = self.get("/hub/login")
        assert status == 200, page[:500]
        xsrf = re.search(r'name="_xsrf"[^>]*?value="([^"]+)"', page) or re.search(
            r'value="([^"]+)"[^>]*?name="_xsrf"', page
        )
        form = {"username": user, "password": password}
        if xsrf:
            form["_xsrf"] = xsrf.group(1)
        else:  # the token is also the _xsrf cookie
            form["_xsrf"] = next(c.value for c in self.jar if c.name == "_xsrf")
        status, page, url = self.get("/hub/login", form)
        assert status == 200 and "/hub/login" not in urllib.parse.urlparse(url).path, (status, url, page[:500])


def test_admin_sees_live_tunnels_non_admin_gets_403(stack):
    hub = Hub(stack)
    hub.spawn("spawned-user")
    session = hub.session_of("spawned-user")

    admin = Browser(stack.public_url)
    admin.login("boss", ADMIN_PASSWORD)
    status, page, url = admin.get("/services/broker-status/")
    assert status == 200, (status, url, page[:1000])
    assert urllib.parse.urlparse(url).path == "/services/broker-status/"
    table = page[page.index('<table id="sessions">') :]
    row = re.search(r"<tr><td>spawned-user</td>(.*?)</tr>", table)
    assert row, table[:2000]
    cells = re.findall(r"<td>(.*?)</td>", row.group(0))
    assert cells[0] == "spawned-user" and cells[2] == session["job_id"] and cells[4] == str(session["port"])
    assert cells[5] == "ready" and cells[6] == "up"
    assert stack.broker_token not in page
    status, body, _ = admin.get("/services/broker-status/?format=json")
    assert status == 200 and '"spawned-user"' in body

    user = Browser(stack.public_url)
    user.login("pleb", stack.password)
    status, page, url = user.get("/services/broker-status/")
    assert status == 403, (status, url, page[:500])
    assert "administrators only" in page and "spawned-user" not in page
    status, page, _ = user.get("/services/broker-status/?format=json")
    assert status == 403 and "spawned-user" not in page

    anon = Browser(stack.public_url)
    status, page, url = anon.get("/services/broker-status/")
    assert "spawned-user" not in page and "/hub/login" in url  # sent to the hub's login page
    hub.stop("spawned-user")
