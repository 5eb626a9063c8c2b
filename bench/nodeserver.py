"""The benchmark's "notebook server": a minimal HTTP/1.1 keep-alive server on raw asyncio.

The same code serves every path (direct, our tunnel, OpenSSH, each behind CHP), so only the
transport differs. It listens on TCP (``--port=N``) or on a unix socket
(``--ServerApp.sock=PATH``, what the node agent appends); other ``--ServerApp.*`` options are
accepted and ignored. The last meaningful path segment decides the answer, so a CHP prefix
such as ``/user/NAME/`` does not matter:

- ``.../small``       13 bytes
- ``.../big/N``       N bytes (flow-controlled, 256 KiB writes)
- ``POST .../upload`` reads and discards the body, answers with its length
- anything else       the small answer (the agent's readiness probe hits ``/api``)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

CHUNK = b"\0" * (256 * 1024)
SMALL = b"hello, world\n"


class HttpProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.body_left = 0
        self.body_len = 0
        self.close_after = False
        self.paused = False
        self.big_left = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.body_left:
            n = min(len(data), self.body_left)
            self.body_left -= n
            data = data[n:]
            if self.body_left == 0:
                self._respond(str(self.body_len).encode())
        if data:
            self.buf += data
        self._parse()

    def _parse(self) -> None:
        while not self.body_left and not self.big_left:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    assert self.transport is not None
                    self.transport.close()
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
            lines = head.split("\r\n")
            parts = lines[0].split()
            if len(parts) < 3:
                assert self.transport is not None
                self.transport.close()
                return
            method, target, version = parts[0], parts[1], parts[2]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            conn = headers.get("connection", "").lower()
            self.close_after = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
            segs = [s for s in target.split("?")[0].split("/") if s]
            length = int(headers.get("content-length", "0") or 0)
            if method == "POST" and segs and segs[-1] == "upload":
                self.body_len = length
                n = min(len(self.buf), length)
                self.body_left = length - n
                self.buf = self.buf[n:]
                if self.body_left == 0:
                    self._respond(str(length).encode())
                continue
            self.buf = self.buf[length:]  # ignore other bodies
            if len(segs) >= 2 and segs[-2] == "big" and segs[-1].isdigit():
                n = int(segs[-1])
                self._head(n)
                self.big_left = n
                self._pump()
            else:
                self._respond(SMALL)

    def _head(self, n: int) -> None:
        assert self.transport is not None
        extra = b"Connection: close\r\n" if self.close_after else b""
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n%s\r\n" % (n, extra)
        )

    def _respond(self, body: bytes) -> None:
        assert self.transport is not None
        extra = b"Connection: close\r\n" if self.close_after else b""
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
        )
        if self.close_after:
            self.transport.close()

    def _pump(self) -> None:
        assert self.transport is not None
        while self.big_left and not self.paused and not self.transport.is_closing():
            n = min(self.big_left, len(CHUNK))
            self.transport.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.big_left -= n
        if not self.big_left:
            if self.close_after:
                self.transport.close()
            elif self.buf:
                self._parse()


async def serve(argv: list[str]) -> None:
    sock = port = None
    for a in argv:
        if a.startswith("--ServerApp.sock="):
            sock = a.split("=", 1)[1]
        elif a.startswith("--port="):
            port = int(a.split("=", 1)[1])
    loop = asyncio.get_running_loop()
    if sock:
        server = await loop.create_unix_server(HttpProtocol, sock)
        os.chmod(sock, 0o600)
        print(f"nodeserver: listening on {sock}", file=sys.stderr, flush=True)
    else:
        server = await loop.create_server(HttpProtocol, "127.0.0.1", port or 0)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1:]))
