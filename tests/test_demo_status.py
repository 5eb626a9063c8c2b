"""``broker status`` with no arguments against the running demo stack (devstack, as ``make demo``
runs it): from its work directory, as the demo's hint says (``cd demo-state && broker status``),
it lists the live session without a token on the command line or in the environment; from a
directory with nothing to go by it says what to pass and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2e import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py): the demo's defaults (the embedded local backend)."""
    return dict(name="demo-status", logs="e2e-demo-status-logs", poll_interval=2, reconcile_interval=1.0)


def _broker_status(cwd: str) -> subprocess.CompletedProcess[str]:
    broker = os.path.join(os.path.dirname(sys.executable), "broker")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([broker, "status"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_broker_status_without_arguments_lists_the_demo_session(stack, tmp_path):
    hub = Hub(stack)
    hub.spawn("demo-user")
    session = hub.session_of("demo-user")
    r = _broker_status(stack.workdir)
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith("demo-user")]
    assert row and "ready" in row[0] and str(session["port"]) in row[0], r.stdout
    assert stack.broker_token not in r.stdout + r.stderr
    # nowhere to look: a clear message, non-zero exit
    r = _broker_status(str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("broker status: no API token"), r.stderr
    assert "Traceback" not in r.stderr
    hub.stop("demo-user")
