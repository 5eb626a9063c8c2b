"""The hub-API relay filter on real connections (wire/hubapi.py, wire/hubrelay.py).

Two layers:

- *Component*: an in-process broker (real asyncssh server) and real asyncssh clients that behave
  like an agent, or like a hostile agent that skips its node-local relay. Behind the broker's
  hub-API address is a small aiohttp HTTP server that records every request it receives and
  answers it with JSON: it stands in for the hub so the test can see exactly what got through
  (which headers, how many requests, which bodies). The agent's relay is
  :class:`wire.hubrelay.FilteredRelay`, the class ``node-agent run`` uses, attached to a real
  enrolled SSH connection.
- *End to end*: the project's :class:`devstack.stack.Stack` (real JupyterHub, real
  configurable-http-proxy, ``broker serve``, a real ``node-agent run`` in a local batch job and a
  real jupyterhub-singleuser) with ``RemoteUserAuthenticator`` set up the way
  ``examples/shibboleth/`` does it (the "SP" is 127.0.0.2). The forged Shibboleth login is sent
  from inside a notebook (code run in the user's kernel, through the node-local relay), and over a
  raw SSH channel to the broker; as a control, the same request sent straight to the hub's port
  does log in. The single-user server's own hub-API calls (activity, OAuth token exchange, user
  model) still work through the filtered relay.
"""

from __future__ import annotations

import ast
import asyncio
import datetime
import http.client
import json
import os
import time
from http.cookies import SimpleCookie

import asyncssh
import pytest
import pytest_asyncio
import requests
from aiohttp import web

from broker.core import Broker
from broker.store import SessionStore
from devstack.stack import Stack
from wire.hubapi import HubApiPolicy
from wire.hubrelay import FilteredRelay
from wire.tunnel import Tunnel

from e2e import Hub, request
from harness import Harness, running_stack, tool_path, wait_until

FORGED = {"X-Forwarded-For": "127.0.0.2", "X-Remote-User": "boss@uni.example"}
SP_ADDR = "127.0.0.2"


def http_request(
    path: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes = b"", extra: str = ""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: hub"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + body


async def read_response(reader, timeout: float = 15) -> tuple[int, dict[str, list[str]], bytes]:
    """One HTTP response with a Content-Length body (what aiohttp, the hub and the relay send)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    n = int(headers.get("content-length", ["0"])[0])
    body = await asyncio.wait_for(reader.readexactly(n), timeout)
    return int(lines[0].split()[1]), headers, body


async def at_eof(reader, timeout: float = 10) -> bool:
    return await asyncio.wait_for(reader.read(), timeout) == b""


# ============================================================================================
# component layer: in-process broker, raw asyncssh clients, a recording HTTP server as the hub
# ============================================================================================
class RecordingHub:
    """A real HTTP server (aiohttp) in the hub API's place that records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.raw_path,
            "body": len(body),
            "headers": [k for k, _ in request.raw_headers],
        }
        self.seen.append(seen)
        return web.json_response({**seen, "headers": [h.decode("latin-1") for h in seen["headers"]]})

    async def start(self) -> RecordingHub:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def header_names(self) -> set[str]:
        return {h.decode("latin-1").lower() for s in self.seen for h in s["headers"]}


@pytest_asyncio.fixture
async def relay_env(tmp_path):
    """Factory: a recording hub and an in-process broker with the given hub-API policy."""
    made = []

    async def make(**policy_kw) -> tuple[Harness, RecordingHub]:
        hub = await RecordingHub().start()
        store = SessionStore(str(tmp_path / f"b{len(made)}.sqlite"))
        broker = Broker(
            store=store,
            host_key=asyncssh.generate_private_key("ssh-ed25519"),
            hub_api=("127.0.0.1", hub.port),
            chp=None,
            keepalive_interval=0,
            login_timeout=10,
            **{f"hub_api_{k}": v for k, v in policy_kw.items()},
        )
        await broker.start()
        h = Harness(broker, str(tmp_path))
        h.servers = []
        made.append((h, hub, store))
        return h, hub

    yield make
    for h, hub, store in made:
        await h.broker.stop()
        await hub.stop()
        store.close()


async def _enrolled(h: Harness, user: str = "zoe"):
    session, secret = await h.session(user)
    conn, key = await h.enrol(session.id, secret)
    return session, conn, key


STRIPPED = {
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
    "x-remote-user",
    "remote-user",
    "remote_user",
    "eppn",
}
FORGED_ALL = {
    "X-Forwarded-For": "127.0.0.2",
    "X-Forwarded-Proto": "https",
    "Forwarded": "for=127.0.0.2",
    "X-Real-Ip": "127.0.0.2",
    "X-Remote-User": "boss@uni.example",
    "REMOTE_USER": "boss",
    "eppn": "boss@uni.example",
    "Authorization": "token kept",
}


