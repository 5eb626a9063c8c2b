"""``broker status --watch``: a real ``broker serve``, the watcher in a real terminal (pexpect)."""

from __future__ import annotations

import signal
import sys

import pexpect
import pytest

from broker_cli import TOKEN, Served, clean_env


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path, str(tmp_path / "state")).start()
    yield s
    s.stop()


def test_watch_redraws_until_ctrl_c(served, tmp_path):
    env = clean_env(tmp_path, BROKER_API_TOKEN=TOKEN, TERM="xterm")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "broker.app", "status", "--watch", "--interval", "0.3", f"--BrokerApp.api_url={served.api_url}"],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=20,
        dimensions=(40, 250),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # even if this run ignores ^C
    try:
        child.expect(r"every 0\.3s")
        child.expect(r"\(no live sessions\)")
        created = served.api("POST", "/api/sessions", {"user": "watched-user", "routespec": "/user/watched-user/"})
        served.api("PATCH", f"/api/sessions/{created['id']}", {"job_id": "4242", "node": "cn99"})
        child.expect(r"watched-user\s+-\s+4242\s+cn99\s+" + str(created["port"]) + r"\s+registered")
        # it keeps redrawing: the screen is cleared before each frame
        child.expect("\x1b\\[H\x1b\\[2J")
        child.expect("watched-user")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)
    assert "Traceback" not in (child.before or "")


def test_watch_bad_interval_and_bad_token(served, tmp_path):
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.app",
            "status",
            "--watch",
            "--interval",
            "0",
            f"--BrokerApp.api_url={served.api_url}",
        ],
        env=clean_env(tmp_path, BROKER_API_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 2 and "--interval" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "broker.app", "status", "--watch", f"--BrokerApp.api_url={served.api_url}"],
        env=clean_env(tmp_path, BROKER_API_TOKEN="wrong-token-0123456789"),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 1 and "401" in r.stderr
