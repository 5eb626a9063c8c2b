"""The broker's REST API: a real aiohttp server around a real Broker (no CHP)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time

import aiohttp
import asyncssh
import pytest
import pytest_asyncio
from aiohttp import web

from broker.api import MAX_BODY, BrokerAPI
from broker.core import Broker
from broker.store import SessionStore

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Env:
    def __init__(self, broker: Broker, api: BrokerAPI, url: str, http: aiohttp.ClientSession, db_path: str):
        self.broker, self.api, self.url, self.http, self.db_path = broker, api, url, http, db_path

    async def req(self, method: str, path: str, *, headers=None, auth=True, **kw):
        h = dict(AUTH if auth else {})
        h.update(headers or {})
        async with self.http.request(method, self.url + path, headers=h, **kw) as r:
            text = await r.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            return r.status, data, r

    async def create(self, user="zoe", server_name="", routespec=None):
        status, data, _ = await self.req(
            "POST",
            "/api/sessions",
            json={"user": user, "server_name": server_name, "routespec": routespec or f"/user/{user}/"},
        )
        assert status == 201, data
        return data


@pytest_asyncio.fixture
async def env(tmp_path):
    db_path = str(tmp_path / "state" / "broker.sqlite")
    store = SessionStore(db_path)
    broker = Broker(
        store=store,
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        hub_api=("127.0.0.1", 1),
        chp=None,
        ssh_listen=("127.0.0.1", 0),
        ssh_public_host="broker.example.org",
    )
    await broker.start()
    api = BrokerAPI(broker, TOKEN, "broker.example.org")
    runner = web.AppRunner(api.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    http = aiohttp.ClientSession()
    try:
        yield Env(broker, api, f"http://127.0.0.1:{port}", http, db_path)
    finally:
        await http.close()
        await runner.cleanup()
        await broker.stop()
        store.close()


async def accepting(port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return True


# -- authentication on every route --------------------------------------------------------


def all_routes(api: BrokerAPI) -> list[tuple[str, str]]:
    out = []
    for route in api.app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        path = re.sub(r"\{[^}]+\}", "someid", path)
        out.append((route.method, path))
    return out


BAD_AUTH = {
    "none": {},
    "wrong token": {"Authorization": "Bearer wrong-token-0123456789abcdef"},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token plus": {"Authorization": f"Bearer {TOKEN}x"},
    "wrong scheme": {"Authorization": f"Basic {TOKEN}"},
    "no scheme": {"Authorization": TOKEN},
    "empty bearer": {"Authorization": "Bearer "},
    "bare bearer": {"Authorization": "Bearer"},
    "token as scheme": {"Authorization": f"{TOKEN} Bearer"},
}


@pytest.mark.asyncio
async def test_every_route_requires_the_token(env):
    routes = all_routes(env.api)
    methods = {m for m, _ in routes}
    assert {"POST", "GET", "PATCH", "DELETE"} <= methods
    assert len(routes) >= 7
    sid = (await env.create())["id"]
    n_before = len(env.broker.store.list(live_only=False))
    for method, path in routes:
        path = path.replace("someid", sid)
        for name, headers in BAD_AUTH.items():
            status, data, _ = await env.req(
                method,
                path,
                auth=False,
                headers=headers,
                data=json.dumps({"user": "x", "routespec": "/x", "job_id": "1"}),
            )
            assert status == 401, (method, path, name, status, data)
            if method != "HEAD":
                assert data == {"error": "authentication required"}, (method, path, name)
    # nothing changed through unauthenticated requests
    assert len(env.broker.store.list(live_only=False)) == n_before
    s = env.broker.store.get(sid)
    assert s.state == "registered" and s.job_id == ""
    # and the right token works, in both accepted schemes
    for hdr in (f"Bearer {TOKEN}", f"token {TOKEN}", f"bearer {TOKEN}"):
        status, data, _ = await env.req("GET", "/api/health", auth=False, headers={"Authorization": hdr})
        assert status == 200 and data["ok"] is True


@pytest.mark.asyncio
async def test_unknown_route_without_token_is_401_with_token_404_json(env):
    status, _, _ = await env.req("GET", "/api/nope", auth=False)
    assert status == 401
    status, data, r = await env.req("GET", "/api/nope")
    assert status == 404 and "error" in data
    assert r.content_type == "application/json"


# -- create ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_session(env):
    data = await env.create("zoe", "gpu", "/user/zoe/gpu/")
    assert re.fullmatch(r"[0-9a-f]{24}", data["id"])
    secret = data["secret"]
    assert isinstance(secret, str) and len(secret) >= 40
    assert data["user"] == "zoe" and data["server_name"] == "gpu" and data["routespec"] == "/user/zoe/gpu/"
    assert data["state"] == "registered"
    assert isinstance(data["port"], int) and 0 < data["port"] < 65536
    assert data["target"] == f"http://127.0.0.1:{data['port']}"
    assert "secret_hash" not in data and "agent_key" not in data
    ssh = data["ssh"]
    assert ssh["host"] == "broker.example.org"
    assert ssh["port"] == env.broker.ssh_port and ssh["port"] > 0
    assert ssh["host_key"].startswith("ssh-ed25519 ") and len(ssh["host_key"].split()) == 2
    assert ssh["fingerprint"] == env.broker.host_key.get_fingerprint("sha256")
    assert ssh["fingerprint"].startswith("SHA256:")
    # the SSH port is really the broker's SSH server
    r, w = await asyncio.open_connection("127.0.0.1", ssh["port"])
    banner = await asyncio.wait_for(r.readline(), 5)
    w.close()
    assert banner.startswith(b"SSH-2.0-")

    # the secret is not retrievable afterwards
    status, got, _ = await env.req("GET", f"/api/sessions/{data['id']}")
    assert status == 200 and "secret" not in got and secret not in json.dumps(got)

    # only the hash is stored: the secret text is nowhere in the database files
    env.broker.store._db.execute("PRAGMA wal_checkpoint(FULL)")
    files = [env.db_path + s for s in ("", "-wal", "-shm") if os.path.exists(env.db_path + s)]
    assert files
    for f in files:
        with open(f, "rb") as fh:
            blob = fh.read()
        assert secret.encode() not in blob, f
    from broker.secrets import hash_secret

    assert env.broker.store.get(data["id"]).secret_hash == hash_secret(secret)


@pytest.mark.asyncio
async def test_created_port_listens_on_loopback(env):
    data = await env.create()
    port = data["port"]
    assert await accepting(port)
    assert port in env.broker.store.live_ports()
    # loopback only: no other local address answers on it
    s = socket.socket()
    s.settimeout(1)
    try:
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            assert s.connect_ex((other, port)) != 0
    finally:
        s.close()


@pytest.mark.asyncio
async def test_two_sessions_distinct_ids_ports_secrets(env):
    a, b = await env.create("zoe"), await env.create("zoe", "two", "/user/zoe/two/")
    assert a["id"] != b["id"] and a["port"] != b["port"] and a["secret"] != b["secret"]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "JSON"),
        (b'{"user": "zoe", "routespec": "/x"', "JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"user": "zo\xe9", "routespec": "/x"}', "UTF-8"),
        (b"[]", "object"),
        (b'"zoe"', "object"),
        (b"42", "object"),
        (b"null", "object"),
        (b"{}", "user"),
        (b'{"routespec": "/user/zoe/"}', "user"),
        (b'{"user": "", "routespec": "/user/zoe/"}', "user"),
        (b'{"user": 5, "routespec": "/user/zoe/"}', "user"),
        (b'{"user": null, "routespec": "/user/zoe/"}', "user"),
        (b'{"user": "zoe"}', "routespec"),
        (b'{"user": "zoe", "routespec": ""}', "routespec"),
        (b'{"user": "zoe", "routespec": "user/zoe/"}', "routespec"),
        (b'{"user": "zoe", "routespec": "/u/", "server_name": 3}', "server_name"),
    ],
)
async def test_create_bad_body_is_400_json(env, body, needle):
    status, data, r = await env.req("POST", "/api/sessions", data=body, headers={"Content-Type": "application/json"})
    assert status == 400, data
    assert r.content_type == "application/json"
    assert needle in data["error"]
    assert env.broker.store.list(live_only=False) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("user", ["zo\ne", "zoe\r", "\x00", "a\tb", "\x1b[31mred", "del\x7f", "csi\x9b31m", "nel\x85x"])
async def test_control_characters_in_user_refused(env, user):
    status, data, _ = await env.req("POST", "/api/sessions", json={"user": user, "routespec": "/user/x/"})
    assert status == 400, data
    assert "user" in data["error"]
    assert env.broker.store.list(live_only=False) == []


@pytest.mark.asyncio
async def test_overlong_name_refused(env):
    status, data, _ = await env.req("POST", "/api/sessions", json={"user": "a" * 256, "routespec": "/u/"})
    assert status == 400 and "user" in data["error"]
    status, data, _ = await env.req("POST", "/api/sessions", json={"user": "a" * 255, "routespec": "/u/"})
    assert status == 201


@pytest.mark.asyncio
async def test_body_over_limit_refused(env):
    pad = " " * (MAX_BODY + 10)
    body = ('{"user": "zoe", "routespec": "/user/zoe/"' + pad + "}").encode()
    status, data, _ = await env.req("POST", "/api/sessions", data=body)
    assert status == 400 and str(MAX_BODY) in data["error"]
    # a big body that is just under the limit is fine
    body = ('{"user": "zoe", "routespec": "/user/zoe/"' + " " * (MAX_BODY - 100) + "}").encode()
    assert len(body) <= MAX_BODY
    status, data, _ = await env.req("POST", "/api/sessions", data=body)
    assert status == 201, data


async def raw_request(port: int, head: bytes, chunks: list[bytes], delay: float = 0.2) -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head)
    for c in chunks:
        w.write(b"%x\r\n%s\r\n" % (len(c), c))
        await w.drain()
        await asyncio.sleep(delay)
    w.write(b"0\r\n\r\n")
    await w.drain()
    resp = await asyncio.wait_for(r.read(), 10)
    w.close()
    status = int(resp.split(b" ", 2)[1])
    return status, resp.split(b"\r\n\r\n", 1)[1]


def chunked_head(port: int, path: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()


@pytest.mark.asyncio
async def test_chunked_body_over_limit_refused(env):
    port = int(env.url.rsplit(":", 1)[1])
    head = b'{"user": "zoe", "routespec": "/user/zoe/"}'
    chunks = [head] + [b" " * 16384] * 5  # valid JSON prefix, then > 64 KiB in total
    status, body = await raw_request(port, chunked_head(port, "/api/sessions"), chunks, delay=0.05)
    assert status == 400, body
    assert env.broker.store.list(live_only=False) == []


@pytest.mark.asyncio
async def test_chunked_body_in_pieces_is_read_whole(env):
    port = int(env.url.rsplit(":", 1)[1])
    body = b'{"user": "zoe", "routespec": "/user/zoe/"}'
    status, resp = await raw_request(port, chunked_head(port, "/api/sessions"), [body[:10], body[10:]])
    assert status == 201, resp
    assert json.loads(resp)["user"] == "zoe"


# -- usernames --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("user", ["zoe", "50fia", "秀樹", "~TestJH", "has@", "a b", "a/b", "x'\"<>&;$()"])
async def test_usernames_echoed_exactly(env, user):
    data = await env.create(user, "", "/user/x/")
    assert data["user"] == user
    status, got, _ = await env.req("GET", f"/api/sessions/{data['id']}")
    assert status == 200 and got["user"] == user
    status, lst, _ = await env.req("GET", "/api/sessions")
    assert [s["user"] for s in lst["sessions"]] == [user]
    assert env.broker.store.get(data["id"]).user == user


@pytest.mark.asyncio
async def test_unicode_is_sent_unescaped_utf8(env):
    data = await env.create("秀樹", "", "/user/%E7%A7%80%E6%A8%B9/")
    async with env.http.get(f"{env.url}/api/sessions/{data['id']}", headers=AUTH) as r:
        raw = await r.read()
    assert "秀樹".encode() in raw


# -- get / patch / list ------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("method, suffix", [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/wait?timeout=0")])
async def test_unknown_session_404_json(env, method, suffix):
    kw = {"json": {"job_id": "1"}} if method == "PATCH" else {}
    status, data, r = await env.req(method, "/api/sessions/doesnotexist" + suffix, **kw)
    assert status == 404, data
    assert r.content_type == "application/json"
    assert data == {"error": "no such session"}


@pytest.mark.asyncio
async def test_patch_job_id_and_node(env):
    sid = (await env.create())["id"]
    status, data, _ = await env.req("PATCH", f"/api/sessions/{sid}", json={"job_id": "98765"})
    assert status == 200 and data["job_id"] == "98765" and data["node"] == ""
    status, data, _ = await env.req("PATCH", f"/api/sessions/{sid}", json={"node": "cn042"})
    assert status == 200 and data["job_id"] == "98765" and data["node"] == "cn042"
    assert env.broker.store.get(sid).job_id == "98765"
    status, data, _ = await env.req("GET", f"/api/sessions/{sid}")
    assert data["job_id"] == "98765" and data["node"] == "cn042"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body, needle",
    [
        ({}, "nothing to update"),
        ({"state": "ready"}, "nothing to update"),
        ({"port": 1}, "nothing to update"),
        ({"job_id": 5}, "job_id"),
        ({"job_id": "1\n2"}, "job_id"),
        ({"node": "x" * 256}, "node"),
    ],
)
async def test_patch_bad(env, body, needle):
    sid = (await env.create())["id"]
    status, data, _ = await env.req("PATCH", f"/api/sessions/{sid}", json=body)
    assert status == 400 and needle in data["error"], data
    s = env.broker.store.get(sid)
    assert s.state == "registered" and s.job_id == "" and s.node == ""


@pytest.mark.asyncio
async def test_list_with_and_without_all(env):
    a = await env.create("zoe")
    b = await env.create("50fia")
    status, data, _ = await env.req("DELETE", f"/api/sessions/{a['id']}")
    assert status == 200
    status, data, _ = await env.req("GET", "/api/sessions")
    assert status == 200 and [s["id"] for s in data["sessions"]] == [b["id"]]
    for q in ("?all=1", "?all=true"):
        status, data, _ = await env.req("GET", "/api/sessions" + q)
        assert sorted(s["id"] for s in data["sessions"]) == sorted([a["id"], b["id"]])
        assert {s["id"]: s["state"] for s in data["sessions"]}[a["id"]] == "closed"
        assert all("secret" not in s and "secret_hash" not in s and "agent_key" not in s for s in data["sessions"])
    status, data, _ = await env.req("GET", "/api/sessions?all=0")
    assert [s["id"] for s in data["sessions"]] == [b["id"]]


@pytest.mark.asyncio
async def test_health(env):
    await env.create()
    status, data, _ = await env.req("GET", "/api/health")
    assert status == 200 and data == {"ok": True, "live_sessions": 1, "connected_agents": 0}


# -- wait --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_wait_returns_at_timeout_with_current_state(env):
    sid = (await env.create())["id"]
    t0 = time.monotonic()
    status, data, _ = await env.req("GET", f"/api/sessions/{sid}/wait?state=ready&timeout=0.5")
    dt = time.monotonic() - t0
    assert status == 200 and data["state"] == "registered" and data["id"] == sid
    assert 0.45 <= dt < 3


@pytest.mark.asyncio
async def test_wait_returns_immediately_when_state_already_reached(env):
    sid = (await env.create())["id"]
    t0 = time.monotonic()
    status, data, _ = await env.req("GET", f"/api/sessions/{sid}/wait?state=registered,ready&timeout=20")
    assert status == 200 and data["state"] == "registered"
    assert time.monotonic() - t0 < 2


@pytest.mark.asyncio
async def test_wait_returns_early_on_concurrent_delete(env):
    sid = (await env.create())["id"]
    t0 = time.monotonic()
    waiter = asyncio.ensure_future(env.req("GET", f"/api/sessions/{sid}/wait?state=ready&timeout=20"))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    status, data, _ = await env.req("DELETE", f"/api/sessions/{sid}?reason=user+stopped")
    assert status == 200 and data["state"] == "closed"
    status, data, _ = await asyncio.wait_for(waiter, 5)
    assert status == 200 and data["state"] == "closed" and data["end_reason"] == "user stopped"
    assert time.monotonic() - t0 < 5


@pytest.mark.asyncio
async def test_wait_wakes_on_patch_unrelated_change_keeps_waiting(env):
    sid = (await env.create())["id"]
    t0 = time.monotonic()
    waiter = asyncio.ensure_future(env.req("GET", f"/api/sessions/{sid}/wait?state=ready&timeout=1"))
    await asyncio.sleep(0.2)
    await env.req("PATCH", f"/api/sessions/{sid}", json={"job_id": "7"})
    status, data, _ = await asyncio.wait_for(waiter, 5)
    # a notification that does not reach the wanted state does not end the wait early
    assert status == 200 and data["state"] == "registered" and data["job_id"] == "7"
    assert time.monotonic() - t0 >= 0.9


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", ["abc", "", "1s", "nan"])
async def test_wait_invalid_timeout_400(env, timeout):
    sid = (await env.create())["id"]
    status, data, _ = await asyncio.wait_for(env.req("GET", f"/api/sessions/{sid}/wait?timeout={timeout}"), 2)
    assert status == 400, data
    assert "timeout" in data["error"]


@pytest.mark.asyncio
async def test_wait_negative_timeout_returns_now(env):
    sid = (await env.create())["id"]
    t0 = time.monotonic()
    status, data, _ = await env.req("GET", f"/api/sessions/{sid}/wait?timeout=-5")
    assert status == 200 and data["state"] == "registered"
    assert time.monotonic() - t0 < 1


# -- delete ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delete_idempotent_and_frees_listener(env):
    data = await env.create()
    sid, port = data["id"], data["port"]
    assert await accepting(port)
    status, d1, _ = await env.req("DELETE", f"/api/sessions/{sid}?reason=first")
    assert status == 200 and d1["state"] == "closed" and d1["end_reason"] == "first"
    assert d1["closed_at"] is not None
    assert not await accepting(port)
    assert sid not in env.broker.listeners
    assert port not in env.broker.store.live_ports()
    status, d2, _ = await env.req("DELETE", f"/api/sessions/{sid}?reason=second")
    assert status == 200 and d2["state"] == "closed"
    assert d2["end_reason"] == "first" and d2["closed_at"] == d1["closed_at"]
    status, d3, _ = await env.req("GET", f"/api/sessions/{sid}")
    assert status == 200 and d3["state"] == "closed"
    # the enrolment secret can no longer be spent
    assert env.broker.store.spend_secret(sid, "ssh-ed25519 AAAA") is False


@pytest.mark.asyncio
async def test_delete_default_reason_and_capped(env):
    sid = (await env.create())["id"]
    status, d, _ = await env.req("DELETE", f"/api/sessions/{sid}?reason=" + "r" * 1000)
    assert status == 200 and len(d["end_reason"]) <= 200
    sid = (await env.create())["id"]
    status, d, _ = await env.req("DELETE", f"/api/sessions/{sid}")
    assert d["end_reason"] == "closed by the hub"