@pytest.mark.asyncio
async def test_broker_channel_keep_alive_chunked_and_stripped_headers(relay_env):
    h, hub = await relay_env(rate=0)
    _, conn, _ = await _enrolled(h)
    reader, writer = await conn.open_connection("127.0.0.1", hub.port)
    chunked = (
        b"POST /hub/api/users/zoe/activity HTTP/1.1\r\nHost: hub\r\nTransfer-Encoding: chunked\r\n"
        b"X-Remote-User: boss\r\n\r\n" + b'4\r\n{"a"\r\n' + b"3\r\n:1}\r\n" + b"0\r\n\r\n"
    )
    # three pipelined requests on one channel, sent in awkward pieces
    stream = http_request("/hub/api/user", FORGED_ALL) + chunked + http_request("/hub/api/", {"X-Real-Ip": "1.1.1.1"})
    for i in range(0, len(stream), 7):
        writer.write(stream[i : i + 7])
        await asyncio.sleep(0)
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [json.loads(a[2])["path"] for a in answers] == ["/hub/api/user", "/hub/api/users/zoe/activity", "/hub/api/"]
    assert json.loads(answers[1][2])["body"] == 7  # the chunked body arrived whole
    assert "authorization" in hub.header_names() and not (hub.header_names() & STRIPPED)
    # the same channel, a fourth request: the forged login
    writer.write(http_request("/hub/login?next=/hub/admin", FORGED))
    status, headers, body = await read_response(reader)
    assert status == 403 and "set-cookie" not in headers and b"hub API" in body
    assert await at_eof(reader)  # and the channel is closed
    assert len(hub.seen) == 3  # the refused request never reached the hub
    conn.close()


REFUSED = [
    ("forged login", http_request("/hub/login?next=/hub/admin", FORGED), 403),
    ("login", http_request("/hub/login"), 403),
    ("admin", http_request("/hub/admin"), 403),
    ("home", http_request("/hub/home"), 403),
    ("traversal", http_request("/hub/api/%2e%2e/login", FORGED), 403),
    ("absolute-form", http_request("http://127.0.0.1:8081/hub/login", FORGED), 403),
    ("websocket", http_request("/hub/api/events", {"Upgrade": "websocket", "Connection": "Upgrade"}), 403),
    ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n", 400),
    ("smuggling", http_request("/hub/api/user", extra="Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"), 400),
]


@pytest.mark.asyncio
async def test_hostile_agent_skipping_the_relay_gets_the_same_answers(relay_env):
    h, hub = await relay_env()
    _, conn, _ = await _enrolled(h)
    for what, data, code in REFUSED:
        reader, writer = await conn.open_connection("127.0.0.1", hub.port)
        writer.write(data)
        status, headers, _ = await read_response(reader)
        assert status == code and "set-cookie" not in headers, what
        assert await at_eof(reader), what
    assert hub.seen == []  # nothing reached the hub
    # bad input closed only those channels: the connection still carries API calls
    reader, writer = await conn.open_connection("127.0.0.1", hub.port)
    writer.write(http_request("/hub/api/"))
    assert (await read_response(reader))[0] == 200
    conn.close()


