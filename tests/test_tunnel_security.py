"""Broker + agent-side SSH over real SSH connections on 127.0.0.1 (component layer).

The broker runs in-process (real asyncssh server, real SQLite store, real listeners). The
"agent" here is a raw asyncssh client so each test can behave like an attacker. Behind the
tunnel a tiny HTTP server on a unix socket stands in for jupyterhub-singleuser (the real one
runs in the end-to-end tests); the "hub API" is a real TCP echo server on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import aiohttp
import asyncssh
import pytest
from jupyterhub.utils import url_escape_path
from traitlets.config import Config

from broker.core import Broker
from broker.proxy import ChpClient
from broker.store import SessionStore
from wire.contract import CONTROL_HOST, CONTROL_PORT

from harness import HUB_API_PING, Chp, Harness, echo_server, http_get

pytestmark = pytest.mark.asyncio


async def test_enrolled_agent_carries_hub_side_traffic_and_hub_api(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    sock = await harness.serve_unix("nb")
    listener = await conn.forward_remote_port_to_path("127.0.0.1", 0, sock)
    assert listener.get_port() == session.port  # the broker chose the port, not the agent
    status, body = await http_get(session.port, "/user/zoe/api")
    assert (status, body) == (200, b"/user/zoe/api")
    reader, writer = await conn.open_connection("127.0.0.1", harness.hub_api_port)
    writer.write(HUB_API_PING)
    assert await asyncio.wait_for(reader.read(), 5) == b"hub-api:" + HUB_API_PING
    assert harness.broker.get(session.id).state == "connected"
    conn.close()


async def test_wrong_secret_refused(harness):
    session, _ = await harness.session()
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.enrol(session.id, "not-the-secret")
    assert harness.broker.get(session.id).secret_spent_at is None  # a failed try spends nothing


async def test_spent_secret_refused(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    conn.close()
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.enrol(session.id, secret)


async def test_expired_secret_refused(harness):
    harness.broker.enrol_ttl = 0.2
    session, secret = await harness.session()
    await asyncio.sleep(0.4)
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.enrol(session.id, secret)


async def test_secret_of_one_session_cannot_enrol_another(harness):
    a, secret_a = await harness.session("zoe")
    b, _ = await harness.session("50fia")
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.enrol(b.id, secret_a)


async def test_key_of_one_session_cannot_serve_another(harness):
    a, secret_a = await harness.session("zoe")
    b, secret_b = await harness.session("50fia")
    conn_a, key_a = await harness.enrol(a.id, secret_a)
    conn_b, key_b = await harness.enrol(b.id, secret_b)
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.reconnect(b.id, key_a)
    again = await harness.reconnect(a.id, key_a)  # its own session: fine
    again.close()
    for c in (conn_a, conn_b):
        c.close()


async def test_no_credentials_refused(harness):
    session, _ = await harness.session()
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            harness.broker.ssh_port,
            username=session.id,
            client_keys=None,
            password=None,
            **harness.ssh_options(),
        )


@pytest.mark.parametrize("host,port", [("127.0.0.1", 8083), ("0.0.0.0", 0), ("", 0), ("::", 0), ("10.0.0.1", 0)])
async def test_out_of_policy_remote_forward_refused(harness, host, port):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port(host, port, "127.0.0.1", 9)
    conn.close()


async def test_second_remote_forward_refused(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port("localhost", 0, "127.0.0.1", 9)
    conn.close()


@pytest.mark.parametrize("dest", ["other-port", ("127.0.0.2", None), ("example.invalid", 80), ("localhost", None)])
async def test_direct_channel_elsewhere_than_hub_api_refused(harness, dest):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    if dest == "other-port":
        host, port = "127.0.0.1", harness.broker.ssh_port  # e.g. the broker's own SSH port
    else:
        host, port = dest[0], dest[1] or harness.hub_api_port
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection(host, port)
    conn.close()


async def test_exec_shell_subsystem_refused(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.run("id")
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.create_process()  # interactive shell
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.start_sftp_client()
    conn.close()


async def test_unix_socket_forwards_refused(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_path(os.path.join(harness.tmp, "x.sock"), "/tmp/y.sock")
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_unix_connection("/run/munge/munge.socket.2")
    conn.close()


async def test_garbage_on_control_channel_closes_only_that_connection(harness):
    a, secret_a = await harness.session("zoe")
    b, secret_b = await harness.session("50fia")
    conn_a, _ = await harness.enrol(a.id, secret_a)
    conn_b, _ = await harness.enrol(b.id, secret_b)
    sock_b = await harness.serve_unix("b")
    await conn_b.forward_remote_port_to_path("127.0.0.1", 0, sock_b)
    _, writer = await conn_a.open_connection(CONTROL_HOST, CONTROL_PORT)
    writer.write(b"\xff\xfe not json at all\n")
    await asyncio.wait_for(conn_a.wait_closed(), 5)
    status, _ = await http_get(b.port)
    assert status == 200
    assert harness.broker.get(b.id).agent_connected
    conn_b.close()


async def test_ready_before_tunnel_is_refused(harness):
    session, secret = await harness.session()
    conn, _ = await harness.enrol(session.id, secret)
    _, writer = await conn.open_connection(CONTROL_HOST, CONTROL_PORT)
    writer.write(b'{"type": "ready"}\n')
    await asyncio.wait_for(conn.wait_closed(), 5)
    assert harness.broker.get(session.id).state == "connected"


async def test_closed_session_refuses_reconnect_and_frees_port(harness):
    session, secret = await harness.session()
    conn, key = await harness.enrol(session.id, secret)
    await harness.broker.close_session(session.id, "test")
    await asyncio.wait_for(conn.wait_closed(), 5)
    with pytest.raises(asyncssh.PermissionDenied):
        await harness.reconnect(session.id, key)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", session.port)


async def test_port_is_stable_across_agent_reconnects(harness):
    session, secret = await harness.session()
    sock = await harness.serve_unix("nb")
    conn, key = await harness.enrol(session.id, secret)
    l1 = await conn.forward_remote_port_to_path("127.0.0.1", 0, sock)
    conn.close()
    await conn.wait_closed()
    conn2 = await harness.reconnect(session.id, key)
    l2 = await conn2.forward_remote_port_to_path("127.0.0.1", 0, sock)
    assert l1.get_port() == l2.get_port() == session.port
    assert (await http_get(session.port))[0] == 200
    conn2.close()


async def test_hub_side_connection_waits_for_a_reconnecting_agent(harness):
    session, secret = await harness.session()
    sock = await harness.serve_unix("nb")
    conn, key = await harness.enrol(session.id, secret)
    conn.close()
    await conn.wait_closed()
    pending = asyncio.ensure_future(http_get(session.port, "/during-reconnect"))
    await asyncio.sleep(0.3)
    conn2 = await harness.reconnect(session.id, key)
    await conn2.forward_remote_port_to_path("127.0.0.1", 0, sock)
    assert await asyncio.wait_for(pending, 10) == (200, b"/during-reconnect")
    conn2.close()


USERNAMES = ["zoe", "50fia", "秀樹", "~TestJH", "has@"]


async def test_odd_usernames_through_broker_and_route_publishing(tmp_path):
    """Each name: a session, an agent tunnel, a CHP route published by the broker, a GET through CHP."""
    proxy = Chp().start()
    echo = await echo_server()
    store = SessionStore(str(tmp_path / "b.sqlite"))
    broker = Broker(
        store=store,
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        hub_api=("127.0.0.1", echo.sockets[0].getsockname()[1]),
        chp=ChpClient(proxy.api_url, proxy.token),
        keepalive_interval=0,
        config=Config(RoutePublisher={"reconcile_interval": 0.5}),
    )
    await broker.start()
    h = Harness(broker, str(tmp_path))
    h.servers = []
    conns = []
    try:
        for name in USERNAMES:
            routespec = f"/user/{url_escape_path(name)}/"
            session, secret = await broker.create_session(name, "", routespec)
            conn, _ = await h.enrol(session.id, secret)
            conns.append(conn)
            sock = await h.serve_unix(f"u{len(conns)}")
            await conn.forward_remote_port_to_path("127.0.0.1", 0, sock)
            _, writer = await conn.open_connection(CONTROL_HOST, CONTROL_PORT)
            writer.write(b'{"type": "ready"}\n')
            s = await broker.wait_for(session.id, {"ready"}, 10)
            assert s.state == "ready" and s.user == name
            async with aiohttp.ClientSession() as http:
                url = proxy.public_url + routespec + "api/status"
                async with http.get(url) as resp:
                    assert resp.status == 200, (name, resp.status)
                    # CHP passes the path on: the server behind the tunnel saw this user's prefix
                    assert (await resp.text()).startswith(routespec)
        routes = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(proxy.api_url + "/api/routes", headers={"Authorization": f"token {proxy.token}"})
            ).read()
        )
        for s in broker.store.list():
            assert routes[f"/user/{s.user}"]["target"] == s.target
            assert routes[f"/user/{s.user}"]["user"] == s.user
    finally:
        for c in conns:
            c.close()
        await broker.stop()
        for s in h.servers:
            s.close()
        echo.close()
        proxy.stop()


async def test_unenrolled_session_expires_and_frees_its_port(harness):
    harness.broker.enrol_ttl = 0.1
    session, _ = await harness.session()
    await asyncio.sleep(0.2)
    await harness.broker._expire_unenrolled()
    closed = harness.broker.get(session.id)
    assert closed.state == "closed" and "expired" in closed.end_reason
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", session.port)
