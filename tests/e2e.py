"""The hub's REST API as a test client of a running :class:`devstack.stack.Stack` (started by
harness.running_stack or conftest's ``stack`` fixture), and small process checks."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from jupyterhub.utils import url_escape_path
from websockets.sync.client import connect as ws_connect

from devstack.stack import Stack


def request(url: str, token: str, method: str = "GET", body: Any = None, scheme: str = "token") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"{scheme} {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.strip().startswith(("{", "[")) else text
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        return e.code, text


class Hub:
    """The hub's REST API as the stack's admin service, plus paths through CHP."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def api(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        return request(self.stack.hub_api_url + path, self.stack.admin_token, method, body)

    def broker(self, path: str, method: str = "GET") -> tuple[int, Any]:
        return request(self.stack.broker_url + path, self.stack.broker_token, method, scheme="Bearer")

    @staticmethod
    def prefix(user: str) -> str:
        return f"/user/{url_escape_path(user)}/"

    def user_path(self, user: str) -> str:
        return f"/users/{url_escape_path(user)}"

    def spawn(self, user: str, timeout: float = 120) -> float:
        """Create the user if needed, start the server, wait until the hub says ready; returns seconds."""
        status, _ = self.api(self.user_path(user))
        if status == 404:
            status, body = self.api(self.user_path(user), "POST")
            assert status == 201, body
        t0 = time.monotonic()
        status, body = self.api(self.user_path(user) + "/server", "POST")
        assert status in (201, 202), (status, body)
        while time.monotonic() - t0 < timeout:
            status, info = self.api(self.user_path(user))
            server = info.get("servers", {}).get("", {}) if isinstance(info, dict) else {}
            if server.get("ready"):
                return time.monotonic() - t0
            if not server.get("pending") and status == 200 and not server and time.monotonic() - t0 > 5:
                raise AssertionError(f"spawn of {user} failed; hub log tail:\n{self.stack.log_text('hub')[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"spawn of {user} not ready within {timeout}s")

    def progress_events(self, user: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Read the hub's spawn-progress event stream (what the spawn page shows) until it ends."""
        req = urllib.request.Request(
            f"{self.stack.hub_api_url}{self.user_path(user)}/server/progress",
            headers={"Authorization": f"token {self.stack.admin_token}"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    ev = json.loads(line[5:])
                    events.append(ev)
                    if ev.get("failed") or ev.get("ready"):
                        break
        return events

    def stop(self, user: str, timeout: float = 60) -> None:
        status, body = self.api(self.user_path(user) + "/server", "DELETE")
        assert status in (202, 204), (status, body)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            _, info = self.api(self.user_path(user))
            if not info.get("servers"):
                return
            time.sleep(0.2)
        raise AssertionError(f"server of {user} did not stop within {timeout}s")

    def through_proxy(self, user: str, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        return request(self.stack.public_url + self.prefix(user) + path, self.stack.admin_token, method, body)

    def proxy_routes(self) -> dict[str, Any]:
        status, routes = request(self.stack.proxy_api_url + "/api/routes", self.stack.proxy_token)
        assert status == 200
        return routes

    def session_of(self, user: str) -> dict[str, Any]:
        status, body = self.broker("/api/sessions?all=1")
        assert status == 200
        mine = [s for s in body["sessions"] if s["user"] == user]
        assert mine, f"no broker session for {user}"
        return mine[-1]

    def run_code(self, user: str, code: str, kernel_id: str | None = None, timeout: float = 60) -> tuple[str, str]:
        """Execute *code* in a kernel over its websocket through CHP and the tunnel; returns (kernel id, text/plain)."""
        if kernel_id is None:
            status, kernel = self.through_proxy(user, "api/kernels", "POST", {})
            assert status == 201, (status, kernel)
            kernel_id = kernel["id"]
        url = f"ws://127.0.0.1:{self.stack.public_port}{self.prefix(user)}api/kernels/{kernel_id}/channels"
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "username": "test",
                "session": uuid.uuid4().hex,
                "msg_type": "execute_request",
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "channel": "shell",
            "buffers": [],
            "content": {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        }
        with ws_connect(
            url, additional_headers={"Authorization": f"token {self.stack.admin_token}"}, open_timeout=30
        ) as ws:
            ws.send(json.dumps(msg))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = json.loads(ws.recv(timeout=timeout))
                if reply.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = reply["msg_type"]
                if kind == "execute_result":
                    return kernel_id, reply["content"]["data"]["text/plain"]
                if kind == "error":
                    raise AssertionError(f"kernel error: {reply['content']}")
        raise AssertionError("no execute_result")

    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.stack.workdir, "spool", job_id)

    def server_pid(self, job_id: str) -> int:
        """The jupyterhub-singleuser pid, as the agent reported it in the job's output."""
        with open(os.path.join(self.job_dir(job_id), "output.log"), errors="replace") as f:
            for line in f:
                if line.startswith("node-agent: server started"):
                    return int(line.rsplit("pid=", 1)[1].split()[0])
        raise AssertionError("agent did not report the server pid")


def launch_hub_config(config: str | os.PathLike[str], *, container_home: str = "") -> str:
    """Hub config lines for jobs that start through ``node-agent launch --config CONFIG``, with the
    broker polled every 0.5 s; with *container_home*, notebooks are served from there (the hub
    host's notebook directory does not exist in a container)."""
    lines = [
        f"c.BrokerSpawnerMixin.agent_command = 'node-agent launch --config {os.fspath(config)} --'",
        "c.BrokerSpawnerMixin.broker_wait_interval = 0.5",
    ]
    if container_home:
        lines.append(f"c.Spawner.notebook_dir = {container_home!r}")
    return "\n".join(lines) + "\n"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
