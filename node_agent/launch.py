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

Steps 1-3 are here; 4-6 are in launch_steps.py, 7 in webdav.py, 8 in container.py (the argv)
and supervise.py (the child). The environment is passed through unchanged (secrets live there,
never on argv). With ``container.contain = "containall"`` (clean environment inside) the
variables matching ``container.pass_env`` are handed over as ``APPTAINERENV_<NAME>``
environment variables. Under a shared account ``NODE_AGENT_RUNTIME_DIR`` (the agent's socket directory) and ``TMPDIR`` are set
to the container's private /tmp.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from wire.contract import MAINTENANCE_PREFIX

from . import hpc_config as hc
from . import isolation as iso
from .container import build_container_argv, container_env, decide_gpu, detect_gpu
from .launch_errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_MAINTENANCE,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    EX_USAGE,
    LaunchError,
)
from .launch_steps import (
    close_log_handlers,
    enforce_isolation,
    find_runtime,
    log_handlers,
    prepare_storage,
    run_load_command,
    setup_logging,
)
from .supervise import FORWARD_SIGNALS, exec_failed, exit_status, run_supervised
from .webdav import MOUNTED, build_unmount_argv, build_webdav_argv, mount_webdav, unmount_webdav

log = logging.getLogger("node_agent.launch")  # not __name__: also run as __main__

USER_ENV = "JUPYTERHUB_USER"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="node-agent launch",
        description="Prepare the user's home/overlay and start CMD in the configured container.",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"HPC config file (default: ${hc.CONFIG_ENV}, then " + ", ".join(hc.DEFAULT_CONFIG_PATHS) + ")",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="use the GPU image and the GPU flag")
    g.add_argument("--no-gpu", dest="gpu", action="store_false", help="never use GPUs")
    p.add_argument(
        "--dry-run", action="store_true", help="print the command as JSON and exit, without creating anything"
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print(
            "node-agent launch: missing command (usage: node-agent launch [--config PATH] -- CMD...)", file=sys.stderr
        )
        return EX_USAGE
    try:
        return _launch(args, cmd)
    except LaunchError as e:
        if log_handlers():
            log.error("%s", e)
        else:
            print(f"node-agent launch: {e}", file=sys.stderr)
        return e.code
    finally:
        close_log_handlers()


def _chdir(home: str) -> None:
    try:  # the working directory is the user's own home, never a shared one
        os.chdir(home)
    except OSError as e:
        log.warning("cannot change to %s: %s", home, e.strerror)


def _launch(args: argparse.Namespace, cmd: list[str]) -> int:
    path = hc.find_config(args.config)
    if path is None:
        print(
            "node-agent launch: no HPC config found (looked at $"
            + hc.CONFIG_ENV
            + ", "
            + ", ".join(hc.DEFAULT_CONFIG_PATHS)
            + "); run `node-agent wizard` or pass "
            "--config",
            file=sys.stderr,
        )
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
        print(
            json.dumps(
                {
                    "argv": argv,
                    "user": paths.safe_user,
                    "home": paths.home,
                    "overlay": paths.overlay if config.overlay.enabled else None,
                    "gpu": gpu,
                }
            )
        )
        return EX_OK

    logfile = setup_logging(config, paths)
    log.info("launch start: config=%s gpu=%s container=%s log=%s", path, gpu, config.container.enabled, logfile)

    c = config.container
    runtime = ""
    if c.enabled:
        if c.load_command:
            run_load_command(config, env)
        runtime = find_runtime(config, env, gpu)
    enforce_isolation(config, paths, env)

    storage = prepare_storage(config, paths)
    home, overlay, ro, lock = storage.home, storage.overlay, storage.readonly, storage.lock

    webdav = mount_webdav(config, paths, env) if config.webdav.enabled else ""

    argv = build_container_argv(
        config,
        raw_user,
        gpu,
        cmd,
        overlay=overlay,
        overlay_readonly=ro,
        home_source=home,
        webdav=bool(webdav),
        path_exists=os.path.exists,
    )
    if c.enabled:
        argv[0] = runtime
        log.info(
            "starting %s image=%s overlay=%s%s",
            os.path.basename(runtime),
            config.image_for(gpu),
            overlay or "none",
            " (read-only)" if ro else "",
        )
        run_env = container_env(config, env)
        run_env.update(iso.private_dirs_env(config))
        _chdir(home)
    else:
        env["HOME"] = home
        _chdir(home)
        log.info("no-container mode: starting %s", os.path.basename(argv[0]))
        run_env = env
    log.debug("argv: %s", json.dumps(argv))
    if lock is not None:
        lock.keep_across_exec()
    if webdav == MOUNTED and config.webdav.unmount_command:
        # exec would leave the mount (and its daemon) behind after the job: stay as parent
        fds = (lock.fd,) if lock is not None and lock.fd is not None else ()
        return run_supervised(argv, run_env, lambda: unmount_webdav(config, paths, env), pass_fds=fds)
    close_log_handlers()
    try:
        os.execvpe(argv[0], argv, run_env)
    except OSError as e:
        return exec_failed(argv[0], e)
    return EX_SOFTWARE  # pragma: no cover - exec does not return


# The names tests and callers use as ``launch.X``; they live in the step modules.
__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_MAINTENANCE",
    "EX_NOUSER",
    "EX_OK",
    "EX_SOFTWARE",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "FORWARD_SIGNALS",
    "USER_ENV",
    "LaunchError",
    "build_container_argv",
    "build_unmount_argv",
    "build_webdav_argv",
    "container_env",
    "decide_gpu",
    "detect_gpu",
    "exit_status",
    "main",
    "run_supervised",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
