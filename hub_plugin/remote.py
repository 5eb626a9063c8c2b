"""Command runners: run a batch-system command locally or on the cluster's login node.

Both runners share one interface, so spawners and the Slurm poller do not care where the
batch system lives::

    exit_status, stdout, stderr = await runner.run(argv, input=None, env=None)

Contract common to both runners:

* ``argv`` is a list of strings; it is never interpreted by a local shell. Argument values must
  not be secret: they are visible in ``ps`` (and, for the remote runner, to sshd).
* ``input`` (optional) is written to the command's standard input, which is then closed.
* ``env`` (optional) adds environment variables for this command only. Values may be secrets:
  they never appear on a command line and are never logged (only the variable *names* may be).
* The result is a :class:`CommandResult` (a named tuple ``exit_status, stdout, stderr``; text).
  A non-zero exit status is returned, not raised. :class:`RunnerError` is raised only when the
  command could not be run at all (cannot connect, timeout, connection lost mid-command).

:class:`LocalRunner` uses an asyncio subprocess. :class:`LoginNodeRunner` keeps ONE pooled
asyncssh client connection to the login node that every spawner in the hub process shares; each
``run()`` opens one session channel on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import asyncssh

from node_agent.backoff import Backoff  # the project's one backoff (stdlib only)

__all__ = [
    "CommandResult",
    "CommandRunner",
    "RunnerError",
    "LocalRunner",
    "LoginNodeRunner",
    "Backoff",
]

_log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class CommandResult(NamedTuple):
    """Outcome of one command: exit status (``-N`` for "killed by signal N") and decoded output."""

    exit_status: int
    stdout: str
    stderr: str


class RunnerError(RuntimeError):
    """The command could not be run or its outcome is unknown (not: it ran and failed)."""


def _check_argv_env(argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("argv must be a non-empty list of strings")
    for a in argv:
        if not isinstance(a, str):
            raise ValueError("argv must contain only strings")
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name {str(name)[:64]!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL bytes")


class CommandRunner:
    """What the poller and the spawners need from a runner: :meth:`run`.

    Both runners share its front: the argument checks, the default timeout and the debug log
    line (variable names only, never values); each implements :meth:`_run` and counts
    ``commands_run``.
    """

    #: Start of the debug log line for each command.
    _log_label = "run"

    def __init__(self, *, default_timeout: float | None, log: logging.Logger | None):
        self.default_timeout = default_timeout
        self.log = log or _log
        self.commands_run = 0

    async def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run ``argv``; see the module docstring for the contract."""
        _check_argv_env(argv, env)
        self.log.debug("%s: %s (%d args, env names %s)", self._log_label, argv[0], len(argv) - 1, sorted(env or ()))
        return await self._run(argv, input, env, self.default_timeout if timeout is None else timeout)

    async def _run(
        self, argv: Sequence[str], input: str | None, env: Mapping[str, str] | None, timeout: float | None
    ) -> CommandResult:
        """Run checked arguments with the effective timeout (``None``: no limit)."""
        raise NotImplementedError


class LocalRunner(CommandRunner):
    """Run commands as local subprocesses (the hub runs on a cluster login node).

    ``env`` is merged over the hub's own environment (``os.environ``) and handed to the child
    directly (``execve``), so values are never on a command line.
    """

    _log_label = "local run"

    def __init__(self, *, default_timeout: float | None = 60.0, log: logging.Logger | None = None):
        super().__init__(default_timeout=default_timeout, log=log)

    async def _run(
        self, argv: Sequence[str], input: str | None, env: Mapping[str, str] | None, timeout: float | None
    ) -> CommandResult:
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        self.commands_run += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
            )
        except OSError as e:
            # e.g. command not found: report like a shell would, the command did not run
            return CommandResult(127, "", f"{argv[0]}: {e.strerror}\n")
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RunnerError(f"{argv[0]}: timed out after {timeout} s") from None
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        exit_status = await proc.wait()  # communicate() has waited already: this is the status
        return CommandResult(exit_status, out.decode(errors="replace"), err.decode(errors="replace"))


class _ClientWatcher(asyncssh.SSHClient):
    """Notices when the pooled connection drops, so the next call reconnects at once."""

    def __init__(self, owner: LoginNodeRunner):
        self._owner = owner

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_connection_lost(self, exc)


# Remote wrapper, run as the session command. sshd hands it to the login shell of the remote
# account; `bash -s` then reads its script from the channel's stdin, where run() writes
#     export NAME='value'     (one per variable, shell-quoted; values may span lines)
#     exec ARGV...            (shell-quoted)
# followed by the caller's input. bash reads a script from a pipe/socket one byte at a time, so it
# stops right after the `exec` line and the command inherits the rest of stdin as its input. A
# failing exec makes a non-interactive bash exit (127); it never goes on to interpret the input.
_REMOTE_WRAPPER = "exec bash --noprofile --norc -s"

