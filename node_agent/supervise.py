"""Running the server command as a child of ``node-agent launch`` (instead of exec'ing it).

Launch stays the parent only when something must happen after the command exits (unmounting
the WebDAV share it mounted). :func:`run_supervised` then behaves like exec as far as the batch
system can tell: the job's signals reach the command, and launch exits with the command's own
status.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from types import FrameType

log = logging.getLogger(__name__)

#: The signals passed on to the child (what batch systems send a job: stop, walltime warning).
FORWARD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def exec_failed(program: str, error: OSError) -> int:
    """Report that ``program`` could not be started (on stderr, the job output) and return the
    shell's status for it: 127 when it does not exist, 126 otherwise."""
    print(f"node-agent launch: cannot execute {program}: {error.strerror}", file=sys.stderr)
    return 127 if isinstance(error, FileNotFoundError) else 126


class _Forwarder:
    """The signal handler: passes signals on to the child; holds those that arrive before it
    exists, drops those that arrive after it exited."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.done = False
        self.pending: list[int] = []

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.done:
            return
        if self.child is None:
            self.pending.append(signum)
            return
        try:
            self.child.send_signal(signum)
        except OSError:
            pass

    def started(self, child: subprocess.Popen[bytes]) -> None:
        """The child exists: signals go to it from now on, the held ones first."""
        self.child = child
        for sig in self.pending:
            self(sig, None)


def run_supervised(
    argv: list[str], env: Mapping[str, str], after: Callable[[], object], *, pass_fds: tuple[int, ...] = ()
) -> int:
    """Run ``argv`` as a child, pass ``FORWARD_SIGNALS`` on to it, wait, call ``after()``
    (the unmount), and return the child's exit status (128+N if it died by signal N).

    Signals this process ignores (SIG_IGN, e.g. SIGINT for a background job) stay ignored, so
    the child inherits them exactly as it would through exec. Signals arriving after the child
    exited (during the unmount) are swallowed: the unmount must finish.
    """
    forward = _Forwarder()
    previous = {}
    for sig in FORWARD_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, forward)
    try:
        try:
            child = subprocess.Popen(argv, env=dict(env), pass_fds=pass_fds)
        except OSError as e:
            status = exec_failed(argv[0], e)
            log.error("cannot execute %s: %s", os.path.basename(argv[0]), e.strerror)
        else:
            forward.started(child)
            log.info(
                "started %s as pid %d (supervised: the WebDAV share is unmounted when it exits)",
                os.path.basename(argv[0]),
                child.pid,
            )
            status = exit_status(child.wait())
            log.info("%s exited with status %d", os.path.basename(argv[0]), status)
        forward.done = True
        try:
            after()
        except Exception:  # the child's status must still be returned
            log.exception("webdav: unmount step failed")
        return status
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["FORWARD_SIGNALS", "exec_failed", "exit_status", "run_supervised"]
