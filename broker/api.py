"""The broker's REST API (aiohttp), for the hub plugin and admins.

Every route requires ``Authorization: Bearer <token>`` (``token <token>`` is accepted too);
the token is held only as a hash and compared in constant time. Errors are JSON
``{"error": "..."}``; bodies over ``MAX_BODY`` bytes, invalid UTF-8 or invalid JSON get 400.

Routes::

    POST   /api/sessions                 {user, server_name, routespec} -> 201 session + secret + ssh
    GET    /api/sessions                 -> {"sessions": [...]}   (?all=1 includes closed ones)
    GET    /api/sessions/{id}            -> session
    PATCH  /api/sessions/{id}            {job_id?, node?} -> session
    GET    /api/sessions/{id}/wait       ?state=ready&timeout=30 -> session (long-poll)
    DELETE /api/sessions/{id}            ?reason=... -> session (closed)
    GET    /api/health                   -> {"ok": true, ...}
    GET    /metrics                      -> Prometheus text format (see broker/metrics.py)

``/metrics`` takes the API token, or the optional read-only ``metrics_token``
(``c.BrokerApp.metrics_token``), which is valid for ``GET /metrics`` and nothing else.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .core import Broker, SessionNotFound
from .metrics import CONTENT_TYPE
from .secrets import hash_secret, verify_secret

MAX_BODY = 64 * 1024
MAX_WAIT = 300.0
MAX_NAME = 255


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _json({"error": e.message}, e.status)
    except SessionNotFound:
        return _json({"error": "no such session"}, 404)
    except web.HTTPException as e:
        if e.status >= 400:
            return _json({"error": e.reason}, e.status)
        raise


def _auth_middleware(token_hash: str, metrics_token_hash: str | None = None) -> Any:
    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() in ("bearer", "token") and verify_secret(token.strip(), token_hash)
        if not ok and metrics_token_hash and request.method == "GET" and request.path == "/metrics":
            ok = scheme.lower() in ("bearer", "token") and verify_secret(token.strip(), metrics_token_hash)
        if not ok:
            return _json({"error": "authentication required"}, 401)
        return await handler(request)

    return auth


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(400, f"request body over {MAX_BODY} bytes")
    # StreamReader.read(n) returns what is buffered (maybe one chunk), not n bytes: read to EOF
    raw = bytearray()
    while True:
        chunk = await request.content.read(MAX_BODY + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(400, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(bytes(raw).decode("utf-8")) if raw else {}
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _name(data: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = data.get(key, "" if not required else None)
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"{key}: a non-empty string is required")
    if len(value) > MAX_NAME or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise ApiError(400, f"{key}: too long or contains control characters")
    return value


class BrokerAPI:
    """Builds the aiohttp application around a :class:`Broker`."""

    def __init__(self, broker: Broker, api_token: str, ssh_public_host: str, metrics_token: str = ""):
        if not api_token:
            raise ValueError("an API token is required")
        self.broker = broker
        self.ssh_public_host = ssh_public_host
        metrics_hash = hash_secret(metrics_token) if metrics_token else None
        self.app = web.Application(
            middlewares=[_errors, _auth_middleware(hash_secret(api_token), metrics_hash)], client_max_size=MAX_BODY
        )
        r = self.app.router
        r.add_post("/api/sessions", self.create)
        r.add_get("/api/sessions", self.list)
        r.add_get("/api/sessions/{id}", self.get)
        r.add_patch("/api/sessions/{id}", self.patch)
        r.add_get("/api/sessions/{id}/wait", self.wait)
        r.add_delete("/api/sessions/{id}", self.delete)
        r.add_get("/api/health", self.health)
        r.add_get("/metrics", self.metrics)

    async def create(self, request: web.Request) -> web.Response:
        data = await _body(request)
        user = _name(data, "user")
        server_name = _name(data, "server_name", required=False)
        routespec = _name(data, "routespec")
        if not routespec.startswith("/"):
            raise ApiError(400, "routespec: must start with '/'")
        session, secret = await self.broker.create_session(user, server_name, routespec)
        body = session.public()
        body["secret"] = secret
        body["ssh"] = {
            "host": self.ssh_public_host,
            "port": self.broker.ssh_port,
            "host_key": self.broker.public_host_key,
            "fingerprint": self.broker.fingerprint,
        }
        return _json(body, 201)

    async def list(self, request: web.Request) -> web.Response:
        live_only = request.query.get("all", "") not in ("1", "true")
        return _json({"sessions": [s.public() for s in self.broker.store.list(live_only=live_only)]})

    async def get(self, request: web.Request) -> web.Response:
        return _json(self.broker.get(request.match_info["id"]).public())

    async def patch(self, request: web.Request) -> web.Response:
        data = await _body(request)
        fields = {}
        for key in ("job_id", "node"):
            if key in data:
                fields[key] = _name(data, key, required=False)
        if not fields:
            raise ApiError(400, "nothing to update (job_id, node)")
        return _json(self.broker.update(request.match_info["id"], **fields).public())

    async def wait(self, request: web.Request) -> web.Response:
        states = set(request.query.get("state", "ready").split(","))
        try:
            timeout = float(request.query.get("timeout", "30"))
            if math.isnan(timeout):
                raise ValueError(timeout)
            timeout = min(timeout, MAX_WAIT)
        except ValueError:
            raise ApiError(400, "timeout: must be a number of seconds") from None
        s = await self.broker.wait_for(request.match_info["id"], states, max(timeout, 0.0))
        return _json(s.public())

    async def delete(self, request: web.Request) -> web.Response:
        reason = request.query.get("reason", "closed by the hub")[:200]
        s = await self.broker.close_session(request.match_info["id"], reason)
        return _json(s.public())

    async def health(self, request: web.Request) -> web.Response:
        return _json(
            {"ok": True, "live_sessions": len(self.broker.listeners), "connected_agents": len(self.broker.agents)}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.broker.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
