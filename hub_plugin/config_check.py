"""Settings carried over from batchspawner (or an older setup) that would silently replace the
broker's batch script, or that do nothing with the broker's spawners: warned about at hub start.

:func:`config_warnings` is pure: a traitlets config and the spawner class in, warning texts out
(each names the setting and says what to do). :func:`warn_at_hub_start` runs it once per process:
``hub_plugin.mixin`` calls it when it is imported inside a starting JupyterHub (the hub imports the
spawner class while it loads its config, before its first ``await``, so the check is scheduled
on the running loop and sees the whole config), and every spawner calls it when it is created
(for a hub that imported the plugin before its own start).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

#: batchspawner options the broker's spawners do not use, with what replaces them.
UNUSED: dict[str, str] = {
    "batch_query_cmd": "job states come from one shared squeue per interval (slurm_poll_interval)",
    "state_pending_re": "job states come from the shared poller, not from matching squeue output",
    "state_running_re": "job states come from the shared poller, not from matching squeue output",
    "state_exechost_re": "the node comes from the broker's session, not from squeue output",
    "state_exechost_exp": "the node comes from the broker's session, not from squeue output",
    "state_unknown_re": "job states come from the shared poller",
    "startup_poll_interval": "start waits on the broker's long-poll (broker_wait_interval)",
    "batchspawner_singleuser_cmd": "the job runs the node agent (agent_command), which reports readiness to the broker",
    "req_host": "the node reaches the hub through the broker's tunnel; no host is needed",
    "req_keepvars": "the job gets exactly the spawner's variables, by name (sbatch --export=NAMES)",
    "req_keepvars_extra": "the job gets exactly the spawner's variables, by name; add variables with c.Spawner.environment",
}

#: JupyterHub options the jobs never see (the agent relays the hub API on a node-local port).
UNUSED_HUB: dict[str, str] = {
    "hub_connect_ip": "jobs reach the hub API only through the broker's tunnel; the agent points JUPYTERHUB_API_URL at its node-local relay",
    "hub_connect_url": "jobs reach the hub API only through the broker's tunnel; the agent points JUPYTERHUB_API_URL at its node-local relay",
}

_warned = False


def _sections(config: Any, spawner_class: type) -> list[str]:
    """The config sections that configure *spawner_class* (its own name and its ancestors')."""
    names = [c.__name__ for c in spawner_class.mro()]
    return [n for n in names if n in config]


def config_warnings(config: Any, spawner_class: type) -> list[str]:
    """Warnings for *config* (a traitlets Config of the hub) with *spawner_class* as the spawner."""
    out: list[str] = []
    own = spawner_class.__name__
    is_broker = any(c.__name__ == "BrokerSpawnerMixin" for c in spawner_class.mro())
    if not is_broker:
        return out
    for section in _sections(config, spawner_class):
        values = config[section]
        if "batch_script" in values:
            script = str(values["batch_script"])
            if section != own:
                out.append(
                    f"c.{section}.batch_script replaces {own}'s batch script (settings of a parent class apply "
                    f"to {own}); the broker's script passes secrets by name only and execs the node agent. "
                    f"Remove it, or set c.{own}.batch_script starting from the default (docs/migrating.md)"
                )
            if "{{cmd}}" not in script.replace(" ", ""):
                out.append(
                    f"c.{section}.batch_script has no {{{{cmd}}}}: the job would never start the node agent "
                    "and every spawn would time out"
                )
        for name, why in UNUSED.items():
            if name in values:
                out.append(f"c.{section}.{name} does nothing with {own}: {why}")
    hub = config["JupyterHub"] if "JupyterHub" in config else {}
    for name, why in UNUSED_HUB.items():
        if name in hub:
            out.append(f"c.JupyterHub.{name} does nothing for {own}'s jobs: {why}")
    return out


def check(config: Any, spawner_class: type, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Log :func:`config_warnings` once per process."""
    global _warned
    if _warned:
        return
    _warned = True
    for text in config_warnings(config, spawner_class):
        log.warning("config: %s", text)


def warn_at_hub_start() -> None:
    """If a JupyterHub is starting in this process, check its config once it is loaded."""
    try:
        from jupyterhub.app import JupyterHub

        if not JupyterHub.initialized():
            return
        loop = asyncio.get_running_loop()
    except (ImportError, RuntimeError):
        return
    app = JupyterHub.instance()

    def run() -> None:
        try:
            check(app.config, app.spawner_class, app.log)
        except Exception as e:  # a check must never stop the hub
            app.log.warning("config check failed: %s", e)

    loop.call_soon(run)
