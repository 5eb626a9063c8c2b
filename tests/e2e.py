"""The hub's REST API as a test client of a running :class:`devstack.stack.Stack` (started by
harness.running_stack or conftest's ``stack`` fixture), and small process checks."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from jupyterhub.utils import url_escape_path
from websockets.sync.client import connect as ws_connect

from devstack.stack import Stack

from harness import wait_until


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


def form_login(public_url: str, user: str, password: str) -> urllib.request.OpenerDirector:
    """Log in through the hub's login form as a browser would (the form's ``_xsrf`` field, the
    cookies kept): an opener that carries *user*'s hub cookies, and the cookies of every server
    it is sent through afterwards (OAuth round trips included). Fails the test if the hub sends
    the login page back."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    base = public_url + "/hub"
    with opener.open(base + "/login", timeout=30) as r:
        m = re.search(r'name="_xsrf" value="([^"]+)"', r.read().decode())
    assert m, "no _xsrf field on the login page"
    form = urllib.parse.urlencode({"_xsrf": m.group(1), "username": user, "password": password}).encode()
    with opener.open(base + "/login?next=", data=form, timeout=30) as r:
        assert "/hub/login" not in r.url, f"{user} could not log in: {r.url}"
    return opener


class Hub:
    """The hub's REST API as the stack's admin service, plus paths through the proxy.

    *server* (default ``""``) names one of a user's named servers (``c.JupyterHub.allow_named_servers``).
    """

    def __init__(self, stack: Stack):
        self.stack = stack

    def api(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        return request(self.stack.hub_api_url + path, self.stack.admin_token, method, body)

    def broker(self, path: str, method: str = "GET") -> tuple[int, Any]:
        return request(self.stack.broker_url + path, self.stack.broker_token, method, scheme="Bearer")

    @staticmethod
    def prefix(user: str, server: str = "") -> str:
        return f"/user/{url_escape_path(user)}/" + (f"{url_escape_path(server)}/" if server else "")

    def user_path(self, user: str) -> str:
        return f"/users/{url_escape_path(user)}"

    def server_path(self, user: str, server: str = "") -> str:
        return self.user_path(user) + (f"/servers/{url_escape_path(server)}" if server else "/server")

    def spawn(self, user: str, timeout: float = 120, server: str = "", options: dict[str, Any] | None = None) -> float:
        """Create the user if needed, start the server (*server*: a named one; *options*: the
        form's fields), wait until the hub says ready; returns seconds."""
        status, _ = self.api(self.user_path(user))
        if status == 404:
            status, body = self.api(self.user_path(user), "POST")
            assert status == 201, body
        t0 = time.monotonic()
        status, body = self.api(self.server_path(user, server), "POST", options)
        assert status in (201, 202), (status, body)
        while time.monotonic() - t0 < timeout:
            status, info = self.api(self.user_path(user))
            server_model = info.get("servers", {}).get(server, {}) if isinstance(info, dict) else {}
            if server_model.get("ready"):
                return time.monotonic() - t0
            if not server_model.get("pending") and status == 200 and not server_model and time.monotonic() - t0 > 5:
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

    def stop(self, user: str, timeout: float = 60, server: str = "") -> None:
        status, body = self.api(self.server_path(user, server), "DELETE")
        assert status in (202, 204), (status, body)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            _, info = self.api(self.user_path(user))
            if server not in info.get("servers", {}):
                return
            time.sleep(0.2)
        raise AssertionError(f"server {server!r} of {user} did not stop within {timeout}s")

    def through_proxy(
        self, user: str, path: str, method: str = "GET", body: Any = None, server: str = ""
    ) -> tuple[int, Any]:
        return request(self.stack.public_url + self.prefix(user, server) + path, self.stack.admin_token, method, body)

    def progress_messages(self, user: str, want: str, timeout: float, into: list[str] | None = None) -> list[str]:
        """Read the hub's progress event stream of *user*'s server until a message containing
        *want* arrives; returns the messages so far (AssertionError if none does in *timeout*).
        Each message is appended to *into* as it arrives (for a reader in another thread)."""
        url = f"{self.stack.hub_api_url}{self.user_path(user)}/server/progress"
        req = urllib.request.Request(url, headers={"Authorization": f"token {self.stack.admin_token}"})
        messages: list[str] = [] if into is None else into
        deadline = time.monotonic() + timeout
        with urllib.request.urlopen(req, timeout=timeout) as r:
            while time.monotonic() < deadline:
                line = r.readline().decode()
                if not line:
                    break
                if line.startswith("data:"):
                    msg = json.loads(line[5:]).get("message", "")
                    messages.append(msg)
                    if want in msg:
                        return messages
        raise AssertionError(f"no progress message with {want!r}; got {messages}")

    def proxy_routes(self) -> dict[str, Any]:
        status, routes = request(self.stack.proxy_api_url + "/api/routes", self.stack.proxy_token)
        assert status == 200
        return routes

    def session_of(self, user: str, server: str = "") -> dict[str, Any]:
        """The broker's latest session of *user*'s server *server*."""
        status, body = self.broker("/api/sessions?all=1")
        assert status == 200
        mine = [s for s in body["sessions"] if s["user"] == user and s["server_name"] == server]
        assert mine, f"no broker session for {user}"
        return mine[-1]

    def wait_server_and_route_gone(self, user: str, timeout: float = 30) -> float:
        """Wait until the hub lists no server for *user* and CHP has no route for it (after the
        job ended outside the hub); returns the seconds it took."""
        key = f"/user/{user}"
        t0 = time.monotonic()

        def gone() -> bool:
            _, info = self.api(self.user_path(user))
            return not info.get("servers") and key not in self.proxy_routes()

        wait_until(gone, timeout, interval=0.2, what="hub to notice the ended job and drop the route")
        return time.monotonic() - t0

    def restart_hub_keeps_server(self, user: str) -> dict[str, Any]:
        """With *user*'s server ready: define a variable in a kernel, restart the hub, and check
        that the same server (through CHP), broker session and kernel state are still there.
        Returns the broker's session."""
        kernel_id, _ = self.run_code(user, "x = 6 * 7\nx")
        session = self.session_of(user)
        self.stack.stop_service("hub")
        self.stack.start_hub()
        wait_until(
            lambda: self.through_proxy(user, "api/status")[0] == 200,
            30,
            interval=0.5,
            what="server usable through CHP after the hub restart",
        )
        _, info = self.api(self.user_path(user))
        assert info["servers"][""]["ready"]
        state = info["servers"][""].get("state") or {}
        if state:  # admin view includes the spawner state
            assert state.get("job_id") == session["job_id"] and state.get("session_id") == session["id"]
        after = self.session_of(user)
        assert after["id"] == session["id"] and after["state"] == "ready"
        _, result = self.run_code(user, "x", kernel_id=kernel_id)
        assert result == "42"
        return session

    def run_code(
        self,
        user: str,
        code: str,
        kernel_id: str | None = None,
        timeout: float = 60,
        server: str = "",
        wait: bool = True,
    ) -> tuple[str, str]:
        """Execute *code* in a kernel over its websocket through the proxy and the tunnel; returns
        (kernel id, text/plain). With *wait* false: returns (kernel id, "") as soon as the kernel
        reports it is busy with *code*, and closes the websocket (the code runs on)."""
        if kernel_id is None:
            status, kernel = self.through_proxy(user, "api/kernels", "POST", {}, server=server)
            assert status == 201, (status, kernel)
            kernel_id = kernel["id"]
        url = (
            "ws"
            + self.stack.public_url.removeprefix("http")
            + f"{self.prefix(user, server)}api/kernels/{kernel_id}/channels"
        )
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
                if not wait and kind == "status" and reply["content"].get("execution_state") == "busy":
                    return kernel_id, ""
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


def local_job_state(stack: Stack, job_id: str) -> str:
    """What the local batch system (``hub_plugin.localbatch query``) says of *job_id* in *stack*'s spool."""
    spool = os.path.join(stack.workdir, "spool")
    argv = [sys.executable, "-m", "hub_plugin.localbatch", "query", "--spool", spool, job_id]
    return subprocess.run(argv, capture_output=True, text=True).stdout


def local_job_running(stack: Stack, job_id: str) -> bool:
    """Whether the local batch system still has *job_id* running or pending."""
    return local_job_state(stack, job_id).startswith(("RUNNING", "PENDING"))