#: The login-node client's fixed connection options: public-key authentication only (no agent,
#: password, keyboard-interactive or GSSAPI), no OpenSSH config files, AEAD or CTR ciphers, and
#: a dead connection noticed after three missed keepalives.
_CLIENT_POLICY: dict[str, Any] = {
    "agent_path": None,
    "password": None,
    "kbdint_auth": False,
    "gss_host": None,
    "preferred_auth": "publickey",
    "keepalive_count_max": 3,
    "encryption_algs": [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes256-ctr",
    ],
    "config": None,
}


def _stdin_script(argv: Sequence[str], env: Mapping[str, str] | None) -> str:
    lines = [f"export {name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    lines.append("exec " + shlex.join(argv) + " || exit 127")
    return "\n".join(lines) + "\n"


class LoginNodeRunner(CommandRunner):
    """Run commands on the cluster's login node over ONE shared, pooled SSH connection.

    Security and transport contract:

    * The host key is always verified: against ``known_hosts`` (a file path in OpenSSH format;
      for a non-22 port the entry is ``[host]:port``) or against ``host_keys`` (pinned public keys
      in OpenSSH one-line format). Creating a runner with neither is an error.
    * The client authenticates with the private key file(s) in ``client_keys`` only (no agent,
      no password prompts).
    * Environment values never go on the remote command line (sshd logs and ``ps`` on the login
      node would show them) and SSH "env" requests are not used (stock sshd accepts only
      ``AcceptEnv`` names). Instead the session command is the fixed ``bash -s`` wrapper above:
      ``export NAME='value'`` lines and the ``exec`` line travel over the encrypted channel's
      stdin, followed by the caller's ``input``. The remote account needs ``bash``.
    * Connection: opened lazily by the first ``run()``; concurrent first calls wait on one lock,
      so exactly one connection is opened. When it drops, the next ``run()`` reconnects with
      capped, jittered exponential backoff (:class:`Backoff`), retrying only transient errors;
      bad credentials or an unknown host key fail at once with :class:`RunnerError`.
    * A command is retried on a fresh connection only when its session channel could not be
      opened (nothing ran). If the connection is lost mid-command, ``RunnerError`` is raised:
      the command may or may not have taken effect (an ``sbatch`` may have submitted), and
      re-running it blindly could duplicate a job.
    * At most ``max_sessions`` commands run at once (each is one session channel); keep it below
      the login node's sshd ``MaxSessions``, which refuses channels beyond it. ``None``: no limit.

    ``connections_opened`` counts successful SSH connections (for tests and metrics).
    """

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        username: str | None = None,
        client_keys: Sequence[str] | str = (),
        known_hosts: str | None = None,
        host_keys: Sequence[str] | str = (),
        connect_timeout: float = 15.0,
        keepalive_interval: float = 30.0,
        default_timeout: float | None = 120.0,
        max_sessions: int | None = None,
        backoff: Backoff | None = None,
        connect_attempts: int = 6,
        log: logging.Logger | None = None,
    ):
        if isinstance(client_keys, str):
            client_keys = [client_keys]
        if isinstance(host_keys, str):
            host_keys = [host_keys]
        if not client_keys:
            raise ValueError("LoginNodeRunner: client_keys must name at least one private key file")
        if not known_hosts and not host_keys:
            raise ValueError(
                "LoginNodeRunner: set known_hosts (file) or host_keys (pinned public keys); "
                "host key verification cannot be turned off"
            )
        super().__init__(default_timeout=default_timeout, log=log)
        self._log_label = f"remote run on {host}"
        self.host = host
        self.port = port
        self.username = username
        self.client_keys = list(client_keys)
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.backoff = backoff or Backoff()
        self.connect_attempts = connect_attempts  # connection attempts per run() before giving up
        if host_keys:
            pinned = [asyncssh.import_public_key(k) for k in host_keys]
            self._known_hosts: object = (pinned, [], [])
        else:
            self._known_hosts = known_hosts
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _ClientWatcher | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.connections_opened = 0
        self._sessions = asyncio.Semaphore(max_sessions) if max_sessions else None

    # -- connection pool (of one) ---------------------------------------------------------------

    def _on_connection_lost(self, client: _ClientWatcher, exc: Exception | None) -> None:
        if client is self._client:
            self.log.info(
                "login node connection to %s:%d closed%s",
                self.host,
                self.port,
                f": {type(exc).__name__}" if exc else "",
            )
            self._conn = None
            self._client = None

    async def _connect_once(self) -> asyncssh.SSHClientConnection:
        client = _ClientWatcher(self)
        conn, _ = await asyncio.wait_for(
            asyncssh.create_connection(
                lambda: client,
                self.host,
                self.port,
                username=self.username,
                client_keys=self.client_keys,
                known_hosts=self._known_hosts,
                keepalive_interval=self.keepalive_interval,
                **_CLIENT_POLICY,
            ),
            self.connect_timeout,
        )
        self._client = client
        return conn

    async def connection(self) -> asyncssh.SSHClientConnection:
        """Return the shared connection, opening it (with backoff) if there is none."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._lock:
            if self._closed:
                raise RunnerError("LoginNodeRunner is closed")
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            last: BaseException | None = None
            self.backoff.reset()
            for attempt in range(self.connect_attempts):
                if attempt:
                    delay = self.backoff.next_delay()
                    self.log.warning(
                        "login node %s:%d unreachable (%s), retry %d/%d in %.1f s",
                        self.host,
                        self.port,
                        _describe(last),
                        attempt,
                        self.connect_attempts - 1,
                        delay,
                    )
                    await asyncio.sleep(delay)
                try:
                    conn = await self._connect_once()
                except (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable) as e:
                    # configuration problem: retrying cannot help
                    raise RunnerError(
                        f"SSH to {self.host}:{self.port} refused: {_describe(e)} "
                        "(check client_keys / known_hosts / host_keys)"
                    ) from None
                except (OSError, asyncio.TimeoutError, asyncssh.Error) as e:
                    last = e
                    continue
                self._conn = conn
                self.connections_opened += 1
                self.log.info(
                    "login node connection %d opened to %s:%d",
                    self.connections_opened,
                    self.host,
                    self.port,
                )
                return conn
            raise RunnerError(
                f"cannot connect to login node {self.host}:{self.port} after "
                f"{self.connect_attempts} attempts: {_describe(last)}"
            )

    def drop_connection(self) -> None:
        """Abort the current connection (the next run() reconnects). For admins and tests."""
        conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.abort()

    async def close(self) -> None:
        """Close the shared connection; further run() calls raise RunnerError."""
        async with self._lock:
            self._closed = True
            conn, self._conn, self._client = self._conn, None, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def __aenter__(self) -> LoginNodeRunner:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- commands -------------------------------------------------------------------------------

    async def _run(
        self, argv: Sequence[str], input: str | None, env: Mapping[str, str] | None, timeout: float | None
    ) -> CommandResult:
        """Run ``argv`` on the login node; see the class docstring for the contract."""
        async with self._sessions or contextlib.nullcontext():
            return await self._run_in_session(argv, input, env, timeout)

    async def _run_in_session(
        self, argv: Sequence[str], input: str | None, env: Mapping[str, str] | None, timeout: float | None
    ) -> CommandResult:
        stdin_data = _stdin_script(argv, env) + (input or "")
        for attempt in (0, 1):
            conn = await self.connection()
            try:
                process = await asyncio.wait_for(
                    conn.create_process(_REMOTE_WRAPPER, encoding="utf-8", errors="replace"),
                    self.connect_timeout,
                )
            except asyncssh.ChannelOpenError as e:
                # sshd refused this channel (e.g. MaxSessions): the connection is fine, keep it
                if attempt:
                    raise RunnerError(f"cannot open a session on {self.host}: {_describe(e)}") from None
                await asyncio.sleep(0.2)
                continue
            except (asyncssh.ConnectionLost, OSError, asyncio.TimeoutError) as e:
                # the command has not started: safe to retry once on a fresh connection
                if conn is self._conn:
                    self.drop_connection()
                if attempt:
                    raise RunnerError(f"cannot open a session on {self.host}: {_describe(e)}") from None
                continue
            break
        self.commands_run += 1
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(stdin_data), timeout)
        except asyncio.TimeoutError:
            process.close()
            raise RunnerError(f"{argv[0]} on {self.host}: timed out after {timeout} s") from None
        except (asyncssh.Error, OSError) as e:
            process.close()
            raise RunnerError(
                f"{argv[0]} on {self.host}: connection lost mid-command ({_describe(e)}); outcome unknown"
            ) from None
        except BaseException:
            process.close()
            raise
        status = process.exit_status
        if status is None:
            if process.exit_signal:
                status = -_signal_number(process.exit_signal[0])
            else:
                raise RunnerError(f"{argv[0]} on {self.host}: no exit status (connection lost?); outcome unknown")
        return CommandResult(status, stdout or "", stderr or "")


def _signal_number(name: str) -> int:
    import signal

    try:
        return int(getattr(signal, "SIG" + name))
    except (AttributeError, TypeError, ValueError):
        return 255


def _describe(exc: BaseException | None) -> str:
    """Short, single-line description of an exception for logs (length-capped)."""
    if exc is None:
        return "unknown error"
    text = str(exc).replace("\n", " ").strip()
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:200]