@pytest.mark.asyncio
async def test_malformed_input_closes_only_that_channel(relay_env):
    h, hub = await relay_env(rate=0)
    _, conn, _ = await _enrolled(h)
    ok_reader, ok_writer = await conn.open_connection("127.0.0.1", hub.port)
    ok_writer.write(http_request("/hub/api/a"))
    assert (await read_response(ok_reader))[0] == 200
    bad_reader, bad_writer = await conn.open_connection("127.0.0.1", hub.port)
    bad_writer.write(b"GET /hub/api/user HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 40000)
    assert (await read_response(bad_reader))[0] == 431
    assert await at_eof(bad_reader)
    ok_writer.write(http_request("/hub/api/b"))  # the other channel on the same connection, kept alive
    assert (await read_response(ok_reader))[0] == 200
    assert [s["path"] for s in hub.seen] == ["/hub/api/a", "/hub/api/b"]
    conn.close()


@pytest.mark.asyncio
async def test_body_cap(relay_env):
    h, hub = await relay_env(max_body=100_000, rate=0)
    _, conn, _ = await _enrolled(h)
    reader, writer = await conn.open_connection("127.0.0.1", hub.port)
    writer.write(http_request("/hub/api/users", method="POST", body=b"x" * 100_000))
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["body"] == 100_000
    writer.write(http_request("/hub/api/users", method="POST", body=b"x" * 100_001))
    assert (await read_response(reader))[0] == 413
    assert len(hub.seen) == 1  # the oversized one was refused on its head
    # chunked: refused once the sizes add up past the cap; the hub gets no complete request
    reader, writer = await conn.open_connection("127.0.0.1", hub.port)
    writer.write(http_request("/hub/api/users", {"Transfer-Encoding": "chunked"}, "POST"))
    writer.write(b"c350\r\n" + b"y" * 50_000 + b"\r\n")
    writer.write(b"c351\r\n" + b"y" * 50_001 + b"\r\n0\r\n\r\n")
    assert (await read_response(reader))[0] == 413
    assert await at_eof(reader)
    await asyncio.sleep(0.2)
    assert len(hub.seen) == 1
    conn.close()


@pytest.mark.asyncio
async def test_rate_cap_is_per_session_across_channels_and_reconnects(relay_env):
    h, hub = await relay_env(rate=0.2, burst=4)
    session, conn, key = await _enrolled(h)
    for _ in range(2):
        reader, writer = await conn.open_connection("127.0.0.1", hub.port)
        writer.write(http_request("/hub/api/"))
        assert (await read_response(reader))[0] == 200
    conn.close()
    again = await h.reconnect(session.id, key)  # a new connection of the same session
    reader, writer = await again.open_connection("127.0.0.1", hub.port)
    writer.write(http_request("/hub/api/") * 2)
    assert [(await read_response(reader))[0] for _ in range(2)] == [200, 200]
    writer.write(http_request("/hub/api/"))
    status, headers, _ = await read_response(reader)
    assert status == 429 and int(headers["retry-after"][0]) >= 1
    assert len(hub.seen) == 4
    _, other_conn, _ = await _enrolled(h, "50fia")  # another session has its own bucket
    reader, writer = await other_conn.open_connection("127.0.0.1", hub.port)
    writer.write(http_request("/hub/api/"))
    assert (await read_response(reader))[0] == 200
    again.close()
    other_conn.close()


@pytest.mark.asyncio
async def test_agent_relay_refuses_on_the_node_and_passes_the_api(relay_env):
    """The agent's node-local relay (FilteredRelay, what ``node-agent run`` uses) over a real SSH
    connection: refusals are answered on the node — the broker's token bucket shows that no
    request head reached the broker — and allowed calls go through both filters."""
    h, hub = await relay_env(max_body=1000, rate=1.0, burst=50)
    session, conn, _ = await _enrolled(h)
    refused = []
    relay = FilteredRelay("hub-api", HubApiPolicy(max_body=0, rate=0), refused.append, wait_timeout=5)
    await relay.start(0)
    relay.attach(Tunnel(conn, "127.0.0.1", hub.port))  # type: ignore[arg-type]
    try:
        for what, data, code in REFUSED:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(data)
            status, headers, _ = await read_response(reader)
            assert status == code and "set-cookie" not in headers, what
            assert await at_eof(reader), what
            writer.close()
        assert [d.status for d in refused] == [c for _, _, c in REFUSED]
        assert hub.seen == []
        bucket = h.broker.hub_api_rates.bucket(session.id)
        assert bucket is not None and bucket.tokens > 49  # no request head reached the broker's filter
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(http_request("/hub/api/user", FORGED_ALL) + http_request("/hub/api/"))
        assert [(await read_response(reader))[0] for _ in range(2)] == [200, 200]
        assert not (hub.header_names() & STRIPPED)
        # the body cap is the broker's: its 413 comes back through the relay
        writer.write(http_request("/hub/api/users", method="POST", body=b"z" * 1001))
        assert (await read_response(reader))[0] == 413
        assert await at_eof(reader)
        writer.close()
        assert len(hub.seen) == 2
    finally:
        await relay.close()
        conn.close()


# ============================================================================================
# end to end: real JupyterHub with the header authenticator, CHP, broker serve, node-agent run
# ============================================================================================
SHIB_CONFIG = (
    "c.JupyterHub.authenticator_class = 'hub_plugin.auth_header.RemoteUserAuthenticator'\n"
    "c.RemoteUserAuthenticator.header_name = 'X-Remote-User'\n"
    f"c.RemoteUserAuthenticator.trusted_proxies = ['{SP_ADDR}/32']\n"
    "c.RemoteUserAuthenticator.identity_regex = r'(?P<username>[a-z0-9][a-z0-9._-]*)@uni\\.example'\n"
    "c.Authenticator.admin_users = {'boss'}\n"
    "c.Spawner.environment = {'NODE_AGENT_HEARTBEAT': '5', 'JUPYTERHUB_ACTIVITY_INTERVAL': '2'}\n"
    # the job's node-agent runs the code under test also when it comes from PYTHONPATH (JupyterHub 6
    # no longer passes PYTHONPATH to spawners)
    "if os.environ.get('PYTHONPATH'):\n"
    "    c.Spawner.environment['PYTHONPATH'] = os.environ['PYTHONPATH']\n"
)
USER = "alice"


@pytest.fixture(scope="module")
def shib_stack(tmp_path_factory):
    with running_stack(
        str(tmp_path_factory.mktemp("hubapi") / "stack"),
        path=tool_path(),
        logs="hubapi-relay-logs",
        extra_hub_config=SHIB_CONFIG,
        poll_interval=2,
    ) as s:
        Hub(s).spawn(USER)
        yield s


def _server_env(stack: Stack) -> dict[str, str]:
    hub = Hub(stack)
    pid = hub.server_pid(hub.session_of(USER)["job_id"])
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def _direct_to_hub(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.hub_port, timeout=30)
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    r.read()
    jar = SimpleCookie()
    for v in r.headers.get_all("Set-Cookie") or []:
        jar.load(v)
    conn.close()
    return r.status, {k: m.value for k, m in jar.items()}


PROBES = [
    ("/hub/login?next=/hub/api/user", True),
    ("/hub/login", True),
    ("/hub/login", False),
    ("/hub/admin", False),
    ("/hub/home", False),
    ("/hub/api/../login", True),
    ("/hub/api/%2e%2e/login?next=/hub/admin", True),
]


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_control_the_forged_login_works_when_sent_straight_to_the_hub(shib_stack):
    """What the relay must prevent: from the broker's address (loopback) a forged X-Forwarded-For
    names the SP, and the hub logs in an admin from X-Remote-User."""
    status, cookies = _direct_to_hub(shib_stack, "/hub/login?next=/hub/api/user", FORGED)
    assert status == 302 and "jupyterhub-hub-login" in cookies
    conn = http.client.HTTPConnection("127.0.0.1", shib_stack.public_port, timeout=30)
    conn.request("GET", "/hub/api/user", headers={"Cookie": f"jupyterhub-hub-login={cookies['jupyterhub-hub-login']}"})
    model = json.loads(conn.getresponse().read())
    assert model["name"] == "boss" and model["admin"] is True


KERNEL_PROBE = r"""
import http.client as _hc, json as _json, os as _os, urllib.parse as _up
def _probe(probes, forged):
    u = _up.urlsplit(_os.environ["JUPYTERHUB_API_URL"])
    out = []
    for path, forge in probes:
        c = _hc.HTTPConnection(u.hostname, u.port, timeout=20)
        c.request("GET", path, headers=forged if forge else {})
        r = c.getresponse()
        r.read()
        out.append([path, r.status, r.getheader("Set-Cookie")])
        c.close()
    c = _hc.HTTPConnection(u.hostname, u.port, timeout=20)
    c.request("GET", u.path + "/user", headers={"Authorization": "token " + _os.environ["JUPYTERHUB_API_TOKEN"]})
    r = c.getresponse()
    out.append(["user model", r.status, _json.loads(r.read()).get("name")])
    return _json.dumps({"relay": _os.environ["JUPYTERHUB_API_URL"], "results": out})
_probe(%r, %r)
"""


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_forged_login_from_inside_a_notebook_is_refused_by_the_node_local_relay(shib_stack):
    hub = Hub(shib_stack)
    _, text = hub.run_code(USER, KERNEL_PROBE % (PROBES, FORGED))
    out = json.loads(ast.literal_eval(text))
    assert out["relay"].startswith("http://127.0.0.1:") and f":{shib_stack.hub_port}/" not in out["relay"]
    *pages, user_model = out["results"]
    assert [(p, s, c) for p, s, c in pages] == [(p, 403, None) for p, _ in PROBES]
    assert user_model == ["user model", 200, USER]  # the server's own token still works through the relay
    # refused on the node (the agent's log, in the job output), not by the broker
    job = hub.session_of(USER)["job_id"]
    with open(os.path.join(hub.job_dir(job), "output.log"), errors="replace") as f:
        assert f.read().count("hub API request refused on the node") >= len(PROBES)
    assert "hub API request refused" not in shib_stack.log_text("broker")


async def _raw_channel(stack: Stack, probes: list[tuple[str, dict[str, str]]]) -> list[tuple[int, list[str], bytes]]:
    """Enrol a session of our own with the broker, then talk to the hub API over a raw SSH
    direct channel, skipping any node-local relay (what a hostile agent would do)."""
    status, sess = request(
        stack.broker_url + "/api/sessions",
        stack.broker_token,
        "POST",
        {"user": "mallory", "server_name": "", "routespec": "/user/mallory/"},
        scheme="Bearer",
    )
    assert status == 201, sess
    key = asyncssh.generate_private_key("ssh-ed25519")
    pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
    conn = await asyncssh.connect(
        sess["ssh"]["host"],
        sess["ssh"]["port"],
        username=sess["id"],
        password=f"enrol {sess['secret']} {pub}",
        known_hosts=([asyncssh.import_public_key(sess["ssh"]["host_key"])], [], []),
        client_keys=None,
        preferred_auth="password",
        agent_path=None,
        config=None,
    )
    out = []
    try:
        for path, headers in probes:
            reader, writer = await conn.open_connection("127.0.0.1", stack.hub_port)
            writer.write(http_request(path, headers))
            code, hdrs, body = await read_response(reader)
            out.append((code, hdrs.get("set-cookie", []), body))
            writer.close()
    finally:
        conn.close()
        request(stack.broker_url + f"/api/sessions/{sess['id']}", stack.broker_token, "DELETE", scheme="Bearer")
    return out


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_forged_login_over_a_raw_channel_is_refused_by_the_broker(shib_stack):
    token = _server_env(shib_stack)["JUPYTERHUB_API_TOKEN"]
    probes = [(p, FORGED if forge else {}) for p, forge in PROBES]
    probes += [("/hub/api/", {}), ("/hub/api/user", {"Authorization": f"token {token}", **FORGED})]
    results = asyncio.run(_raw_channel(shib_stack, probes))
    for (path, _), (code, cookies, _) in zip(probes[: len(PROBES)], results, strict=False):
        assert (path, code, cookies) == (path, 403, [])
    version, user_model = results[len(PROBES) :]
    assert version[0] == 200 and "version" in json.loads(version[2])
    assert user_model[0] == 200 and json.loads(user_model[2])["name"] == USER
    assert shib_stack.log_text("broker").count("hub API request refused") >= len(PROBES)


def _server_last_activity(hub: Hub) -> datetime.datetime:
    _, info = hub.api(hub.user_path(USER))
    return datetime.datetime.fromisoformat(info["servers"][""]["last_activity"].replace("Z", "+00:00"))


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_single_user_server_activity_reports_pass_the_relay(shib_stack):
    hub = Hub(shib_stack)
    before = _server_last_activity(hub)
    time.sleep(1.0)
    mark = datetime.datetime.now(datetime.timezone.utc)
    hub.run_code(USER, "2+2")  # kernel activity; the server reports it every 2 s through the relay
    after = wait_until(
        lambda: (t := _server_last_activity(hub)) >= mark and t,
        30,
        0.5,
        what="the hub's last_activity of the server to advance",
    )
    assert after > before
    # it came from the server's activity report (the hub does not poll CHP during this test)
    assert f"200 POST /hub/api/users/{USER}/activity ({USER}@127.0.0.1)" in shib_stack.log_text("hub")


class _FromSP(requests.adapters.HTTPAdapter):
    """Connects from the SP's address, as every browser request through the front end does."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (SP_ADDR, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_single_user_oauth_login_passes_the_relay(shib_stack):
    """A browser through the "SP" opens the user's server: the server redirects to the hub's OAuth
    authorize (through CHP), the hub logs the user in from the header, and the server then
    exchanges the code for a token and fetches the user model — both through the filtered relay."""
    browser = requests.Session()
    browser.mount("http://", _FromSP())
    browser.headers["X-Remote-User"] = f"{USER}@uni.example"  # what the SP adds to every request
    r = browser.get(f"{shib_stack.public_url}/user/{USER}/lab", timeout=60)
    assert r.status_code == 200, (r.status_code, r.url, r.text[:300])
    assert r.url.endswith(f"/user/{USER}/lab")
    hops = [h.url for h in r.history]
    assert any("/hub/api/oauth2/authorize" in u for u in hops) and any("/oauth_callback" in u for u in hops), hops
    assert browser.get(f"{shib_stack.public_url}/user/{USER}/api/status", timeout=30).status_code == 200
    # the server's token request came from the broker's address (the relay), not through CHP
    assert f"200 POST /hub/api/oauth2/token ({USER}@127.0.0.1)" in shib_stack.log_text("hub")
