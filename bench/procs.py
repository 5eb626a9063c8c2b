"""Child processes of one benchmark run: started in their own session, always cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what or port} did not listen within {timeout}s")


def http_json(
    url: str, token: str = "", method: str = "GET", body: Any = None, scheme: str = "Bearer", timeout: float = 60
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"{scheme} {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text.strip()[:1] in ("{", "[") else text)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def chp_binary() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (
        shutil.which("configurable-http-proxy"),
        os.path.join(here, ".node/node_modules/.bin/configurable-http-proxy"),
    ):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("configurable-http-proxy not found (make chp installs it into .node/)")


def bin_path(name: str) -> str:
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.exists(cand) else (shutil.which(name) or name)


class Procs:
    def __init__(self, logdir: str):
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        cwd: str | None = None,
    ) -> subprocess.Popen[Any]:
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        else:
            try:  # children left in its group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class BrokerProc:
    """A real `broker serve` subprocess with fixed ports (so a restart keeps them)."""

    def __init__(
        self,
        procs: Procs,
        state_dir: str,
        proxy_api_url: str,
        proxy_token: str,
        name: str = "broker",
        extra: list[str] | None = None,
    ):
        self.procs = procs
        self.state_dir = state_dir
        self.name = name
        self.ssh_port = free_port()
        self.api_port = free_port()
        self.token = os.urandom(24).hex()
        self.proxy_api_url = proxy_api_url
        self.proxy_token = proxy_token
        self.hub_api_url = f"http://127.0.0.1:{free_port()}/hub/api"  # nothing listens: not used here
        self.extra = extra or []
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 30) -> None:
        env = dict(os.environ, BROKER_API_TOKEN=self.token, CONFIGPROXY_AUTH_TOKEN=self.proxy_token)
        url_file = os.path.join(self.state_dir, "api_url")
        if os.path.exists(url_file):
            os.unlink(url_file)
        self.proc = self.procs.start(
            self.name,
            [
                sys.executable,
                "-m",
                "broker.app",
                "serve",
                f"--BrokerApp.state_dir={self.state_dir}",
                "--BrokerApp.ssh_host=127.0.0.1",
                f"--BrokerApp.ssh_port={self.ssh_port}",
                f"--BrokerApp.api_port={self.api_port}",
                f"--BrokerApp.proxy_api_url={self.proxy_api_url}",
                f"--BrokerApp.hub_api_url={self.hub_api_url}",
                *self.extra,
            ],
            env=env,
        )
        deadline = time.monotonic() + timeout
        while not os.path.exists(url_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {self.procs.log_tail(self.name)}")
            if time.monotonic() > deadline:
                raise TimeoutError("broker did not start")
            time.sleep(0.02)

    def api(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        return http_json(self.url + path, self.token, method, body)


class ChpProc:
    def __init__(self, procs: Procs, name: str = "chp"):
        self.procs = procs
        self.name = name
        self.port = free_port()
        self.api_port = free_port()
        self.token = os.urandom(24).hex()
        self.api_url = f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        proc = self.procs.start(
            self.name,
            [
                chp_binary(),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                str(self.api_port),
                "--log-level",
                "warn",
            ],
            env=dict(os.environ, CONFIGPROXY_AUTH_TOKEN=self.token),
        )
        wait_port(self.api_port, 30, proc, "configurable-http-proxy")
        wait_port(self.port, 30, proc, "configurable-http-proxy")

    def add_route(self, prefix: str, target: str) -> None:
        status, body = http_json(
            f"{self.api_url}/api/routes{prefix}", self.token, "POST", {"target": target}, scheme="token"
        )
        if status != 201:
            raise RuntimeError(f"CHP route {prefix}: {status} {body}")

    def routes(self) -> dict[str, Any]:
        status, body = http_json(f"{self.api_url}/api/routes", self.token, scheme="token")
        return body if status == 200 else {}
