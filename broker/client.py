"""An async client of the broker's REST API (used by the hub plugin and ``broker status``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp


class BrokerError(Exception):
    """The broker refused a request (``status`` >= 400) or was unreachable (``status`` 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"broker {'unreachable' if status == 0 else status}: {message}")
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status >= 500


class BrokerClient:
    def __init__(self, api_url: str, token: str, *, timeout: float = 30.0):
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        if self._http is None:
            connector = None
            url = self.api_url
            if url.startswith("unix:"):
                connector = aiohttp.UnixConnector(path=url[len("unix:") :])
            self._http = aiohttp.ClientSession(connector=connector)
        base = "http://broker" if self.api_url.startswith("unix:") else self.api_url
        try:
            async with self._http.request(
                method,
                base + path,
                params=params,
                data=None if body is None else json.dumps(body),
                headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
            ) as resp:
                text = await resp.text()
                data = json.loads(text) if text else {}
                if resp.status >= 400:
                    raise BrokerError(
                        resp.status, data.get("error", text[:200]) if isinstance(data, dict) else text[:200]
                    )
                return data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BrokerError(0, str(exc) or type(exc).__name__) from None

    async def create_session(self, user: str, server_name: str, routespec: str) -> dict[str, Any]:
        return await self.request(
            "POST", "/api/sessions", {"user": user, "server_name": server_name, "routespec": routespec}
        )

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/api/sessions/{quote(session_id, safe='')}")

    async def update_session(self, session_id: str, **fields: str) -> dict[str, Any]:
        return await self.request("PATCH", f"/api/sessions/{quote(session_id, safe='')}", fields)

    async def wait_session(self, session_id: str, states: str = "ready", timeout: float = 30.0) -> dict[str, Any]:
        return await self.request(
            "GET",
            f"/api/sessions/{quote(session_id, safe='')}/wait",
            params={"state": states, "timeout": str(timeout)},
            timeout=timeout + 10,
        )

    async def close_session(self, session_id: str, reason: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/api/sessions/{quote(session_id, safe='')}", params={"reason": reason})

    async def list_sessions(self, include_closed: bool = False) -> list[dict[str, Any]]:
        data = await self.request("GET", "/api/sessions", params={"all": "1"} if include_closed else None)
        return data["sessions"]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
