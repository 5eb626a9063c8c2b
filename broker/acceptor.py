"""The agents' SSH port: the broker's own accept loop in front of asyncssh.

Admission control (``broker/limits.py``, whose docstring states the contract) runs here, on the
bare accepted socket, before asyncssh builds any connection state. For each accepted connection
it decides:

- *admit*: hand the socket to asyncssh now;
- *wait*: its source is throttled — keep the bare socket (no banner, nothing read; this module
  only peeks at its first bytes with ``MSG_PEEK``) until :meth:`AdmissionControl.due` admits it;
  a pump task sleeps until the next admission is due (:meth:`AdmissionControl.next_due`);
- *refuse*: close it at once (one ``accept()`` and one ``close()``; the client sees no banner).

The total pre-auth cap *paces* accepting rather than refusing: while ``max_preauth_total``
connections are between accept and authentication, the loop stops accepting and new connections
wait in the kernel's listen queue (``backlog``) until a slot frees — so 10,000 agents reconnecting
at once after a broker restart queue up instead of being turned away. Running out of file
descriptors pauses accepting for a moment instead of spinning.

The listening socket sets ``TCP_DEFER_ACCEPT`` (Linux): the kernel hands over a connection once
its client has sent something — SSH clients send their identification line at once — or after
:data:`DEFER_ACCEPT_SECONDS`. So a silent connection costs the broker nothing for that long, and a
connection that *is* handed over early arrives already identified (which rule 3 of
``broker/limits.py`` ranks first).

Contract: every admitted socket becomes an asyncssh server connection whose server object is
made by ``options.protocol_factory`` (the broker's ``AgentSSHServer``), which must call
``AdmissionControl.attach`` when it is made and ``AdmissionControl.left_preauth`` when its
credential is verified or it closes.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

import asyncssh

from wire.tasks import TaskOwner

from .limits import AdmissionControl, Probe, classify_first_bytes

#: Kernel listen queue for the agents' port (clamped by net.core.somaxconn).
DEFAULT_BACKLOG = 4096
#: Seconds the kernel holds a connection whose client has sent nothing before handing it over.
DEFER_ACCEPT_SECONDS = 1
_FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def server_options(**kwargs: Any) -> asyncssh.SSHServerConnectionOptions:
    """asyncssh server options, built once and shared by every accepted connection."""
    construct = getattr(asyncssh.SSHServerConnectionOptions, "construct", None)
    if construct is not None:  # asyncssh >= 2.19: options are built by an async classmethod
        return await construct(**kwargs)
    return asyncssh.SSHServerConnectionOptions(**kwargs)  # pragma: no cover - older asyncssh


class _Parked:
    """A waiting connection: the bare accepted socket (implements ``limits.Waiting``)."""

    __slots__ = ("sock", "addr", "_on_refused")

    def __init__(self, sock: socket.socket, addr: Any, on_refused: Callable[[], None]):
        self.sock = sock
        self.addr = addr
        self._on_refused = on_refused

    def probe(self) -> Probe:
        try:
            data: bytes | None = self.sock.recv(16, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            return "gone"
        return classify_first_bytes(data)

    def close(self, refused: bool = True) -> None:
        self.sock.close()
        if refused:
            self._on_refused()


class AgentAcceptor:
    """Listens on the agents' SSH port and hands admitted connections to asyncssh."""

    def __init__(
        self,
        admission: AdmissionControl,
        options: asyncssh.SSHServerConnectionOptions,
        log: Any,
        on_refused: Callable[[], None] = lambda: None,
    ):
        self.admission = admission
        self.options = options
        self.log = log.bind(component="ssh")
        self.on_refused = on_refused
        self.sock: socket.socket | None = None
        self._tasks = TaskOwner(on_error=self._loop_failed)  # the accept loop and the pump
        self._closing = False
        self._last_resource_warning = -1e9
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()  # the pump: something may be due
        admission.on_room = self._on_room
        if getattr(options, "login_timeout", 0):  # a waiting client's clock runs too
            admission.max_wait = float(options.login_timeout)

    def _on_room(self) -> None:
        self._room.set()
        self._wake.set()

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    async def start(self, host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
        self.sock.setblocking(False)
        self._tasks.spawn(self._accept_loop())
        self._tasks.spawn(self._pump())

    def _loop_failed(self, exc: BaseException) -> None:
        self.log.error("agent accept loop failed; no new agent connections", error=repr(exc))

    def close(self) -> None:
        """Stop accepting and close waiting connections (admitted ones are not affected)."""
        self._closing = True  # (also ends the loops if a cancellation is lost in wait_for, 3.11)
        self._tasks.cancel()
        if self.sock is not None:
            self.sock.close()
        self.admission.close_waiting()

    async def wait_closed(self) -> None:
        """Return once the accept loop has ended (after :meth:`close`)."""
        await self._tasks.close()

    def _factory(self) -> asyncssh.SSHServerConnection:
        return asyncssh.SSHServerConnection(asyncio.get_running_loop(), self.options)

    async def _hand_over(self, source: str, sock: socket.socket, addr: Any) -> None:
        """Make an admitted socket an asyncssh server connection (it is counted as pre-auth)."""
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(self._factory, sock)
        except OSError as exc:  # the peer went away between accept and setup
            sock.close()
            self.admission.left_preauth(source)
            self.log.info("agent connection lost during setup", conn=f"{addr[0]}:{addr[1]}", error=str(exc))

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        listen_sock = self.sock
        while not self._closing:
            ad = self.admission
            while ad.max_preauth_total and ad.preauth_total >= ad.max_preauth_total:
                self._room.clear()
                await self._room.wait()  # set by left_preauth when a slot frees
            try:
                conn_sock, addr = await loop.sock_accept(listen_sock)
            except OSError as exc:
                if exc.errno in _FD_ERRNOS:
                    now = loop.time()
                    if now - self._last_resource_warning >= 10.0:  # at most one line per 10 s
                        self._last_resource_warning = now
                        self.log.warning(
                            "cannot accept agent connections: out of resources; pausing 0.5 s",
                            error=exc.strerror,
                            hint="raise the broker's file descriptor limit",
                        )
                    await asyncio.sleep(0.5)
                    continue
                if listen_sock.fileno() < 0:
                    return
                raise
            source = str(addr[0])
            verdict, why = ad.arrive(source, _Parked(conn_sock, addr, self.on_refused))
            if verdict == "admit":
                await self._hand_over(source, conn_sock, addr)
                continue
            if verdict == "wait":
                self._wake.set()
                if ad.should_log(source):
                    self.log.warning(
                        "source throttled: connection waits",
                        conn=f"{addr[0]}:{addr[1]}",
                        reason=why,
                        waiting=ad.waiting(source),
                        evicted_total=ad.evicted_total,
                    )
            else:
                conn_sock.close()  # before the banner: the client reads EOF, no SSH state was made
                self.on_refused()
                if ad.should_log(source):
                    self.log.warning(
                        "connection refused", conn=f"{addr[0]}:{addr[1]}", reason=why, refused_total=ad.refused_total
                    )
            # sock_accept does not yield while connections are pending: let the pump and the rest
            # of the broker run between the connections of a flood
            await asyncio.sleep(0)

    async def _pump(self) -> None:
        """Admit waiting connections as :meth:`AdmissionControl.due` allows."""
        ad = self.admission
        while not self._closing:
            self._wake.clear()
            admitted = ad.due()
            for source, parked in admitted:
                assert isinstance(parked, _Parked)
                await self._hand_over(source, parked.sock, parked.addr)
            delay = ad.next_due()
            if delay == 0 and not admitted:
                delay = 0.05  # defensive: never spin
            if delay is None or delay > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
