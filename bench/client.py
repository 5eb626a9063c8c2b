"""The one HTTP client used for every path (blocking sockets: least client overhead in Python).

Requests/s at 32 connections uses ``wrk`` when it is installed, else :func:`rps_asyncio`
(the summary records which).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import statistics
import subprocess
import time

BUF = 1 << 20


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket, buf: bytearray) -> tuple[int, int]:
    """Read one response; returns (status, body length). *buf* holds leftover bytes."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    status = int(head.split(None, 2)[1])
    m = re.search(r"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    have = min(len(buf), length)
    del buf[:have]
    left = length - have
    if left:
        mv = memoryview(bytearray(min(BUF, left)))
        while left:
            n = s.recv_into(mv, min(len(mv), left))
            if not n:
                raise ConnectionError("connection closed mid-body")
            left -= n
    return status, length


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def keepalive_latency(port: int, prefix: str, n: int) -> dict[str, float]:
    """Sequential GETs of a small body on one keep-alive connection; ms."""
    s = _connect(port)
    buf = bytearray()
    req = f"GET {prefix}small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    times = []
    try:
        for i in range(n + 20):
            t0 = time.perf_counter()
            s.sendall(req)
            status, _ = _read_response(s, buf)
            dt = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"GET {prefix}small: status {status}")
            if i >= 20:  # warm-up
                times.append(dt * 1000)
    finally:
        s.close()
    return {"p50_ms": statistics.median(times), "p99_ms": _pct(times, 0.99), "n": n}


def newconn_latency(port: int, prefix: str, n: int) -> dict[str, float]:
    """Connect, GET a small body, close; ms for the whole exchange."""
    req = f"GET {prefix}small HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    times = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        s = _connect(port)
        try:
            s.sendall(req)
            status, _ = _read_response(s, bytearray())
        finally:
            s.close()
        dt = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"GET {prefix}small: status {status}")
        if i >= 5:
            times.append(dt * 1000)
    return {"p50_ms": statistics.median(times), "p99_ms": _pct(times, 0.99), "n": n}


def download(port: int, prefix: str, nbytes: int, path: str = "", headers: dict[str, str] | None = None) -> float:
    """MB/s (10^6 bytes) of one GET of *nbytes* (of ``big/N``, or of *path*), head to last byte."""
    path = path or f"big/{nbytes}"
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    s = _connect(port)
    try:
        t0 = time.perf_counter()
        s.sendall(f"GET {prefix}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        status, length = _read_response(s, bytearray())
        dt = time.perf_counter() - t0
    finally:
        s.close()
    if status != 200 or length != nbytes:
        raise RuntimeError(f"download of {prefix}{path}: status {status}, {length} bytes")
    return nbytes / dt / 1e6


def upload(port: int, prefix: str, nbytes: int) -> float:
    """MB/s of one POST of *nbytes*, until the server's answer (it has read them all)."""
    s = _connect(port)
    chunk = memoryview(b"\0" * BUF)
    try:
        t0 = time.perf_counter()
        s.sendall(
            f"POST {prefix}upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {nbytes}\r\n\r\n".encode()
        )
        left = nbytes
        while left:
            n = min(left, BUF)
            s.sendall(chunk[:n])
            left -= n
        buf = bytearray()
        status, _ = _read_response(s, buf)
        dt = time.perf_counter() - t0
    finally:
        s.close()
    if status != 200:
        raise RuntimeError(f"upload via {prefix}: status {status}")
    return nbytes / dt / 1e6


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def rps_wrk(
    port: int, prefix: str, conns: int, seconds: float, path: str = "small", headers: dict[str, str] | None = None
) -> dict[str, float]:
    hdr_args = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--latency",
            *hdr_args,
            f"http://127.0.0.1:{port}{prefix}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    errs = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    sock_errs = re.search(r"Socket errors:.*", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "rps": float(m.group(1)),
        "non_2xx": int(errs.group(1)) if errs else 0,
        "socket_errors": sock_errs.group(0) if sock_errs else "",
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
    }


async def _rps_async(
    port: int, prefix: str, conns: int, seconds: float, path: str = "small", headers: dict[str, str] | None = None
) -> dict[str, float]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    req = f"GET {prefix}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                w.write(req)
                head = await r.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await r.readexactly(int(m.group(1)) if m else 0)
                done += 1
        finally:
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return {"rps": done / (time.monotonic() - t0), "non_2xx": 0, "socket_errors": "", "p50_ms": float("nan")}


def rps(
    port: int, prefix: str, conns: int, seconds: float, path: str = "small", headers: dict[str, str] | None = None
) -> dict[str, float]:
    """Requests/s of GET *prefix* + *path* at *conns* keep-alive connections for *seconds*."""
    if have_wrk():
        return rps_wrk(port, prefix, conns, seconds, path, headers)
    return asyncio.run(_rps_async(port, prefix, conns, seconds, path, headers))
