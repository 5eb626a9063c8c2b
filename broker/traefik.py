"""Publishing session routes to Traefik through its file provider (``c.Broker.route_publisher_class = "traefik"``).

The broker owns one file of Traefik's file provider (``c.TraefikRoutePublisher.dynamic_config_file``)
and rewrites it, atomically, whenever the ready sessions change, and on each reconcile pass if the
file on disk differs (deleted, edited). Traefik watches the directory (``providers.file.directory``,
``watch = true``) and merges this file with the hub's own (JupyterHub's
``TraefikFileProviderProxy.dynamic_config_file``, from ``jupyterhub-traefik-proxy``), so the two
never write the same file and never undo each other's changes: the hub's route check reads only
its own file; the broker's routers carry the prefix :data:`ROUTER_PREFIX` and the same rule and
target as the hub's (rules and names are made by jupyterhub-traefik-proxy's own functions). A
restarted Traefik reads both files again.

Contract: the file holds exactly one router and one service per ready session (plus nothing
else); a session's route is written before :meth:`publish` returns and gone from the file before
:meth:`unpublish` returns.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Unicode

from .options import OptionError
from .proxy import DesiredRoutes, RoutePublisher

#: Prefix of the names of the broker's routers and services (the hub's have none).
ROUTER_PREFIX = "broker-"


class TraefikRoutePublisher(RoutePublisher):
    """Keeps the broker's Traefik file-provider file equal to the ready sessions (``c.TraefikRoutePublisher.<name>``)."""

    # one option a line: the class reads as a table of its options
    # fmt: off
    dynamic_config_file = Unicode("", help="The file of Traefik's file provider that the broker owns and rewrites (atomically) with the ready sessions' routes: .toml (or .yaml, which needs the ruamel.yaml package). Put it in the directory Traefik's file provider watches (providers.file.directory, watch = true), beside the hub's own file (TraefikFileProviderProxy.dynamic_config_file). Required with route_publisher_class = 'traefik'.").tag(config=True)
    entrypoint = Unicode("http", help="The Traefik entrypoint of the routes: the hub's TraefikProxy.traefik_entrypoint ('http', or 'https' for an https public_url).").tag(config=True)
    # fmt: on

    def __init__(self, *, desired: DesiredRoutes, tag: str = "", **kwargs: Any):
        """*kwargs*: options (traits) and the ``parent``/``config`` of a Configurable."""
        super().__init__(desired=desired, tag=tag, **kwargs)
        if not self.dynamic_config_file:
            raise OptionError(
                "TraefikRoutePublisher.dynamic_config_file: not set (a file in the directory Traefik's file provider watches)"
            )
        if not self.dynamic_config_file.endswith((".toml", ".yaml")):
            raise OptionError(
                f"TraefikRoutePublisher.dynamic_config_file: must end in .toml or .yaml, got {self.dynamic_config_file!r}"
            )
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.dynamic_config_file))):
            raise OptionError(
                f"TraefikRoutePublisher.dynamic_config_file: its directory does not exist: {self.dynamic_config_file!r}"
            )
        try:
            from jupyterhub_traefik_proxy import traefik_utils
        except ImportError:
            raise OptionError(
                "Broker.route_publisher_class: 'traefik' needs the jupyterhub-traefik-proxy package (pip install jupyterhub-traefik-proxy)"
            ) from None
        self._utils = traefik_utils
        try:
            self._file = traefik_utils.TraefikConfigFileHandler(self.dynamic_config_file)
        except ImportError as exc:  # .yaml without ruamel.yaml
            raise OptionError(f"TraefikRoutePublisher.dynamic_config_file: {exc}") from None

    def routes_config(self, want: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Traefik's dynamic configuration for the routes *want* (``{routespec: (target, data)}``)."""
        routers: dict[str, Any] = {}
        services: dict[str, Any] = {}
        for routespec, (target, _data) in sorted(want.items()):
            spec = routespec if routespec.endswith("/") else routespec + "/"
            service = ROUTER_PREFIX + self._utils.generate_alias(spec, "service")
            routers[ROUTER_PREFIX + self._utils.generate_alias(spec, "router")] = {
                "rule": self._utils.generate_rule(spec),
                "entryPoints": [self.entrypoint],
                "service": service,
            }
            services[service] = {"loadBalancer": {"servers": [{"url": target}], "passHostHeader": True}}
        # Traefik refuses empty tables: no routes is an empty file
        return {"http": {"routers": routers, "services": services}} if routers else {}

    def _on_disk(self) -> Any:
        try:
            return self._file.load()
        except FileNotFoundError:
            return None
        except Exception as exc:  # unreadable or not parseable: rewritten below
            self.log.warning("route file unreadable; rewriting it", file=self.dynamic_config_file, error=str(exc))
            return None

    def _sync(self) -> int:
        """Write the file if it differs from the ready sessions' routes; returns the routers changed."""
        want = self.routes_config(self.desired())
        have = self._on_disk()
        if have == want:
            return 0
        self._file.atomic_dump(want)
        before = set(((have or {}).get("http") or {}).get("routers") or {})
        after = set((want.get("http") or {}).get("routers") or {})
        changed = len(before ^ after) or 1
        self.log.info("route file written", file=self.dynamic_config_file, routes=len(after), changed=changed)
        return changed

    async def publish(self, routespec: str, target: str, data: dict[str, Any]) -> None:
        try:
            self._sync()
        except OSError as exc:
            self.log.warning("route add failed; will retry", route=routespec, error=str(exc))
            self.wake()

    async def unpublish(self, routespec: str, target: str) -> None:
        try:
            self._sync()
        except OSError as exc:
            self.log.warning("route delete failed; will retry", route=routespec, error=str(exc))
            self.wake()

    async def reconcile_once(self) -> int:
        return self._sync()
