"""The side-effecting steps of ``node-agent launch``, in the order launch runs them.

Each step either succeeds or raises :class:`~node_agent.launch_errors.LaunchError` with the
message and the exit code; none logs an environment value.

* :func:`setup_logging` — stderr (the job output) and the per-day file in ``logging.dir``;
* :func:`run_load_command` — ``container.load_command`` and its environment changes;
* :func:`find_runtime` — the runtime on PATH and the image;
* :func:`enforce_isolation` — refuse what does not wall the job off under a shared account;
* :func:`prepare_storage` — the user's home and overlay (race-free, see overlay.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from . import isolation as iso
from . import overlay as ov
from .hpc_model import HpcConfig, UserPaths
from .launch_errors import EX_CANTCREAT, EX_CONFIG, EX_UNAVAILABLE, LaunchError

log = logging.getLogger(__name__)

_HANDLER_NAME = "node-agent-launch"  # marks the handlers setup_logging added
_ENV_MARKER = "\x00NODE-AGENT-ENV-BEGIN\x00"
_LOAD_IGNORE = {"_", "SHLVL", "PWD", "OLDPWD"}


# --------------------------------------------------------------------------------------------
# logging


def setup_logging(config: HpcConfig, paths: UserPaths | None) -> str | None:
    """Log to stderr (the job output) and, if enabled, to the per-day file. Returns its path."""
    level = logging.DEBUG if config.logging.debug else logging.INFO
    root = logging.getLogger("node_agent")
    root.setLevel(level)
    close_log_handlers()
    host = socket.gethostname().split(".")[0]
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or "-"
    who = paths.safe_user if paths else "-"
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [launch host={host} job={job[:32]} user={who}] %(message)s")
    _add_handler(root, logging.StreamHandler(sys.stderr), fmt, level)
    if not (config.logging.enabled and paths):
        return None
    d = paths.log_dir
    if config.logging.per_day:
        stamp = datetime.date.today().strftime(config.logging.date_format)
        name = f"node-agent-{stamp}.log".replace("/", "-")
    else:
        name = "node-agent.log"
    path = os.path.join(d, name)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fh = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        log.warning("logging.dir: cannot write %s (%s); logging to stderr only", path, e.strerror)
        return None
    _add_handler(root, fh, fmt, level)
    return path


def _add_handler(root: logging.Logger, h: logging.Handler, fmt: logging.Formatter, level: int) -> None:
    h.setFormatter(fmt)
    h.setLevel(level)
    h.set_name(_HANDLER_NAME)
    root.addHandler(h)


def log_handlers() -> list[logging.Handler]:
    """The handlers :func:`setup_logging` added (none before it ran)."""
    return [h for h in logging.getLogger("node_agent").handlers if h.get_name() == _HANDLER_NAME]


def close_log_handlers() -> None:
    """Flush, remove and close the handlers :func:`setup_logging` added (before exec, at exit)."""
    root = logging.getLogger("node_agent")
    for h in log_handlers():
        h.flush()
        root.removeHandler(h)
        h.close()


# --------------------------------------------------------------------------------------------
# the container runtime


def run_load_command(config: HpcConfig, env: dict[str, str]) -> None:
    """Run ``container.load_command`` and apply its environment changes to ``env``."""
    c = config.container
    script = f"{c.load_command}\nprintf '%b' '\\0NODE-AGENT-ENV-BEGIN\\0' && env -0"
    try:
        r = subprocess.run([*c.load_shell, script], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"container.load_command: could not run it ({e})", EX_UNAVAILABLE) from None
    out = r.stdout.decode("utf-8", "surrogateescape")
    if r.returncode != 0 or _ENV_MARKER not in out:
        tail = r.stderr.decode("utf-8", "replace").strip()[-300:]
        raise LaunchError(f"container.load_command failed (exit {r.returncode}): {tail or 'no output'}", EX_UNAVAILABLE)
    new: dict[str, str] = {}
    for item in out.split(_ENV_MARKER, 1)[1].split("\0"):
        if "=" in item:
            k, v = item.split("=", 1)
            new[k] = v
    changed = 0
    for k, v in new.items():
        if k not in _LOAD_IGNORE and env.get(k) != v:
            env[k] = v
            changed += 1
    for k in [k for k in env if k not in new and k not in _LOAD_IGNORE]:
        del env[k]
        changed += 1
    log.info("container.load_command ran; %d environment variables changed", changed)


def find_runtime(config: HpcConfig, env: Mapping[str, str], gpu: bool) -> str:
    """The runtime's path on the job's PATH; also checks that the job's image exists."""
    c = config.container
    runtime = shutil.which(c.runtime, path=env.get("PATH", os.defpath))
    if runtime is None:
        raise LaunchError(
            f"container.runtime: {c.runtime!r} not found on PATH (set "
            f"container.load_command, e.g. 'module load apptainer', or an absolute path)",
            EX_UNAVAILABLE,
        )
    image = config.image_for(gpu)
    if not os.path.exists(image):
        opt = "container.gpu_image" if gpu and c.gpu_image else "container.image"
        raise LaunchError(f"{opt}: image {image} does not exist", EX_UNAVAILABLE)
    return runtime


