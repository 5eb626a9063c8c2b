"""Shared-account isolation: what ``node-agent launch`` insists on before it starts a container.

With ``isolation.shared_account = true`` (the default) every user's job runs under ONE cluster
account, so Unix permissions separate nothing between users: any process of the account may
read ``/proc/PID/environ`` (the hub API token), connect to unix sockets and open files of every
other job of the account. The container is then the only wall between two users whose jobs share
a node, and it holds only if

* each job has its own PID namespace and its own /tmp (``container.contain`` is ``contain-pid``
  or ``containall``; never a ``--workdir``, which would give every job the same /tmp);
* the only per-user data bound in is the user's own: no bind (``container.binds``,
  ``container.extra_binds``, nbgrader, WebDAV, ``--bind``/``--mount``/``--overlay`` in
  ``container.extra_args``, ``$APPTAINER_BIND`` and friends) exposes the home root, another
  user's home or another user's overlay image (symbolic links resolved).

:func:`check` lists what breaks this, each problem naming the option to change; launch refuses
to start on any (exit 78) unless ``isolation.allow_weak`` is set, in which case every problem is
logged as a warning. :func:`private_dirs_env` points the agent's socket directory and ``TMPDIR``
inside the container at the job's private /tmp.

What the container does not separate (the network namespace: loopback ports; without
``containall`` SysV IPC; site binds from ``apptainer.conf``) is written down in docs/deploy.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from .container import env_prefix
from .hpc_model import HpcConfig, UserPaths
from .hpc_schema import ISOLATING_MODES
from .templating import render_template

#: The job's private /tmp inside the container (a fresh tmpfs per job with --contain).
PRIVATE_TMP = "/tmp"

#: Set to "1" by the hub (SlurmBrokerSpawner) when it counted on a container to wall the job off
#: and therefore did not keep other users' jobs off the node.
EXPECT_CONTAINER_ENV = "NODE_AGENT_EXPECT_CONTAINER"

#: Environment variables through which Apptainer/Singularity take extra binds or overlays.
BIND_ENV = ("APPTAINER_BIND", "APPTAINER_BINDPATH", "SINGULARITY_BIND", "SINGULARITY_BINDPATH")
OVERLAY_ENV = ("APPTAINER_OVERLAY", "SINGULARITY_OVERLAY")
#: ... and a work directory, whose tmp/ would become every job's /tmp.
WORKDIR_ENV = ("APPTAINER_WORKDIR", "SINGULARITY_WORKDIR")

_BIND_FLAGS = ("--bind", "-B")
_MOUNT_FLAGS = ("--mount",)
_OVERLAY_FLAGS = ("--overlay", "-o")
_WORKDIR_FLAGS = ("--workdir", "-W")
_HOME_FLAGS = ("--home", "-H")


@dataclass(frozen=True)
class Problem:
    """One reason the container does not wall this job off from other users' jobs."""

    option: str  # the option (or environment variable) to change
    reason: str

    def __str__(self) -> str:
        return f"{self.option}: {self.reason}"


def private_dirs_env(config: HpcConfig) -> dict[str, str]:
    """Variables that put the agent's socket directory (``NODE_AGENT_RUNTIME_DIR``) and
    ``TMPDIR`` in the job's private /tmp inside the container — not in a host directory such
    as ``$XDG_RUNTIME_DIR`` or a site ``TMPDIR`` that other jobs of the account can reach.
    Empty unless ``isolation.shared_account`` and a container are configured."""
    c = config.container
    if not (config.isolation.shared_account and c.enabled):
        return {}
    prefix = env_prefix(c.runtime)
    return {prefix + "NODE_AGENT_RUNTIME_DIR": PRIVATE_TMP, prefix + "TMPDIR": PRIVATE_TMP}


def _flag_values(args: list[str], flags: tuple[str, ...]) -> Iterator[str]:
    """Values of ``flags`` in an argv list: ``--flag V``, ``--flag=V`` and ``-fV``."""
    i = 0
    while i < len(args):
        a = args[i]
        for f in flags:
            if a == f:
                if i + 1 < len(args):
                    yield args[i + 1]
                    i += 1
                break
            if a.startswith(f + "="):
                yield a[len(f) + 1 :]
                break
            if len(f) == 2 and a.startswith(f) and len(a) > 2:  # short form -B/src
                yield a[2:]
                break
        i += 1


def _bind_list_sources(value: str) -> list[str]:
    """Host sources of a comma-separated ``SRC[:DEST[:OPTS]]`` list (``--bind``, $..._BIND)."""
    return [item.split(":", 1)[0] for item in value.split(",") if item.strip()]


def _mount_sources(value: str) -> list[str]:
    """Host sources of a ``--mount type=bind,src=...,dst=...`` spec."""
    out = []
    for field in value.split(","):
        key, _, v = field.partition("=")
        if key.strip() in ("src", "source") and v:
            out.append(v)
    return out


def _overlay_source(value: str) -> str:
    return value.split(":", 1)[0]


