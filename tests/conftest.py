"""Shared fixtures: a real configurable-http-proxy, and helpers to find executables."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from hub_plugin.demo import free_port, wait_http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")


def tool_path() -> str:
    """PATH with the venv's bin and the project's node_modules/.bin first."""
    parts = [os.path.dirname(sys.executable), os.path.join(REPO, ".node", "node_modules", ".bin")]
    return os.pathsep.join(parts + [os.environ.get("PATH", "")])


def find_chp() -> str:
    chp = shutil.which("configurable-http-proxy", path=tool_path())
    if not chp:
        pytest.fail("configurable-http-proxy is not installed: run `make chp` (make test does it)")
    return chp


class Chp:
    """A real configurable-http-proxy process on free loopback ports."""

    def __init__(self, default_target: str = "http://127.0.0.1:9"):
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.api_port = free_port()
        self.default_target = default_target
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Chp":
        env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN=self.token, PATH=tool_path())
        self.proc = subprocess.Popen(
            [find_chp(), "--ip", "127.0.0.1", "--port", str(self.port), "--api-ip", "127.0.0.1",
             "--api-port", str(self.api_port), "--default-target", self.default_target],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(self.api_url + "/api/routes", 30, self.proc, "configurable-http-proxy")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def chp():
    proxy = Chp().start()
    yield proxy
    proxy.stop()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
