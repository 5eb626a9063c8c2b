"""How ``node-agent launch`` fails: exit codes (``sysexits.h``) and the error that carries one.

Each step raises :class:`LaunchError` with the message to log and the code launch exits with;
``docs/hpc-config.md`` lists the codes for admins.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64  # bad command line, bad WebDAV input from the job environment
EX_NOUSER = 67  # unusable $JUPYTERHUB_USER
EX_UNAVAILABLE = 69  # runtime or image missing, load_command failed, a required mount failed
EX_SOFTWARE = 70
EX_CANTCREAT = 73  # home or overlay problem
EX_MAINTENANCE = 75
EX_CONFIG = 78  # configuration error (including an isolation problem)


class LaunchError(Exception):
    """A launch step failed; ``code`` is the exit status launch ends with."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
