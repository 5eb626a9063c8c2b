"""The suite's shared fixtures, built on tests/harness.py (which the test modules import helpers from).

* ``chp``: a real configurable-http-proxy for one test.
* ``make_broker``: a factory of in-process brokers (:class:`harness.BrokerFactory`), stopped after
  the test; ``harness``: one such broker with the defaults.
* ``stack``: one hub + CHP + broker (:func:`harness.running_stack`) for a module. A module
  describes its stack by overriding the ``stack_options`` fixture: the Stack's keyword
  arguments, plus ``name`` (of its work directory) or ``workdir`` (the directory itself), ``logs`` (the ``test-artifacts/``
  directory its logs are saved in) and ``path`` (its services' ``PATH``; default
  :func:`harness.tool_path`). Modules that need more than one stack, or a stack with other
  fixtures around it, use :func:`harness.running_stack` themselves.

Helper modules next to this one: harness.py, e2e.py (the hub's REST API as a test client),
broker_cli.py (``broker`` as a subprocess), reliability.py, sshd.py, slurm_cluster.py, sge_cluster.py,
apptainer_image.py, browser.py (chromium via playwright), flood_agent.py (a script).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from devstack.stack import Stack

from harness import BrokerFactory, Chp, Harness, running_stack, tool_path

#: helper modules whose fixtures any module may request: ``sshd``; ``slurm_cluster``, ``cancel_leftover_jobs``,
#: ``accounts``; ``sge_cluster``, ``qdel_leftover_jobs``; ``chromium`` (browser.py)
pytest_plugins = ["sshd", "slurm_cluster", "sge_cluster", "browser"]

#: Modules whose tests start services (``broker serve``, CHP, a hub, sshd), need root (mounts,
#: users, namespaces) or measure load for seconds: marked ``component``, so ``make check`` (unit
#: tests only, no root, under 2 minutes) leaves them to ``make test``.
COMPONENT_MODULES = frozenset(
    {
        "test_accounting",
        "test_agent_run",
        "test_auth_header_trust",
        "test_broker_app",
        "test_control_channel",
        "test_deploy_cli",
        "test_cotenant",
        "test_fair_admission",
        "test_faults",
        "test_hostile",
        "test_hubapi_relay",
        "test_load",
        "test_log_json",
        "test_metrics",
        "test_shibboleth",
        "test_slurm_infra",
        "test_status_watch",
        "test_tunnel_security",
        "test_webdav",
        "test_wizard",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in COMPONENT_MODULES:
            item.add_marker(pytest.mark.component)


@pytest.fixture
def chp() -> Iterator[Chp]:
    proxy = Chp().start()
    yield proxy
    proxy.stop()


@pytest_asyncio.fixture
async def make_broker(tmp_path) -> AsyncIterator[BrokerFactory]:
    factory = BrokerFactory(str(tmp_path))
    try:
        yield factory
    finally:
        await factory.close()


@pytest_asyncio.fixture
async def harness(make_broker: BrokerFactory) -> Harness:
    return await make_broker()


@pytest.fixture(scope="module")
def stack_options() -> dict[str, Any]:
    """Override in a module to configure its ``stack`` (see the module docstring)."""
    return {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, stack_options: dict[str, Any]) -> Iterator[Stack]:
    options = dict(stack_options)
    name = options.pop("name", "stack")
    workdir = options.pop("workdir", None) or tmp_path_factory.mktemp(name)
    path = options.pop("path", None) or tool_path()
    with running_stack(str(workdir), path=path, **options) as s:
        yield s
