"""The agents' SSH port: the broker's own accept loop in front of asyncssh.

Admission control (``broker/limits.py``) runs here, on the bare accepted socket, before asyncssh
builds any connection state, so a refused connection costs one ``accept()`` and one ``close()``
(it sees no banner). The total pre-auth cap *paces* accepting rather than refusing: while
``max_preauth_total`` connections are between accept and authentication, the loop stops
accepting and new connections wait in the kernel's listen queue (``backlog``) until a slot frees
— so 10,000 agents reconnecting at once after a broker restart queue up instead of being turned
away, backing off and trying again (which cost both sides CPU for nothing). Per-source caps and
penalties still refuse at once. Running out of file descriptors pauses accepting for a moment
instead of spinning.

Contract: every admitted socket becomes an asyncssh server connection whose server object is
made by ``options.protocol_factory`` (the broker's ``AgentSSHServer``), which must call
``AdmissionControl.left_preauth`` when it authenticates or closes.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any, Callable

import asyncssh

from .limits import AdmissionControl

#: Kernel listen queue for the agents' port (clamped by net.core.somaxconn).
DEFAULT_BACKLOG = 4096
_FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def server_options(**kwargs: Any) -> asyncssh.SSHServerConnectionOptions:
    """asyncssh server options, built once and shared by every accepted connection."""
    construct = getattr(asyncssh.SSHServerConnectionOptions, "construct", None)
    if construct is not None:  # asyncssh >= 2.19: options are built by an async classmethod
        return await construct(**kwargs)
    return asyncssh.SSHServerConnectionOptions(**kwargs)  # pragma: no cover - older asyncssh


class AgentAcceptor:
    """Listens on the agents' SSH port and hands admitted connections to asyncssh."""

    def __init__(self, admission: AdmissionControl, options: asyncssh.SSHServerConnectionOptions, log: Any,
                 on_refused: Callable[[], None] = lambda: None):
        self.admission = admission
        self.options = options
        self.log = log.bind(component="ssh")
        self.on_refused = on_refused
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_resource_warning = -1e9
        self._room = asyncio.Event()
        self._room.set()
        admission.on_room = self._room.set

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    async def start(self, host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
        self.sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("agent accept loop failed; no new agent connections", error=repr(task.exception()))

    def close(self) -> None:
        """Stop accepting (connections already handed to asyncssh are not affected)."""
        if self._task is not None:
            self._task.cancel()
        if self.sock is not None:
            self.sock.close()

    async def wait_closed(self) -> None:
        """Return once the accept loop has ended (after :meth:`close`)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        listen_sock = self.sock
        factory = lambda: asyncssh.SSHServerConnection(loop, self.options)  # noqa: E731
        while True:
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
                        self.log.warning("cannot accept agent connections: out of resources; pausing 0.5 s",
                                         error=exc.strerror, hint="raise the broker's file descriptor limit")
                    await asyncio.sleep(0.5)
                    continue
                if listen_sock.fileno() < 0:
                    return
                raise
            source = str(addr[0])
            why = ad.admit(source)
            if why is not None:
                conn_sock.close()  # before the banner: the client reads EOF, no SSH state was made
                self.on_refused()
                if ad.should_log(source):
                    self.log.warning("connection refused", conn=f"{addr[0]}:{addr[1]}", reason=why,
                                     refused_total=ad.refused_total)
                continue
            try:
                conn_sock.setblocking(False)
                await loop.connect_accepted_socket(factory, conn_sock)
            except OSError as exc:  # the peer went away between accept and setup
                conn_sock.close()
                ad.left_preauth(source)
                self.log.info("agent connection lost during setup", conn=f"{addr[0]}:{addr[1]}", error=str(exc))
