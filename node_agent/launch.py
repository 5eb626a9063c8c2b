"""``node-agent launch [--config PATH] -- CMD...``: prepare the job on the compute node.

Run by the batch script, outside any container. In order:

1. load and validate the HPC config (exit 78 with ``hpc config error: option: reason`` lines);
2. maintenance check (exit 75; stderr line ``NODE-AGENT-MAINTENANCE: <message>``);
3. validate the user name from ``JUPYTERHUB_USER`` and derive the per-user paths;
4. logging to ``logging.dir`` (one file per day), never logging environment values;
5. ``container.load_command``, find the runtime and the image; then, under a shared account
   (``isolation.shared_account``), refuse (exit 78) a container that does not wall the job off
   from other users' jobs: no PID namespace / private /tmp, or a bind of the home root or of
   another user's home or image (``enforce_isolation``, see isolation.py);
6. create the user's home and overlay (race-free, see overlay.py);
7. optionally mount WebDAV (argv template, no shell, URL validated, credentials from env);
8. build the container command (``build_container_argv``) and exec it from the user's home;
   in no-container mode exec ``inner_command -- CMD...`` directly. When step 7 made a mount (and
   ``webdav.unmount_command`` is set), run the command as a child instead (``run_supervised``):
   SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 are passed on, and after it exits the share is
   unmounted and launch exits with the child's status (128+N for signal N).

The environment is passed through unchanged (secrets live there, never on argv). With
``container.contain = "containall"`` (clean environment inside) the variables matching
``container.pass_env`` are handed over as ``APPTAINERENV_<NAME>`` environment variables. Under a
shared account ``NODE_AGENT_RUNTIME_DIR`` (the agent's socket directory) and ``TMPDIR`` are set
to the container's private /tmp.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Callable, Mapping

from . import hpc_config as hc
from . import isolation as iso
from . import overlay as ov

log = logging.getLogger("node_agent.launch")

EX_OK = 0
EX_USAGE = 64
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_MAINTENANCE = 75
EX_CONFIG = 78

MAINTENANCE_PREFIX = "NODE-AGENT-MAINTENANCE: "
USER_ENV = "JUPYTERHUB_USER"
_ENV_MARKER = "\x00NODE-AGENT-ENV-BEGIN\x00"
_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL",
            "ROCR_VISIBLE_DEVICES")
_LOAD_IGNORE = {"_", "SHLVL", "PWD", "OLDPWD"}


class LaunchError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# pure helpers (unit-tested)


def detect_gpu(env: Mapping[str, str]) -> bool:
    """True when the batch system made GPUs visible to this job."""
    for name in _GPU_ENV:
        v = env.get(name, "").strip()
        if v and v not in ("NoDevFiles", "-1", "none", "None"):
            return True
    return False


def decide_gpu(config: hc.HpcConfig, cli_choice: bool | None, env: Mapping[str, str]) -> bool:
    if cli_choice is not None:
        return cli_choice
    mode = config.container.gpu
    if mode == "always":
        return True
    if mode == "never":
        return False
    return detect_gpu(env)


def _names(paths: hc.UserPaths) -> dict[str, str]:
    return dict(user=paths.safe_user, scratch_dir=paths.scratch_dir, home_root=paths.home_root,
                home=paths.home, container_home=paths.container_home)


def container_binds(config: hc.HpcConfig, paths: hc.UserPaths, *, webdav: bool = False,
                    path_exists: Callable[[str], bool] | None = None) -> list[str]:
    """All ``--bind`` specs for this user, in order: fixed, extra, nbgrader, WebDAV."""
    names = _names(paths)
    out = [hc.render_template(b, **names) for b in config.container.binds]
    for b in config.container.extra_binds:
        spec = hc.render_template(b, **names)
        if path_exists is not None and not path_exists(spec.split(":", 1)[0]):
            log.warning("container.extra_binds: skipping %s (source does not exist)", spec)
            continue
        out.append(spec)
    nb = config.nbgrader
    if nb.exchange_dir:
        out.append(f"{hc.render_template(nb.exchange_dir, **names)}:{nb.exchange_mount}:rw")
    if nb.config_file:
        out.append(f"{hc.render_template(nb.config_file, **names)}:{nb.config_mount}:ro")
    if webdav:
        out.append(f"{paths.webdav_mount_point}:{paths.container_webdav_mount_point}")
    return out


_DEFAULT = object()


def build_container_argv(config: hc.HpcConfig, user: str, gpu: bool, inner_argv: list[str], *,
                         overlay: str | None | object = _DEFAULT, overlay_readonly: bool = False,
                         home_source: str | None = None, webdav: bool = False,
                         path_exists: Callable[[str], bool] | None = None) -> list[str]:
    """The argv that starts the user's server (pure; no file system access by default).

    ``overlay``: the image to use; default = the configured per-user location when
    ``overlay.enabled``; ``None`` = no overlay. ``home_source``: host directory for the
    container home (default: the user's home). In no-container mode the result is
    ``inner_command -- CMD...`` (or CMD itself when inner_command is empty).
    """
    c = config.container
    inner = list(c.inner_command) + ["--"] + list(inner_argv) if c.inner_command \
        else list(inner_argv)
    if not c.enabled:
        return inner
    paths = config.user_paths(user)
    if overlay is _DEFAULT:
        overlay = paths.overlay if config.overlay.enabled else None
    argv = [c.runtime, "exec", *hc.CONTAIN_MODES[c.contain]]
    if gpu and c.gpu_flag:
        argv.append(c.gpu_flag)
    argv += ["--home", f"{home_source or paths.home}:{paths.container_home}"]
    argv += ["--pwd", c.workdir or paths.container_home]
    for spec in container_binds(config, paths, webdav=webdav, path_exists=path_exists):
        argv += ["--bind", spec]
    if c.no_mount:
        argv += ["--no-mount", ",".join(c.no_mount)]
    if overlay:
        argv += ["--overlay", f"{overlay}:ro" if overlay_readonly else str(overlay)]
    argv += list(c.extra_args)
    argv.append(config.image_for(gpu))
    return argv + inner


def build_webdav_argv(config: hc.HpcConfig, paths: hc.UserPaths, url: str) -> list[str]:
    """The mount command for ``url``: each template item stays exactly one argv element."""
    hc.validate_webdav_url(url)
    values = dict(url=url, mount_point=paths.webdav_mount_point, user=paths.safe_user,
                  home=paths.home)
    return [hc.render_template(a, **values) for a in config.webdav.mount_command]


def container_env(config: hc.HpcConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the runtime: everything passed through; for clean-environment modes
    the ``pass_env`` variables are also offered as ``APPTAINERENV_*``."""
    out = dict(env)
    c = config.container
    if c.enabled and c.contain in hc.CLEANENV_MODES:
        prefix = "SINGULARITYENV_" if os.path.basename(c.runtime).startswith("singularity") \
            else "APPTAINERENV_"
        for k, v in env.items():
            if k.startswith(("APPTAINERENV_", "SINGULARITYENV_")):
                continue
            if any(fnmatch.fnmatchcase(k, p) for p in c.pass_env):
                out[prefix + k] = v
    return out


# --------------------------------------------------------------------------------------------
# side-effecting steps


def setup_logging(config: hc.HpcConfig, paths: hc.UserPaths | None) -> str | None:
    """Log to stderr (the job output) and, if enabled, to the per-day file. Returns its path."""
    level = logging.DEBUG if config.logging.debug else logging.INFO
    root = logging.getLogger("node_agent")
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_node_agent_launch", False):
            root.removeHandler(h)
            h.close()
    host = socket.gethostname().split(".")[0]
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or "-"
    who = paths.safe_user if paths else "-"
    fmt = logging.Formatter(
        f"%(asctime)s %(levelname)s [launch host={host} job={job[:32]} user={who}] %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(level)
    err._node_agent_launch = True  # type: ignore[attr-defined]
    root.addHandler(err)
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
    fh.setFormatter(fmt)
    fh.setLevel(level)
    fh._node_agent_launch = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    return path


def run_load_command(config: hc.HpcConfig, env: dict[str, str]) -> None:
    """Run ``container.load_command`` and apply its environment changes to ``env``."""
    c = config.container
    script = f"{c.load_command}\nprintf '%b' '\\0NODE-AGENT-ENV-BEGIN\\0' && env -0"
    try:
        r = subprocess.run([*c.load_shell, script], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"container.load_command: could not run it ({e})", EX_UNAVAILABLE)
    out = r.stdout.decode("utf-8", "surrogateescape")
    if r.returncode != 0 or _ENV_MARKER not in out:
        tail = r.stderr.decode("utf-8", "replace").strip()[-300:]
        raise LaunchError(
            f"container.load_command failed (exit {r.returncode}): {tail or 'no output'}",
            EX_UNAVAILABLE)
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


MOUNTED = "mounted"    # mount_webdav: launch mounted the share (and should unmount it)
EXISTING = "existing"  # mount_webdav: already mounted by someone else (leave it alone)


def mount_webdav(config: hc.HpcConfig, paths: hc.UserPaths, env: Mapping[str, str]) -> str:
    """Mount the share if configured. Returns ``MOUNTED`` (we mounted it), ``EXISTING``
    (it was mounted already) or ``""`` (no share: nothing to bind)."""
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
            raise LaunchError(f"webdav.credential_env: ${source} (for {target}) is not set in "
                              f"the job environment", EX_USAGE)
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


def _run_helper(argv: list[str], env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    """Run a mount/unmount helper (no shell, stdin /dev/null): (success, what to log) — the exit
    status and the tail of its output, never the environment."""
    try:
        r = subprocess.run(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
    except FileNotFoundError:
        return False, f"program {argv[0]!r} not found"
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout}s"
    except OSError as e:
        return False, f"cannot run {argv[0]!r}: {e.strerror}"
    return r.returncode == 0, f"exit {r.returncode}: " + r.stdout.decode("utf-8", "replace").strip()[-300:]


def build_unmount_argv(config: hc.HpcConfig, paths: hc.UserPaths) -> list[str]:
    """``webdav.unmount_command`` with placeholders filled in (each one stays one argument)."""
    values = dict(mount_point=paths.webdav_mount_point, user=paths.safe_user, home=paths.home)
    return [hc.render_template(a, **values) for a in config.webdav.unmount_command]


def unmount_webdav(config: hc.HpcConfig, paths: hc.UserPaths, env: Mapping[str, str]) -> bool:
    """Run ``webdav.unmount_command`` (no shell, stdin /dev/null). Failures are logged with
    the exit status and the command's output - never the environment. True on success."""
    argv = build_unmount_argv(config, paths)
    mp = paths.webdav_mount_point
    ok, detail = _run_helper(argv, env, config.webdav.timeout)
    if ok:
        log.info("webdav: unmounted %s", mp)
        return True
    log.error("webdav: unmount command failed for %s (%s); the share may still be mounted",
              mp, detail.replace(chr(10), " "))
    return False


FORWARD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell would report it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_supervised(argv: list[str], env: Mapping[str, str], after: Callable[[], object], *,
                   pass_fds: tuple[int, ...] = ()) -> int:
    """Run ``argv`` as a child, pass ``FORWARD_SIGNALS`` on to it, wait, call ``after()``
    (the unmount), and return the child's exit status (128+N if it died by signal N).

    Signals this process ignores (SIG_IGN, e.g. SIGINT for a background job) stay ignored, so
    the child inherits them exactly as it would through exec. Signals arriving after the child
    exited (during the unmount) are swallowed: the unmount must finish.
    """
    state: dict[str, object] = {"child": None, "done": False, "pending": []}

    def forward(signum, _frame):
        child = state["child"]
        if state["done"]:
            return
        if child is None:
            state["pending"].append(signum)  # type: ignore[union-attr]
            return
        try:
            child.send_signal(signum)  # type: ignore[union-attr]
        except OSError:
            pass

    previous = {}
    for sig in FORWARD_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, forward)
    try:
        try:
            child = subprocess.Popen(argv, env=dict(env), pass_fds=pass_fds)
        except OSError as e:
            print(f"node-agent launch: cannot execute {argv[0]}: {e.strerror}", file=sys.stderr)
            log.error("cannot execute %s: %s", os.path.basename(argv[0]), e.strerror)
            status = 127 if isinstance(e, FileNotFoundError) else 126
        else:
            state["child"] = child
            log.info("started %s as pid %d (supervised: the WebDAV share is unmounted when it "
                     "exits)", os.path.basename(argv[0]), child.pid)
            for sig in state["pending"]:  # type: ignore[union-attr]
                forward(sig, None)
            status = exit_status(child.wait())
            log.info("%s exited with status %d", os.path.basename(argv[0]), status)
        state["done"] = True
        try:
            after()
        except Exception:  # noqa: BLE001 - the child's status must still be returned
            log.exception("webdav: unmount step failed")
        return status
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def enforce_isolation(config: hc.HpcConfig, paths: hc.UserPaths, env: Mapping[str, str]) -> None:
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
            log.warning("no-container mode under a shared account (isolation.shared_account): "
                        "nothing on this node separates this job from other users' jobs of "
                        "the account; the hub must keep them off the node (docs/deploy.md)")
            return
        problems = [problem]
    if not problems:
        log.info("isolation: shared account; own PID namespace and /tmp (container.contain = "
                 "%s), no other user's home or image bound", config.container.contain)
        return
    if not config.isolation.allow_weak:
        raise LaunchError(iso.refusal(problems, config.source), EX_CONFIG)
    for p in problems:
        log.warning("isolation.allow_weak: starting anyway although %s", p)


def _prepare(config: hc.HpcConfig, paths: hc.UserPaths, env: dict[str, str]):
    """Home and overlay. Returns (home_source, overlay_path|None, readonly, inuse_lock|None)."""
    try:
        have_home = ov.ensure_home(paths.home, config.storage.home_mode,
                                   config.storage.create_home)
    except ov.OverlayError as e:
        raise LaunchError(str(e), EX_CANTCREAT) from None
    home = paths.home
    if not have_home:
        home = tempfile.mkdtemp(prefix=f"node-agent-home-{paths.safe_user}-")
        log.warning("storage.create_home is false and %s does not exist: using the throw-away "
                    "home %s (changes are lost when the job ends)", paths.home, home)
    if not (config.container.enabled and config.overlay.enabled):
        return home, None, False, None
    o = config.overlay
    lock = ov.InUseLock(paths.overlay)
    try:
        res = ov.ensure_overlay(paths.overlay, o.size_bytes, create=o.create, check="none",
                                lock_timeout=o.lock_timeout)
        if res is None:
            log.warning("overlay %s does not exist and overlay.create is false: running "
                        "without an overlay", paths.overlay)
            return home, None, False, None
        if lock.try_acquire():
            # we are the only writer: a full check (fsck) is safe now
            if o.check != "none":
                ov.check_overlay(paths.overlay, fsck=o.check == "fsck")
            log.info("overlay %s (%s)", paths.overlay, "new" if res.created else "existing")
            return home, paths.overlay, False, lock
        if o.check != "none":
            ov.check_overlay(paths.overlay, fsck=False)
    except ov.OverlayError as e:
        lock.release()
        raise LaunchError(str(e), EX_CANTCREAT) from None
    if o.when_busy == "readonly":
        log.warning("overlay %s is in use by another job of this user: mounting it read-only",
                    paths.overlay)
        return home, paths.overlay, True, None
    if o.when_busy == "without":
        log.warning("overlay %s is in use by another job of this user: running without it",
                    paths.overlay)
        return home, None, False, None
    raise LaunchError(f"overlay {paths.overlay} is in use by another job of this user "
                      f"(overlay.when_busy = 'fail'); stop the other server first",
                      EX_CANTCREAT)


# --------------------------------------------------------------------------------------------
# main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="node-agent launch",
        description="Prepare the user's home/overlay and start CMD in the configured container.")
    p.add_argument("--config", metavar="PATH",
                   help=f"HPC config file (default: ${hc.CONFIG_ENV}, then "
                        + ", ".join(hc.DEFAULT_CONFIG_PATHS) + ")")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="use the GPU image and the GPU flag")
    g.add_argument("--no-gpu", dest="gpu", action="store_false", help="never use GPUs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command as JSON and exit, without creating anything")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("node-agent launch: missing command (usage: node-agent launch [--config PATH] "
              "-- CMD...)", file=sys.stderr)
        return EX_USAGE
    try:
        return _launch(args, cmd)
    except LaunchError as e:
        if _our_handlers():
            log.error("%s", e)
        else:
            print(f"node-agent launch: {e}", file=sys.stderr)
        return e.code
    finally:
        _close_handlers()


