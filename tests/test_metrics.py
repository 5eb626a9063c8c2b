"""Prometheus /metrics: a real Broker + REST API in-process, real agents over real SSH.

The numbers are read back from the text exposition format with prometheus_client's own
parser, and compared with what the test made happen (sessions, enrolments, failures,
reconnects, tunnel bytes, stage durations).
"""

from __future__ import annotations

import asyncio

import aiohttp
import asyncssh
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from broker.api import BrokerAPI
from broker.core import Broker
from broker.store import SessionStore
from wire.contract import CONTROL_HOST, CONTROL_PORT

from harness import Harness, echo_server, http_get

pytestmark = pytest.mark.asyncio

TOKEN = "metrics-test-api-token-0123456789"
METRICS_TOKEN = "metrics-read-only-token-0123456789"


class Env(Harness):
    url = ""
    http: aiohttp.ClientSession

    async def get(self, path: str, token: str | None = TOKEN, scheme: str = "Bearer", method: str = "GET"):
        headers = {"Authorization": f"{scheme} {token}"} if token else {}
        async with self.http.request(method, self.url + path, headers=headers) as r:
            return r.status, await r.text(), r.headers.get("Content-Type", "")

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text, ctype = await self.get("/metrics")
        assert status == 200, text
        assert ctype.startswith("text/plain") and "version=" in ctype
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def val(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_asyncio.fixture
async def env(tmp_path):
    echo = await echo_server()
    store = SessionStore(str(tmp_path / "broker.sqlite"))
    broker = Broker(
        store=store,
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        hub_api=("127.0.0.1", echo.sockets[0].getsockname()[1]),
        chp=None,
        keepalive_interval=0,
        login_timeout=1.0,
        counters_flush_interval=0.2,
    )
    await broker.start()
    api = BrokerAPI(broker, TOKEN, "127.0.0.1", metrics_token=METRICS_TOKEN)
    runner = web.AppRunner(api.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    e = Env(broker, str(tmp_path))
    e.servers = []
    e.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    e.http = aiohttp.ClientSession()
    yield e
    await e.http.close()
    await runner.cleanup()
    await broker.stop()
    for s in e.servers:
        s.close()
    echo.close()
    store.close()


async def test_metrics_auth_deny_by_default(env):
    # no token, wrong token, wrong scheme: 401 like every other route
    for token, scheme in ((None, "Bearer"), ("wrong-token-0123456789abcdef", "Bearer"), (TOKEN, "Basic")):
        status, text, _ = await env.get("/metrics", token, scheme)
        assert status == 401, (token, scheme)
        assert "broker_" not in text
    # the API token and the read-only metrics token both work for GET /metrics
    assert (await env.get("/metrics", TOKEN))[0] == 200
    assert (await env.get("/metrics", METRICS_TOKEN, "token"))[0] == 200
    # the metrics token is valid for nothing else (read-only: it cannot even list sessions)
    for path in ("/api/sessions", "/api/health", "/api/nope"):
        assert (await env.get(path, METRICS_TOKEN))[0] == 401, path
    async with env.http.post(
        env.url + "/api/sessions",
        json={"user": "x", "routespec": "/x/"},
        headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
    ) as r:
        assert r.status == 401
    async with env.http.post(env.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as r:
        assert r.status == 401
    assert env.broker.store.list() == []


async def test_metrics_follow_sessions_agents_bytes_failures(env):
    m = await env.metrics()
    assert val(m, "broker_sessions", state="registered") == 0
    assert val(m, "broker_agents_connected") == 0
    # every series exists from the start (rate() works from the first scrape)
    assert ("broker_agent_auth_failures_total", (("reason", "wrong secret"),)) in m
    assert ("broker_spawn_stage_seconds_count", (("stage", "total"),)) in m

    # three sessions: a ready one, a connected one, a registered one
    s1, secret1 = await env.session("zoe")
    s2, secret2 = await env.session("50fia")
    s3, _ = await env.session("秀樹")
    m = await env.metrics()
    assert val(m, "broker_sessions", state="registered") == 3
    assert val(m, "broker_sessions_created_total") == 3

    await asyncio.sleep(0.3)  # a measurable registered -> connected stage
    conn1, key1 = await env.enrol(s1.id, secret1)
    sock = await env.serve_unix("nb")
    await conn1.forward_remote_port_to_path("127.0.0.1", 0, sock)
    await asyncio.sleep(0.2)
    _, writer = await conn1.open_connection(CONTROL_HOST, CONTROL_PORT)
    writer.write(b'{"type": "ready"}\n')
    assert (await env.broker.wait_for(s1.id, {"ready"}, 10)).state == "ready"
    conn2, _ = await env.enrol(s2.id, secret2)

    m = await env.metrics()
    assert val(m, "broker_sessions", state="ready") == 1
    assert val(m, "broker_sessions", state="connected") == 1
    assert val(m, "broker_sessions", state="registered") == 1
    assert val(m, "broker_agents_connected") == 2
    assert val(m, "broker_spawn_stage_seconds_count", stage="registered_to_connected") == 2
    assert val(m, "broker_spawn_stage_seconds_count", stage="connected_to_ready") == 1
    assert val(m, "broker_spawn_stage_seconds_count", stage="total") == 1
    s1_now = env.broker.get(s1.id)
    assert val(m, "broker_spawn_stage_seconds_sum", stage="total") == pytest.approx(s1_now.ready_at - s1_now.created)
    assert val(m, "broker_spawn_stage_seconds_sum", stage="total") >= 0.5
    assert val(m, "broker_spawn_stage_seconds_sum", stage="connected_to_ready") >= 0.2
    # histogram buckets are cumulative: the total (~0.5 s) is in le=1 but not in le=0.5... bounds
    assert val(m, "broker_spawn_stage_seconds_bucket", stage="total", le="+Inf") == 1

    # traffic through the tunnel: the byte counters follow the store's flushed counters
    for _ in range(3):
        status, body = await http_get(s1.port, "/user/zoe/" + "x" * 1000)
        assert status == 200
    await asyncio.sleep(0.6)  # > counters_flush_interval
    m = await env.metrics()
    stored = env.broker.get(s1.id)
    assert stored.bytes_in > 3000 and stored.bytes_out > 3000
    assert val(m, "broker_tunnel_bytes_in_total") == stored.bytes_in
    assert val(m, "broker_tunnel_bytes_out_total") == stored.bytes_out

    # auth failures by reason; each failed connection is a connect failure
    with pytest.raises(asyncssh.PermissionDenied):
        await env.enrol(s3.id, "not-the-secret")
    with pytest.raises(asyncssh.PermissionDenied):
        await env.enrol("no-such-session", "x")
    with pytest.raises(asyncssh.PermissionDenied):
        await env.reconnect(s2.id, asyncssh.generate_private_key("ssh-ed25519"))
    # a client that connects and never authenticates: the login timeout (1 s) closes it
    reader, w = await asyncio.open_connection("127.0.0.1", env.broker.ssh_port)
    w.write(b"SSH-2.0-idle\r\n")
    await asyncio.wait_for(reader.read(), 10)  # closed by the broker
    w.close()
    await asyncio.sleep(0.3)
    m = await env.metrics()
    assert val(m, "broker_agent_auth_failures_total", reason="wrong secret") == 1
    assert val(m, "broker_agent_auth_failures_total", reason="unknown or closed session") == 1
    auth_total = sum(v for (n, _l), v in m.items() if n == "broker_agent_auth_failures_total")
    assert auth_total >= 3  # the wrong key too (its reason depends on the SSH server's wording)
    assert val(m, "broker_agent_connect_failures_total", reason="auth_failed") == 3
    assert val(m, "broker_agent_connect_failures_total", reason="login_timeout") == 1
    assert val(m, "broker_agent_reconnects_total") == 0

    # reconnect: the agent of s1 comes back with its key
    conn1.close()
    await asyncio.sleep(0.3)
    assert val(await env.metrics(), "broker_agents_connected") == 1
    again = await env.reconnect(s1.id, key1)
    await asyncio.sleep(0.1)
    m = await env.metrics()
    assert val(m, "broker_agent_reconnects_total") == 1
    assert val(m, "broker_agents_connected") == 2
    assert val(m, "broker_sessions", state="ready") == 1  # still ready, same session

    # close: gauges drop, the closed counter rises
    for s in (s1, s2, s3):
        await env.broker.close_session(s.id, "test over")
    m = await env.metrics()
    assert sum(v for (n, _l), v in m.items() if n == "broker_sessions") == 0
    assert val(m, "broker_sessions_closed_total") == 3
    assert val(m, "broker_agents_connected") == 0
    again.close()
    conn2.close()


async def test_hostile_names_do_not_create_series(env):
    # user names and session ids never become label values
    for name in ('evil"} 1\nbroker_x 9', "a" * 300):
        await env.session(name)
    for username in ('evil"} broker_x{le="1', "a" * 300):
        with pytest.raises(asyncssh.PermissionDenied):
            await env.enrol(username, "x")
    status, text, _ = await env.get("/metrics")
    assert status == 200
    assert "evil" not in text and "broker_x" not in text and "a" * 50 not in text
    list(text_string_to_metric_families(text))  # still parses