def bind_sources(config: HpcConfig, paths: UserPaths, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """Every host path the container would see besides its home: ``(option, host path)``."""
    names = paths.template_values()
    c = config.container
    for option, specs in (("container.binds", c.binds), ("container.extra_binds", c.extra_binds)):
        for spec in specs:
            yield option, render_template(spec, **names).split(":", 1)[0]
    nb = config.nbgrader
    if nb.exchange_dir:
        yield "nbgrader.exchange_dir", render_template(nb.exchange_dir, **names)
    if nb.config_file:
        yield "nbgrader.config_file", render_template(nb.config_file, **names)
    if config.webdav.enabled:
        yield "webdav.mount_point", paths.webdav_mount_point
    for v in _flag_values(c.extra_args, _BIND_FLAGS):
        for src in _bind_list_sources(v):
            yield "container.extra_args", src
    for v in _flag_values(c.extra_args, _MOUNT_FLAGS):
        for src in _mount_sources(v):
            yield "container.extra_args", src
    for v in _flag_values(c.extra_args, _OVERLAY_FLAGS):
        yield "container.extra_args", _overlay_source(v)
    for name in BIND_ENV:
        for src in _bind_list_sources(env.get(name, "")):
            yield f"${name} (job environment)", src
    for name in OVERLAY_ENV:
        for item in env.get(name, "").split(","):
            if item.strip():
                yield f"${name} (job environment)", _overlay_source(item)


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both normalised absolute paths)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def exposure(
    src: str, config: HpcConfig, paths: UserPaths, realpath: Callable[[str], str] = os.path.realpath
) -> str | None:
    """Why binding host path ``src`` would show this job another user's data; None if it does
    not (it is the user's own home or image, or lies outside the per-user directories)."""
    s = realpath(src)
    homes, own_home = realpath(paths.home_root), realpath(paths.home)
    if _within(s, own_home):
        return None
    if _within(homes, s):
        return (
            f"binds {src}, which holds every user's home ({paths.home_root}); bind only "
            f"the user's own home ({{home}}) or directories outside {paths.home_root}"
        )
    if _within(s, homes):
        return f"binds {src}, which is inside another user's home under {paths.home_root}"
    if config.overlay.enabled:
        own_img = realpath(paths.overlay)
        images = os.path.dirname(own_img)
        if s == own_img:
            return None
        if _within(images, s):
            return f"binds {src}, which holds every user's overlay image ({os.path.dirname(paths.overlay)})"
        if _within(s, images):
            return f"binds {src}, which is inside {os.path.dirname(paths.overlay)} (other users' overlay images)"
    return None


def check(
    config: HpcConfig, paths: UserPaths, env: Mapping[str, str], *, realpath: Callable[[str], str] = os.path.realpath
) -> list[Problem]:
    """What keeps the container from walling this job off from other users' jobs of the same
    account. Empty when ``isolation.shared_account`` is false or no container is used (in
    no-container mode only the batch system can keep users apart: see docs/deploy.md)."""
    c = config.container
    if not (config.isolation.shared_account and c.enabled):
        return []
    out: list[Problem] = []
    if c.contain not in ISOLATING_MODES:
        lacks = "no PID namespace and no private /tmp" if c.contain == "none" else "no PID namespace"
        out.append(
            Problem(
                "container.contain",
                (
                    f"{c.contain!r} gives the job {lacks}: another user's notebook on the same node "
                    f"runs as the same account and could list this job's processes and read their "
                    f'environment (/proc/PID/environ, with the hub API token); use "contain-pid" or '
                    f'"containall"'
                ),
            )
        )
    for v in _flag_values(c.extra_args, _WORKDIR_FLAGS):
        out.append(
            Problem(
                "container.extra_args",
                (
                    f"--workdir {v} makes {v}/tmp the /tmp of every job (shared between users); leave "
                    f"it out so that each job gets its own /tmp"
                ),
            )
        )
    for name in WORKDIR_ENV:
        if env.get(name):
            out.append(
                Problem(
                    f"${name} (job environment)",
                    (f"{env[name]}/tmp would be the /tmp of every job (shared between users); unset it"),
                )
            )
    for _v in _flag_values(c.extra_args, _HOME_FLAGS):
        out.append(
            Problem(
                "container.extra_args",
                (
                    "--home would replace the user's own home that launch binds; leave it out "
                    "(container.home sets where the home appears)"
                ),
            )
        )
    for option, src in bind_sources(config, paths, env):
        why = exposure(src, config, paths, realpath)
        if why:
            out.append(Problem(option, why))
    return out


def no_container_problem(config: HpcConfig, env: Mapping[str, str]) -> Problem | None:
    """No container under a shared account although the hub expected one (and so did not ask
    the batch system for a node to itself): nothing would keep other users off this node."""
    if not (config.isolation.shared_account and not config.container.enabled):
        return None
    if env.get(EXPECT_CONTAINER_ENV) != "1":
        return None
    return Problem(
        "container.enabled",
        (
            "is false, but the hub submitted this job expecting a container (SlurmBrokerSpawner."
            "jobs_in_container, by default true when agent_command runs node-agent launch), so "
            "it did not keep other users' jobs off this node; set c.SlurmBrokerSpawner."
            "jobs_in_container = False on the hub (jobs then get a node to themselves, "
            "node_exclusivity) or run the server in a container"
        ),
    )


def refusal(problems: list[Problem], source: str | None) -> str:
    """The error launch prints when it refuses to start (one line per problem, then the way out)."""
    where = f" ({source})" if source else ""
    lines = [f"hpc config error{where}: {p}" for p in problems]
    lines.append(
        "isolation.shared_account is true (all users' jobs run as one account, so the "
        "container is the only wall between them): fix the option(s) above, or set "
        "isolation.allow_weak = true to start anyway (docs/deploy.md)"
    )
    return "\n".join(lines)


__all__ = [
    "EXPECT_CONTAINER_ENV",
    "PRIVATE_TMP",
    "Problem",
    "bind_sources",
    "check",
    "exposure",
    "no_container_problem",
    "private_dirs_env",
    "refusal",
]
