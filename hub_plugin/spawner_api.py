"""What the hub_plugin mixins use of JupyterHub's ``Spawner`` and batchspawner's
``BatchSpawnerBase``, declared for the type checker.

jupyterhub and batchspawner ship no type information, so mypy sees their classes as ``Any``.
The mixins (:mod:`hub_plugin.mixin`, :mod:`hub_plugin.walltime`, :mod:`hub_plugin.options`)
derive from :class:`BatchSpawnerAPI`:

* for mypy it is a class declaring the attributes and methods they rely on, so their
  ``self.…`` and ``super().…`` calls are checked against these signatures;
* at run time it is plain :class:`~traitlets.config.LoggingConfigurable` (what the mixins
  derived from before), and the concrete spawner puts the real batchspawner class last in its
  bases, e.g. ``class SlurmBrokerSpawner(ResourceOptionsMixin, BrokerSpawnerMixin, SlurmSpawner)``.

Keep the declarations to what the mixins use, with the types batchspawner 1.3 and JupyterHub
5/6 have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from traitlets.config import LoggingConfigurable

__all__ = ["BatchSpawnerAPI"]

if TYPE_CHECKING:
    from batchspawner.batchspawner import JobStatus
    from traitlets import Dict, List, Unicode

    class BatchSpawnerAPI(LoggingConfigurable):
        """JupyterHub's ``Spawner`` and batchspawner's ``BatchSpawnerBase``, as far as used."""

        # -- jupyterhub.spawner.Spawner ---------------------------------------------------------
        user: Any  # jupyterhub.user.User: .name, .url, .escaped_name
        name = Unicode()  # the server's name ("" for the default server)
        proxy_spec = Unicode()
        cmd = List(Unicode())
        user_options = Dict()

        @property
        def _log_name(self) -> str: ...

        @property
        def active(self) -> bool: ...

        @property
        def ready(self) -> bool: ...

        def get_args(self) -> list[str]: ...

        def get_env(self) -> dict[str, str]: ...

        async def start(self) -> Any: ...

        async def stop(self, now: bool = False) -> None: ...

        async def poll(self) -> int | None: ...

        def get_state(self) -> dict[str, Any]: ...

        def load_state(self, state: dict[str, Any]) -> None: ...

        def clear_state(self) -> None: ...

        # -- batchspawner.BatchSpawnerBase ------------------------------------------------------
        # (the req_* traits the options set by name, see hub_plugin.options.REQ_FIELDS)
        job_id = Unicode()
        job_status = Unicode()
        exec_prefix = Unicode()
        batch_submit_cmd = Unicode()
        req_options = Unicode()
        req_homedir = Unicode()

        def get_req_subvars(self) -> dict[str, Any]: ...

        def cmd_formatted_for_batch(self) -> str: ...

        async def run_command(self, cmd: str, input: str | None = None, env: dict[str, str] | None = None) -> str: ...

        async def _get_batch_script(self, **subvars: Any) -> str: ...

        def parse_job_id(self, output: str) -> str: ...

        async def submit_batch_script(self) -> str: ...

        async def query_job_status(self) -> JobStatus: ...

        async def cancel_batch_job(self) -> None: ...

        def state_gethost(self) -> str: ...

        def state_ispending(self) -> bool: ...

else:
    BatchSpawnerAPI = LoggingConfigurable
