"""Broker-enabled spawners: the embedded local backend and every batchspawner backend.

Use in ``jupyterhub_config.py``::

    c.JupyterHub.spawner_class = "hub_plugin.spawners.LocalBrokerSpawner"   # one machine
    c.JupyterHub.spawner_class = "hub_plugin.spawners.SlurmBrokerSpawner"   # Slurm
    c.JupyterHub.spawner_class = "hub_plugin.spawners.GridEngineBrokerSpawner"   # Grid Engine

Each class keeps its backend's ``req_*`` options (documented by batchspawner) and adds the
broker options of :class:`~hub_plugin.mixin.BrokerSpawnerMixin`.
"""

from __future__ import annotations

import os

from batchspawner import (
    CondorSpawner,
    LsfSpawner,
    MoabSpawner,
    MultiSlurmSpawner,
    PBSSpawner,
    TorqueSpawner,
)

from .gridengine import GridEngineBrokerSpawner  # shared qstat poller, secrets file, s_rt warning
from .local import LocalBatchSpawner
from .mixin import BrokerSpawnerMixin
from .options import ResourceOptionsMixin
from .slurm import SlurmBrokerSpawner  # shared squeue poller, login-node runner

__all__ = [
    "CondorBrokerSpawner",
    "GridEngineBrokerSpawner",
    "LocalBrokerSpawner",
    "LsfBrokerSpawner",
    "MoabBrokerSpawner",
    "MultiSlurmBrokerSpawner",
    "PBSBrokerSpawner",
    "SlurmBrokerSpawner",
    "TorqueBrokerSpawner",
]


class LocalBrokerSpawner(ResourceOptionsMixin, BrokerSpawnerMixin, LocalBatchSpawner):
    """Runs the job script as a local process (the embedded default; demo and tests).

    The options form (:mod:`hub_plugin.options`) offers this machine's CPUs and memory; the
    hub stops the server when its walltime is over (no scheduler does it here).
    """

    async def job_output_tail(self, max_lines: int = 20) -> str:
        path = os.path.join(self.spool_path(), str(self.job_id), "output.log")
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-max_lines:])
        except OSError:
            return ""


class MultiSlurmBrokerSpawner(BrokerSpawnerMixin, MultiSlurmSpawner):
    """Slurm (multi-cluster) through the broker."""


class TorqueBrokerSpawner(BrokerSpawnerMixin, TorqueSpawner):
    """Torque through the broker."""


class MoabBrokerSpawner(BrokerSpawnerMixin, MoabSpawner):
    """Moab through the broker."""


class PBSBrokerSpawner(BrokerSpawnerMixin, PBSSpawner):
    """PBS through the broker."""


class CondorBrokerSpawner(BrokerSpawnerMixin, CondorSpawner):
    """HTCondor through the broker."""


class LsfBrokerSpawner(BrokerSpawnerMixin, LsfSpawner):
    """LSF through the broker."""
