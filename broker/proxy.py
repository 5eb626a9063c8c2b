"""Publishing session routes to the proxy and keeping them there: the plug point and CHP.

``c.Broker.route_publisher_class`` chooses how (:func:`resolve_publisher`): ``chp`` (the default,
:class:`ChpRoutePublisher`, below), ``traefik`` (:class:`broker.traefik.TraefikRoutePublisher`,
a file of Traefik's file provider), ``none`` (no publisher: the hub's own ``Proxy`` class adds the
routes when the spawner returns, the broker only keeps the ports), or the import name of a
:class:`RoutePublisher` subclass. Every publisher keeps the proxy's table equal to the ready
sessions (``desired()``), so what the hub's route check expects and what the broker keeps agree.

CHP:

Route paths follow JupyterHub's own CHP proxy exactly (``/user/zoe/`` is stored by CHP as
``/user/zoe``; already-escaped characters in the routespec are sent as they are), so the
hub's ``check_routes`` sees the broker's routes as its own and leaves them alone.

Retry policy: connection errors and 5xx are transient (the reconcile loop tries again);
401/403/4xx are configuration errors and are logged with the reason.

Ownership: the broker's routes carry ``"jupyterhub": True`` (so the hub's ``check_routes``
treats them as its own) and ``ROUTE_TAG_KEY`` with the broker's tag. The reconciler deletes
tagged routes that no ready session wants; it never deletes a route without its tag (the hub's,
services', other brokers', an administrator's).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import quote, unquote

import aiohttp
import yarl
from traitlets import Float
from traitlets.config import Config, Configurable
from traitlets.utils.importstring import import_item

from .log import get_logger
from .options import minimum, refuse_unknown

#: The key in a route's data whose value names the broker that published it.
ROUTE_TAG_KEY = "broker"


class ProxyError(Exception):
    """CHP answered with an error status (``status``) or could not be reached (``status=0``)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"CHP {status or 'unreachable'}: {message}")
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status >= 500


def chp_path(routespec: str) -> str:
    """JupyterHub's routespec → CHP path (``/user/zoe/`` → ``/user/zoe``)."""
    if routespec != "/" and routespec.endswith("/"):
        return routespec[:-1]
    return routespec


def chp_key(routespec: str) -> str:
    """The key CHP lists this route under: its path, unescaped (CHP's JSON keys are)."""
    return unquote(chp_path(routespec))


