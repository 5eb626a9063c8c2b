"""The ``broker`` command as a real subprocess, with a clean environment (for CLI tests).

:func:`clean_env` is the whole environment of such a process: ``PATH`` (the interpreter's bin
directory, ``/usr/bin``, ``/bin``), ``HOME`` in the test's tmp directory, a UTF-8 locale and the
caller's ``PYTHONPATH`` (so that a git worktree tests its own code). :class:`Served` is one
``broker serve`` on port-0 listeners in its own state directory, authenticated with
:data:`TOKEN`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from devstack.stack import free_port

PY = sys.executable
TOKEN = "cli-test-token-0123456789abcdef"
HUB = "http://127.0.0.1:8081/hub/api"


def clean_env(tmp_path: Path, **extra: str | None) -> dict[str, str]:
    """The environment above, plus *extra* (a value of None leaves the variable out)."""
    env = {
        "PATH": os.path.dirname(PY) + os.pathsep + "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
    if os.environ.get("PYTHONPATH"):  # a checkout other than the installed one (e.g. a git worktree)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def full_env(tmp_path: Path, **over: str | None) -> dict[str, str]:
    """:func:`clean_env` with everything ``broker serve`` requires (API token, CHP token, hub API URL)."""
    base: dict[str, str | None] = {
        "BROKER_API_TOKEN": TOKEN,
        "CONFIGPROXY_AUTH_TOKEN": "chp-token",
        "JUPYTERHUB_API_URL": HUB,
    }
    base.update(over)
    return clean_env(tmp_path, **base)


def run(tmp_path: Path, args: list[str], env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``python -m broker.app *args`` in *tmp_path*, output captured."""
    return subprocess.run(
        [PY, "-m", "broker.app", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


class Served:
    """One ``broker serve`` subprocess: ``args`` and ``env`` may be changed before :meth:`start`;
    its output (stdout and stderr) goes to a file read by :meth:`output`."""

    def __init__(self, tmp_path: Path, state_dir: str):
        self.tmp_path = tmp_path
        self.state_dir = state_dir
        self.env = full_env(tmp_path)
        self.args = [
            "serve",
            "--BrokerApp.ssh_port=0",
            "--BrokerApp.api_port=0",
            f"--BrokerApp.state_dir={state_dir}",
            f"--BrokerApp.proxy_api_url=http://127.0.0.1:{free_port()}",
            "--RoutePublisher.reconcile_interval=60",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.preexec_fn: Any = None
        self.errf: IO[str] | None = None

    def start(self) -> Served:
        """Start it and wait (up to 60 s) until it has written its API URL to the state directory."""
        url_file = os.path.join(self.state_dir, "api_url")
        if os.path.exists(url_file):
            os.unlink(url_file)
        self.errf = open(self.tmp_path / f"serve-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen(
            [PY, "-m", "broker.app", *self.args],
            cwd=self.tmp_path,
            env=self.env,
            stdout=self.errf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + 60  # generous: CI machines are busy
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"broker serve exited {self.proc.returncode}: {self.output()}")
            if os.path.exists(url_file):
                with open(url_file) as f:
                    self.api_url = f.read().strip()
                return self
            time.sleep(0.05)
        raise AssertionError("broker serve did not write api_url in time: " + self.output())

    def output(self) -> str:
        assert self.errf is not None
        self.errf.seek(0)
        return self.errf.read()

    def stop(self) -> int:
        """SIGTERM; returns the exit status (fails the test if it is ignored for 15 s)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("broker serve ignored SIGTERM") from None
        return self.proc.returncode

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One authenticated REST call; returns the decoded JSON answer."""
        req = urllib.request.Request(
            self.api_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def status(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """``broker status *extra`` against this broker's state directory."""
        return run(
            self.tmp_path,
            ["status", *extra, f"--BrokerApp.state_dir={self.state_dir}", "--BrokerApp.api_port=0"],
            clean_env(self.tmp_path, BROKER_API_TOKEN=TOKEN),
        )
