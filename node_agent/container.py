"""The container command of a launch: GPU detection, binds, argv and environment (all pure).

:func:`build_container_argv` is the one place that turns the HPC config into the runtime's
command line (``apptainer exec FLAGS IMAGE inner_command -- CMD...``); in no-container mode it
is just ``inner_command -- CMD...``. Nothing here touches the file system unless a
``path_exists`` callback is passed; secrets never go on the argv (the environment carries
them, see :func:`container_env`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Mapping

from .hpc_model import HpcConfig, UserPaths
from .hpc_schema import CLEANENV_MODES, CONTAIN_MODES
from .templating import render_template

log = logging.getLogger(__name__)

#: Variables through which batch systems make GPUs visible to a job.
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES")
_NO_GPU = ("NoDevFiles", "-1", "none", "None")
_ENV_PREFIXES = ("APPTAINERENV_", "SINGULARITYENV_")


def detect_gpu(env: Mapping[str, str]) -> bool:
    """True when the batch system made GPUs visible to this job."""
    for name in GPU_ENV:
        v = env.get(name, "").strip()
        if v and v not in _NO_GPU:
            return True
    return False


def decide_gpu(config: HpcConfig, cli_choice: bool | None, env: Mapping[str, str]) -> bool:
    """Is this a GPU job? ``--gpu``/``--no-gpu`` wins, then ``container.gpu``, then detection."""
    if cli_choice is not None:
        return cli_choice
    mode = config.container.gpu
    if mode == "always":
        return True
    if mode == "never":
        return False
    return detect_gpu(env)


def env_prefix(runtime: str) -> str:
    """The prefix that sets a variable inside the container (it wins over the host's value)."""
    return "SINGULARITYENV_" if os.path.basename(runtime).startswith("singularity") else "APPTAINERENV_"


def container_binds(
    config: HpcConfig, paths: UserPaths, *, webdav: bool = False, path_exists: Callable[[str], bool] | None = None
) -> list[str]:
    """All ``--bind`` specs for this user, in order: fixed, extra, nbgrader, WebDAV.

    With ``path_exists``, an extra bind whose source does not exist is skipped (and logged).
    """
    names = paths.template_values()
    out = [render_template(b, **names) for b in config.container.binds]
    for b in config.container.extra_binds:
        spec = render_template(b, **names)
        if path_exists is not None and not path_exists(spec.split(":", 1)[0]):
            log.warning("container.extra_binds: skipping %s (source does not exist)", spec)
            continue
        out.append(spec)
    nb = config.nbgrader
    if nb.exchange_dir:
        out.append(f"{render_template(nb.exchange_dir, **names)}:{nb.exchange_mount}:rw")
    if nb.config_file:
        out.append(f"{render_template(nb.config_file, **names)}:{nb.config_mount}:ro")
    if webdav:
        out.append(f"{paths.webdav_mount_point}:{paths.container_webdav_mount_point}")
    return out


_DEFAULT = object()


def build_container_argv(
    config: HpcConfig,
    user: str,
    gpu: bool,
    inner_argv: list[str],
    *,
    overlay: str | None | object = _DEFAULT,
    overlay_readonly: bool = False,
    home_source: str | None = None,
    webdav: bool = False,
    path_exists: Callable[[str], bool] | None = None,
) -> list[str]:
    """The argv that starts the user's server (pure; no file system access by default).

    ``overlay``: the image to use; default = the configured per-user location when
    ``overlay.enabled``; ``None`` = no overlay. ``home_source``: host directory for the
    container home (default: the user's home). In no-container mode the result is
    ``inner_command -- CMD...`` (or CMD itself when inner_command is empty).
    """
    c = config.container
    inner = list(c.inner_command) + ["--"] + list(inner_argv) if c.inner_command else list(inner_argv)
    if not c.enabled:
        return inner
    paths = config.user_paths(user)
    if overlay is _DEFAULT:
        overlay = paths.overlay if config.overlay.enabled else None
    argv = [c.runtime, "exec", *CONTAIN_MODES[c.contain]]
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


def container_env(config: HpcConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for the runtime: everything passed through; for clean-environment modes
    the ``pass_env`` variables are also offered as ``APPTAINERENV_*``."""
    out = dict(env)
    c = config.container
    if c.enabled and c.contain in CLEANENV_MODES:
        prefix = env_prefix(c.runtime)
        for k, v in env.items():
            if k.startswith(_ENV_PREFIXES):
                continue
            if any(fnmatch.fnmatchcase(k, p) for p in c.pass_env):
                out[prefix + k] = v
    return out


__all__ = [
    "GPU_ENV",
    "build_container_argv",
    "container_binds",
    "container_env",
    "decide_gpu",
    "detect_gpu",
    "env_prefix",
]
