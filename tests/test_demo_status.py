"""``broker status`` with no arguments against the running demo stack (devstack, as ``make demo``
runs it): from its work directory, as the demo's hint says (``cd demo-state && broker status``),
and from the directory the demo was started in (the project root with ``make demo``: the demo
writes the same ``broker_config.py`` there), it lists the live session without a token on the
command line or in the environment; a ``broker_config.py`` of the user's own there is left alone;
from a directory with nothing to go by it says what to pass and exits 1."""

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
    # from the project root (where `make demo` runs; the demo writes its broker_config.py there too)
    root = tmp_path / "project"
    root.mkdir()
    assert stack.write_broker_config(str(root)) == str(root / "broker_config.py")
    r = _broker_status(str(root))
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stdout.splitlines() if line.startswith("demo-user") and "ready" in line], r.stdout
    # a broker_config.py the demo did not write is never replaced
    own = tmp_path / "own"
    own.mkdir()
    (own / "broker_config.py").write_text("c.BrokerApp.state_dir = '/srv/broker'  # noqa: F821\n")
    assert stack.write_broker_config(str(own)) is None
    assert (own / "broker_config.py").read_text().startswith("c.BrokerApp.state_dir = '/srv/broker'")
    # nowhere to look: a clear message, non-zero exit
    r = _broker_status(str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("broker status: no API token"), r.stderr
    assert "Traceback" not in r.stderr
    hub.stop("demo-user")
