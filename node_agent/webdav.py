"""The user's WebDAV share: mounted on the node before the container starts, bound in, and
unmounted after the server exits (``webdav.*`` in the HPC config).

The mount and unmount commands are argv templates run without a shell (stdin /dev/null): each
template item stays exactly one argument, whatever the substituted value holds. The share URL
(from the config or the job environment) is validated first; credentials come only from the
job environment (``webdav.credential_env``) and are handed to the mount command in its
environment, never on its argv. Failures are logged with the exit status and the tail of the
command's output, never with the environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping

from .hpc_model import HpcConfig, UserPaths
from .hpc_validate import validate_webdav_url
from .launch_errors import EX_UNAVAILABLE, EX_USAGE, LaunchError
from .templating import render_template

log = logging.getLogger(__name__)

MOUNTED = "mounted"  # mount_webdav: launch mounted the share (and should unmount it)
EXISTING = "existing"  # mount_webdav: already mounted by someone else (leave it alone)


def build_webdav_argv(config: HpcConfig, paths: UserPaths, url: str) -> list[str]:
    """The mount command for ``url``: each template item stays exactly one argv element."""
    validate_webdav_url(url)
    values = dict(url=url, mount_point=paths.webdav_mount_point, user=paths.safe_user, home=paths.home)
    return [render_template(a, **values) for a in config.webdav.mount_command]


def build_unmount_argv(config: HpcConfig, paths: UserPaths) -> list[str]:
    """``webdav.unmount_command`` with placeholders filled in (each one stays one argument)."""
    values = dict(mount_point=paths.webdav_mount_point, user=paths.safe_user, home=paths.home)
    return [render_template(a, **values) for a in config.webdav.unmount_command]


def mount_webdav(config: HpcConfig, paths: UserPaths, env: Mapping[str, str]) -> str:
    """Mount the share if configured. Returns ``MOUNTED`` (we mounted it), ``EXISTING``
    (it was mounted already) or ``""`` (no share: nothing to bind).

    Raises LaunchError for a bad URL or a missing credential (exit 64), and for a failed mount
    when ``webdav.required`` (exit 69); otherwise a failed mount is logged and skipped.
    """
    w = config.webdav
    url = env.get(w.url_env) or w.url
    if not url:
        log.info("webdav: no URL configured or in $%s; skipping", w.url_env)
        return ""
    try:
        argv = build_webdav_argv(config, paths, url)
    except ValueError as e:
        raise LaunchError(f"webdav: refusing URL from ${w.url_env}: {e}", EX_USAGE) from None
    mp = paths.webdav_mount_point
    if os.path.ismount(mp):
        log.info("webdav: %s is already mounted", mp)
        return EXISTING
    os.makedirs(mp, mode=0o700, exist_ok=True)
    menv = dict(env)
    for target, source in w.credential_env.items():
        if source not in env:
            raise LaunchError(
                f"webdav.credential_env: ${source} (for {target}) is not set in the job environment", EX_USAGE
            )
        menv[target] = env[source]
    ok, detail = _run_helper(argv, menv, w.timeout)
    if ok:
        log.info("webdav: mounted on %s", mp)
        return MOUNTED
    msg = f"webdav: mount command failed ({detail.replace(chr(10), ' ')})"
    if w.required:
        raise LaunchError(msg, EX_UNAVAILABLE)
    log.warning("%s; continuing without the share", msg)
    return ""


def unmount_webdav(config: HpcConfig, paths: UserPaths, env: Mapping[str, str]) -> bool:
    """Run ``webdav.unmount_command`` (no shell, stdin /dev/null). Failures are logged with
    the exit status and the command's output - never the environment. True on success."""
    argv = build_unmount_argv(config, paths)
    mp = paths.webdav_mount_point
    ok, detail = _run_helper(argv, env, config.webdav.timeout)
    if ok:
        log.info("webdav: unmounted %s", mp)
        return True
    log.error(
        "webdav: unmount command failed for %s (%s); the share may still be mounted", mp, detail.replace(chr(10), " ")
    )
    return False


def _run_helper(argv: list[str], env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    """Run a mount/unmount helper (no shell, stdin /dev/null): (success, what to log) — the exit
    status and the tail of its output, never the environment."""
    try:
        r = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except FileNotFoundError:
        return False, f"program {argv[0]!r} not found"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s"
    except OSError as e:
        return False, f"cannot run {argv[0]!r}: {e.strerror}"
    return r.returncode == 0, f"exit {r.returncode}: " + r.stdout.decode("utf-8", "replace").strip()[-300:]


__all__ = ["EXISTING", "MOUNTED", "build_unmount_argv", "build_webdav_argv", "mount_webdav", "unmount_webdav"]
