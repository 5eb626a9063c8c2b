"""Is the notebook server answering? A minimal HTTP/1.0 GET over its unix socket."""

from __future__ import annotations

import asyncio


async def http_status_over_unix(path: str, url_path: str, timeout: float = 5.0) -> int | None:
    """Return the HTTP status of ``GET url_path`` on the unix socket *path*, or None."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {url_path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode("utf-8", "surrogateescape"))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        writer.close()