class ChpClient:
    """A small client of CHP's REST API (``Authorization: token T``)."""

    def __init__(self, api_url: str, token: str, timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        url = yarl.URL(self.api_url + "/api/routes" + path, encoded=True)
        headers = {"Authorization": f"token {self._token}"}
        data = None if body is None else json.dumps(body)
        try:
            async with self._http.request(method, url, data=data, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ProxyError(resp.status, text[:200])
                return json.loads(text) if text else None
        except aiohttp.ClientError as exc:
            raise ProxyError(0, str(exc)) from None
        except asyncio.TimeoutError:
            raise ProxyError(0, "timeout") from None

    async def add_route(self, routespec: str, target: str, data: dict[str, Any]) -> None:
        await self._request("POST", chp_path(routespec), {"target": target, **data})

    async def delete_route(self, routespec: str) -> None:
        await self._request("DELETE", chp_path(routespec))

    async def delete_key(self, key: str) -> None:
        """Delete the route CHP lists under *key* (as :meth:`get_routes` returns it; unescaped).
        A route that is already gone is not an error."""
        try:
            await self._request("DELETE", quote(key, safe="/"))
        except ProxyError as exc:
            if exc.status != 404:
                raise

    async def get_routes(self) -> dict[str, dict[str, Any]]:
        """All routes as ``{chp_key: {"target": ..., **data}}`` (keys unescaped)."""
        return await self._request("GET", "") or {}

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


DesiredRoutes = Callable[[], dict[str, tuple[str, dict[str, Any]]]]


#: ``c.Broker.route_publisher_class`` short names -> import names (None: publish no routes).
PUBLISHERS: dict[str, str | None] = {
    "chp": "broker.proxy.ChpRoutePublisher",
    "traefik": "broker.traefik.TraefikRoutePublisher",
    "none": None,
}


def resolve_publisher(name: str) -> type[RoutePublisher] | None:
    """The publisher class *name* stands for (a short name of :data:`PUBLISHERS` or the import
    name of a :class:`RoutePublisher` subclass); None for ``none``. ValueError otherwise."""
    key = name.strip()
    path = PUBLISHERS.get(key.lower(), key)
    if path is None:
        return None
    try:
        cls = import_item(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"not one of {', '.join(PUBLISHERS)} nor an importable class: {name!r} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, RoutePublisher)):
        raise ValueError(f"{name!r} is not a RoutePublisher subclass")
    return cls


def publisher_needs_chp(config: Config) -> bool:
    """Whether the publisher that *config*'s ``Broker.route_publisher_class`` names (default
    ``chp``) talks to CHP; ValueError for a name that names no publisher."""
    section = config.get("Broker") or {}
    cls = resolve_publisher(str(section.get("route_publisher_class", "chp")))
    return cls is not None and cls.needs_chp


class RoutePublisher(Configurable):
    """Keeps a proxy's routes equal to what the session table wants (``c.RoutePublisher.<name>``
    applies to every publisher); subclasses say how to read and write the proxy.

    ``desired()`` returns ``{routespec: (target, data)}`` for every ready session. The broker
    calls :meth:`publish` when a session becomes ready and :meth:`unpublish` once it is closed
    (the store is written first, so ``desired()`` already says so); :meth:`run` reconciles every
    ``reconcile_interval`` seconds or when woken (:meth:`wake`); :meth:`close` at the end.
    Transient failures (:class:`ProxyError` with ``transient``, ``OSError``) are logged and
    retried by the next pass.
    """

    reconcile_interval = Float(
        5.0, help="Seconds between comparisons of the proxy's routes with the session table."
    ).tag(config=True)

    _positive = minimum({"reconcile_interval": 0}, exclusive=True)

    #: whether the publisher needs the CHP client (``BrokerApp.proxy_api_url``/``proxy_auth_token``)
    needs_chp: ClassVar[bool] = False

    def __init__(self, *, desired: DesiredRoutes, tag: str = "", **kwargs: Any):
        """*kwargs*: options (traits) and the ``parent``/``config`` of a Configurable."""
        refuse_unknown(type(self), kwargs)
        super().__init__(**kwargs)
        self.desired = desired
        self.tag = tag
        self.log = get_logger(component="routes")
        self._wake = asyncio.Event()
        self.removed = 0  # stale routes deleted so far

    async def publish(self, routespec: str, target: str, data: dict[str, Any]) -> None:
        """Add one route now; on failure the reconcile loop retries."""
        raise NotImplementedError

    async def unpublish(self, routespec: str, target: str) -> None:
        """Remove the route of a session that is no longer ready (never someone else's route)."""
        raise NotImplementedError

    async def reconcile_once(self) -> int:
        """One pass; returns the number of routes repaired (added, fixed or removed)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the publisher holds (connections); routes stay where they are."""

    async def run(self) -> None:
        """Reconcile every ``reconcile_interval`` seconds (or sooner when woken) until cancelled."""
        while True:
            try:
                await self.reconcile_once()
            except ProxyError as exc:
                self.log.warning("reconcile failed", error=str(exc), transient=exc.transient)
            except OSError as exc:
                self.log.warning("reconcile failed", error=str(exc), transient=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.reconcile_interval)
            except asyncio.TimeoutError:
                pass

    def wake(self) -> None:
        """Reconcile now (not at the end of the interval)."""
        self._wake.set()


class ChpRoutePublisher(RoutePublisher):
    """Keeps CHP's routes equal to what the session table wants (``c.Broker.route_publisher_class = "chp"``).

    A reconcile pass adds missing routes, fixes wrong targets, and deletes routes tagged with *tag*
    (under :data:`ROUTE_TAG_KEY`) that no ready session wants: a stale route of the broker's is
    gone within one ``reconcile_interval``. Routes without the tag are never deleted here.
    """

    needs_chp = True

    def __init__(self, *, chp: ChpClient, desired: DesiredRoutes, tag: str = "", **kwargs: Any):
        """*kwargs*: options (traits) and the ``parent``/``config`` of a Configurable."""
        super().__init__(desired=desired, tag=tag, **kwargs)
        self.chp = chp

    async def publish(self, routespec: str, target: str, data: dict[str, Any]) -> None:
        """Add one route now; on failure the reconcile loop retries."""
        try:
            await self.chp.add_route(routespec, target, data)
            self.log.info("route added", route=routespec, target=target)
        except ProxyError as exc:
            self.log.warning("route add failed; will retry", route=routespec, error=str(exc))
            self._wake.set()

    async def unpublish(self, routespec: str, target: str) -> None:
        """Delete the route if it still points at *target* (never someone else's route)."""
        try:
            routes = await self.chp.get_routes()
            current = routes.get(chp_key(routespec))
            if current is not None and current.get("target") == target:
                await self.chp.delete_route(routespec)
                self.log.info("route deleted", route=routespec, target=target)
        except ProxyError as exc:
            self.log.warning("route delete failed", route=routespec, error=str(exc))

    async def reconcile_once(self) -> int:
        """One pass; returns the number of routes repaired (added, fixed or removed)."""
        have = await self.chp.get_routes()
        want = self.desired()  # read after CHP answered: a session made ready meanwhile is in it
        repaired = 0
        for routespec, (target, data) in want.items():
            cur = have.get(chp_key(routespec))
            if cur is None or cur.get("target") != target:
                await self.chp.add_route(routespec, target, data)
                repaired += 1
                self.log.info(
                    "route restored", route=routespec, target=target, was=None if cur is None else cur.get("target")
                )
        if self.tag:
            wanted = {chp_key(r) for r in want}
            stale = [k for k, r in have.items() if r.get(ROUTE_TAG_KEY) == self.tag and k not in wanted]
            for key in stale:
                # asked again before each delete (the awaits above let sessions become ready);
                # a route re-added in the instant between is restored by the next pass
                if key in {chp_key(r) for r in self.desired()}:
                    continue
                await self.chp.delete_key(key)
                repaired += 1
                self.removed += 1
                self.log.info("stale route removed", route=key, target=have[key].get("target"))
        return repaired

    async def close(self) -> None:
        await self.chp.close()