# --------------------------------------------------------------------------------------------
# isolation


def enforce_isolation(config: HpcConfig, paths: UserPaths, env: Mapping[str, str]) -> None:
    """Refuse (exit 78) a container that does not wall this job off from other users' jobs of
    the shared account (``isolation.*``, see isolation.py), and no-container mode when the hub
    counted on a container; with ``isolation.allow_weak`` log each problem as a warning instead.
    Otherwise, in no-container mode under a shared account, warn that only the batch system
    keeps users apart."""
    if not config.isolation.shared_account:
        return
    if config.container.enabled:
        problems = iso.check(config, paths, env)
    else:
        problem = iso.no_container_problem(config, env)
        if problem is None:
            log.warning(
                "no-container mode under a shared account (isolation.shared_account): "
                "nothing on this node separates this job from other users' jobs of "
                "the account; the hub must keep them off the node (docs/deploy.md)"
            )
            return
        problems = [problem]
    if not problems:
        log.info(
            "isolation: shared account; own PID namespace and /tmp (container.contain = "
            "%s), no other user's home or image bound",
            config.container.contain,
        )
        return
    if not config.isolation.allow_weak:
        raise LaunchError(iso.refusal(problems, config.source), EX_CONFIG)
    for p in problems:
        log.warning("isolation.allow_weak: starting anyway although %s", p)


# --------------------------------------------------------------------------------------------
# home and overlay


@dataclass
class Storage:
    """What :func:`prepare_storage` set up for the container."""

    home: str  # the host directory to use as the home (the user's, or a throw-away one)
    overlay: str | None  # the overlay image to mount, if any
    readonly: bool  # mount the overlay read-only (another job of the user writes to it)
    lock: ov.InUseLock | None  # held while this job writes to the overlay


def prepare_storage(config: HpcConfig, paths: UserPaths) -> Storage:
    """Create (or find) the user's home and overlay; decide how the overlay is mounted."""
    try:
        have_home = ov.ensure_home(paths.home, config.storage.home_mode, config.storage.create_home)
    except ov.OverlayError as e:
        raise LaunchError(str(e), EX_CANTCREAT) from None
    home = paths.home
    if not have_home:
        home = tempfile.mkdtemp(prefix=f"node-agent-home-{paths.safe_user}-")
        log.warning(
            "storage.create_home is false and %s does not exist: using the throw-away "
            "home %s (changes are lost when the job ends)",
            paths.home,
            home,
        )
    if not (config.container.enabled and config.overlay.enabled):
        return Storage(home, None, False, None)
    o = config.overlay
    lock = ov.InUseLock(paths.overlay)
    try:
        res = ov.ensure_overlay(paths.overlay, o.size_bytes, create=o.create, check="none", lock_timeout=o.lock_timeout)
        if res is None:
            log.warning(
                "overlay %s does not exist and overlay.create is false: running without an overlay", paths.overlay
            )
            return Storage(home, None, False, None)
        if lock.try_acquire():
            # we are the only writer: a full check (fsck) is safe now
            if o.check != "none":
                ov.check_overlay(paths.overlay, fsck=o.check == "fsck")
            log.info("overlay %s (%s)", paths.overlay, "new" if res.created else "existing")
            return Storage(home, paths.overlay, False, lock)
        if o.check != "none":
            ov.check_overlay(paths.overlay, fsck=False)
    except ov.OverlayError as e:
        lock.release()
        raise LaunchError(str(e), EX_CANTCREAT) from None
    except OSError as e:  # e.g. an image or lock file another account made, on a shared scratch
        lock.release()
        raise LaunchError(
            f"overlay {paths.overlay} cannot be used by this account: {e.strerror} ({e.filename}); "
            "give each account its own overlay.location, or set overlay.enabled = false",
            EX_CANTCREAT,
        ) from None
    if o.when_busy == "readonly":
        log.warning("overlay %s is in use by another job of this user: mounting it read-only", paths.overlay)
        return Storage(home, paths.overlay, True, None)
    if o.when_busy == "without":
        log.warning("overlay %s is in use by another job of this user: running without it", paths.overlay)
        return Storage(home, None, False, None)
    raise LaunchError(
        f"overlay {paths.overlay} is in use by another job of this user "
        f"(overlay.when_busy = 'fail'); stop the other server first",
        EX_CANTCREAT,
    )


__all__ = [
    "Storage",
    "close_log_handlers",
    "enforce_isolation",
    "find_runtime",
    "log_handlers",
    "prepare_storage",
    "run_load_command",
    "setup_logging",
]