def _our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger("node_agent").handlers
            if getattr(h, "_node_agent_launch", False)]


def _close_handlers() -> None:
    root = logging.getLogger("node_agent")
    for h in _our_handlers():
        h.flush()
        root.removeHandler(h)
        h.close()


def _launch(args: argparse.Namespace, cmd: list[str]) -> int:
    path = hc.find_config(args.config)
    if path is None:
        print("node-agent launch: no HPC config found (looked at $" + hc.CONFIG_ENV + ", "
              + ", ".join(hc.DEFAULT_CONFIG_PATHS) + "); run `node-agent wizard` or pass "
              "--config", file=sys.stderr)
        return EX_CONFIG
    try:
        config = hc.load_config(path)
    except hc.HpcConfigError as e:
        print(str(e), file=sys.stderr)
        return EX_CONFIG

    raw_user = os.environ.get(USER_ENV, "")
    if config.is_maintenance_blocked(raw_user):
        msg = " ".join(config.maintenance.message.split()) or "maintenance"
        print(MAINTENANCE_PREFIX + msg, file=sys.stderr, flush=True)
        return EX_MAINTENANCE

    try:
        paths = config.user_paths(raw_user)
    except hc.UserNameError as e:
        print(f"node-agent launch: refusing ${USER_ENV}: {e}", file=sys.stderr)
        return EX_NOUSER

    env = dict(os.environ)
    gpu = decide_gpu(config, args.gpu, env)

    if args.dry_run:
        problems = iso.check(config, paths, env)
        if problems and not config.isolation.allow_weak:
            print(iso.refusal(problems, config.source), file=sys.stderr)
            return EX_CONFIG
        argv = build_container_argv(config, raw_user, gpu, cmd)
        print(json.dumps({"argv": argv, "user": paths.safe_user, "home": paths.home,
                          "overlay": paths.overlay if config.overlay.enabled else None,
                          "gpu": gpu}))
        return EX_OK

    logfile = setup_logging(config, paths)
    log.info("launch start: config=%s gpu=%s container=%s log=%s", path, gpu,
             config.container.enabled, logfile)

    c = config.container
    webdav = ""
    if c.enabled:
        if c.load_command:
            run_load_command(config, env)
        runtime = shutil.which(c.runtime, path=env.get("PATH", os.defpath))
        if runtime is None:
            raise LaunchError(
                f"container.runtime: {c.runtime!r} not found on PATH (set "
                f"container.load_command, e.g. 'module load apptainer', or an absolute path)",
                EX_UNAVAILABLE)
        image = config.image_for(gpu)
        if not os.path.exists(image):
            opt = "container.gpu_image" if gpu and c.gpu_image else "container.image"
            raise LaunchError(f"{opt}: image {image} does not exist", EX_UNAVAILABLE)
    enforce_isolation(config, paths, env)

    home, overlay, ro, lock = _prepare(config, paths, env)

    if config.webdav.enabled:
        webdav = mount_webdav(config, paths, env)

    argv = build_container_argv(config, raw_user, gpu, cmd, overlay=overlay,
                                overlay_readonly=ro, home_source=home, webdav=bool(webdav),
                                path_exists=os.path.exists)
    if c.enabled:
        argv[0] = runtime
        log.info("starting %s image=%s overlay=%s%s", os.path.basename(runtime),
                 config.image_for(gpu), overlay or "none", " (read-only)" if ro else "")
        run_env = container_env(config, env)
        run_env.update(iso.private_dirs_env(config))
        try:  # the runtime's working directory is the user's own home, never a shared one
            os.chdir(home)
        except OSError as e:
            log.warning("cannot change to %s: %s", home, e.strerror)
    else:
        env["HOME"] = home
        try:
            os.chdir(home)
        except OSError as e:
            log.warning("cannot change to %s: %s", home, e.strerror)
        log.info("no-container mode: starting %s", os.path.basename(argv[0]))
        run_env = env
    log.debug("argv: %s", json.dumps(argv))
    if lock is not None:
        lock.keep_across_exec()
    if webdav == MOUNTED and config.webdav.unmount_command:
        # exec would leave the mount (and its daemon) behind after the job: stay as parent
        fds = (lock.fd,) if lock is not None and lock.fd is not None else ()
        return run_supervised(argv, run_env, lambda: unmount_webdav(config, paths, env),
                              pass_fds=fds)
    _close_handlers()
    try:
        os.execvpe(argv[0], argv, run_env)
    except OSError as e:
        print(f"node-agent launch: cannot execute {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    return EX_SOFTWARE  # pragma: no cover - exec does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
