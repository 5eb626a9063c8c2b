"""The schema of the HPC config file: every option, its type, default and help, in one table.

``SCHEMA`` is the single source of truth. Validation (:mod:`node_agent.hpc_validate`) checks
each value against its option and fills in the defaults from here; the model
(:mod:`node_agent.hpc_model`) has no defaults of its own; ``docs/hpc-config.md``
(:mod:`node_agent.hpc_docs`), the TOML writer's comments (:mod:`node_agent.hpc_toml`) and the
wizard's defaults all follow it. Only the standard library is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTAIN_MODES = {
    # name: runtime flags
    "none": [],
    "contain": ["--contain"],
    "contain-pid": ["--contain", "--pid"],
    "containall": ["--containall"],
}
# modes in which the runtime starts from an empty environment (--containall implies --cleanenv)
CLEANENV_MODES = {"containall"}
# modes that give each job its own PID namespace and a private /tmp (what a shared account needs)
ISOLATING_MODES = {"contain-pid", "containall"}


@dataclass(frozen=True)
class Option:
    """One option ``section.name``.

    ``kind`` says how a value is checked and what the model holds: ``bool``; ``int`` (at least
    ``minimum``); ``str``, ``size``, ``path`` (absolute after ``~``/``$VAR`` expansion),
    ``template`` (a path with ``placeholders``) and ``choice`` (one of ``choices``) are strings;
    ``list``, ``argv`` (an argv template with ``placeholders``) and ``binds`` are lists of
    strings; ``envmap`` is a table of strings. ``default`` is the value as it would be written
    in the file (not yet expanded); ``help`` is Markdown.
    """

    section: str
    name: str
    kind: str  # bool | str | int | size | path | template | choice | list | argv | binds | envmap
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()  # for templates / argv templates
    minimum: int | None = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def type_name(self) -> str:
        return {
            "bool": "bool",
            "str": "string",
            "int": "integer",
            "size": "size string",
            "path": "path",
            "template": "path template",
            "choice": "one of " + ", ".join(repr(c) for c in self.choices),
            "list": "list of strings",
            "argv": "list of strings (argv template)",
            "binds": "list of bind specs",
            "envmap": "table of string → string",
        }[self.kind]


# placeholders available in per-user path templates
PATH_VARS = ("user", "scratch_dir", "home_root")
HOME_VARS = PATH_VARS + ("home",)

SCHEMA: tuple[Option, ...] = (
    # maintenance
    Option(
        "maintenance",
        "enabled",
        "bool",
        False,
        "When true, launches stop at once with `maintenance.message` (exit code 75).",
    ),
    Option(
        "maintenance",
        "message",
        "str",
        "The HPC cluster is in maintenance. Please try again later.",
        "Message shown to users (printed to stderr as `NODE-AGENT-MAINTENANCE: <message>`).",
    ),
    Option(
        "maintenance",
        "allowed_users",
        "list",
        [],
        "JupyterHub user names that may still start servers during maintenance "
        "(shell-style patterns allowed, e.g. `admin-*`).",
    ),
    # storage
    Option(
        "storage",
        "scratch_dir",
        "path",
        "~/jupyterhub-hpc",
        "Base directory for everything the agent keeps on the cluster (homes, overlays, logs). "
        "`~` and `$VAR` are expanded.",
    ),
    Option(
        "storage",
        "home_root",
        "template",
        "{scratch_dir}/homes",
        "Directory that holds one home directory per user (`{home_root}/{user}`).",
        placeholders=("scratch_dir",),
    ),
    Option(
        "storage",
        "create_home",
        "bool",
        True,
        "Create the user's home on first launch. When false and the home does not exist, "
        "the job gets a throw-away home (changes are lost when the job ends).",
    ),
    Option("storage", "home_mode", "str", "0700", "Permission bits (octal) for newly created home directories."),
    # logging
    Option("logging", "enabled", "bool", True, "Write a launch log file in `logging.dir`."),
    Option(
        "logging", "dir", "template", "{scratch_dir}/log", "Directory for launch log files.", placeholders=PATH_VARS
    ),
    Option(
        "logging",
        "per_day",
        "bool",
        True,
        "One log file per day (`node-agent-<date>.log`) instead of a single `node-agent.log`.",
    ),
    Option("logging", "date_format", "str", "%Y-%m-%d", "strftime format of the date in per-day log file names."),
    Option(
        "logging",
        "debug",
        "bool",
        False,
        "Log debug detail (the full container command, timings). Environment values are never logged.",
    ),
    # overlay
    Option(
        "overlay",
        "enabled",
        "bool",
        True,
        "Give each user a persistent ext3 overlay image (`--overlay`) so changes to the "
        "container's file system survive between jobs.",
    ),
    Option(
        "overlay",
        "size",
        "size",
        "2G",
        "Size of a new overlay image, e.g. `512M`, `2G` (minimum 4M). Existing images are never resized.",
    ),
    Option(
        "overlay",
        "location",
        "template",
        "{scratch_dir}/overlays/{user}.img",
        "Path of the user's overlay image.",
        placeholders=HOME_VARS,
    ),
    Option(
        "overlay",
        "create",
        "bool",
        True,
        "Create the overlay on first launch. When false, a missing overlay means the job runs without one.",
    ),
    Option(
        "overlay",
        "check",
        "choice",
        "quick",
        "How an existing overlay is checked before use: `quick` (ext superblock and size), "
        "`fsck` (also `e2fsck -n`), `none`.",
        choices=("quick", "fsck", "none"),
    ),
    Option(
        "overlay",
        "when_busy",
        "choice",
        "readonly",
        "What to do when another job of the same user already uses the overlay: mount it "
        "`readonly`, run `without` it, or `fail`.",
        choices=("readonly", "without", "fail"),
    ),
    Option(
        "overlay",
        "lock_timeout",
        "int",
        300,
        "Seconds to wait for another launch that is creating the same overlay.",
        minimum=1,
    ),
    # container
    Option(
        "container",
        "enabled",
        "bool",
        True,
        "Run the server in an Apptainer/Singularity container. False = no-container mode "
        "(the command runs directly on the node).",
    ),
    Option(
        "container",
        "runtime",
        "str",
        "apptainer",
        "Container runtime binary: `apptainer`, `singularity`, or an absolute path.",
    ),
    Option(
        "container",
        "load_command",
        "str",
        "",
        "Shell line run before the runtime is looked up, e.g. `module load apptainer`. "
        "Its environment changes (PATH, ...) are kept. Admin-controlled; never contains "
        "user input.",
    ),
    Option(
        "container",
        "load_shell",
        "argv",
        ["/bin/bash", "-lc"],
        "Shell used to run `container.load_command` (the line is appended as one argument).",
    ),
    Option(
        "container",
        "image",
        "path",
        "",
        "Image for ordinary compute nodes (SIF file or sandbox directory). Required when `container.enabled` is true.",
    ),
    Option("container", "gpu_image", "path", "", "Image for GPU nodes; empty = use `container.image`."),
    Option(
        "container",
        "gpu",
        "choice",
        "auto",
        "Whether the job is a GPU job: `auto` (GPUs visible via CUDA_VISIBLE_DEVICES, "
        "SLURM_JOB_GPUS, ...), `always`, `never`. `node-agent launch --gpu/--no-gpu` wins.",
        choices=("auto", "always", "never"),
    ),
    Option(
        "container", "gpu_flag", "str", "--nv", "Runtime flag that enables GPUs (`--nv` for NVIDIA, `--rocm` for AMD)."
    ),
    Option(
        "container",
        "home",
        "str",
        "/home/jovyan",
        "The user's home directory inside the container (`--home HOST:CONTAINER`).",
    ),
    Option(
        "container",
        "workdir",
        "str",
        "",
        "Working directory inside the container (`--pwd`); empty = the container home.",
    ),
    Option(
        "container",
        "binds",
        "binds",
        [],
        "Fixed binds, `SRC[:DEST[:ro|rw]]`, always added (site software, shared data). "
        "Templates: {user}, {home}, {scratch_dir}, {home_root}, {container_home}.",
        placeholders=HOME_VARS + ("container_home",),
    ),
    Option(
        "container",
        "extra_binds",
        "binds",
        [],
        "Optional extra binds added after the fixed ones (course data, ...); same syntax. "
        "A bind whose source does not exist is skipped with a log line.",
        placeholders=HOME_VARS + ("container_home",),
    ),
    Option(
        "container",
        "no_mount",
        "list",
        [],
        'Runtime mounts to disable (`--no-mount`), e.g. `["tmp", "cwd", "/etc/hosts"]`.',
    ),
    Option(
        "container",
        "contain",
        "choice",
        "contain-pid",
        "Isolation: `contain-pid` (`--contain --pid`: private /tmp, /dev and PID namespace; "
        "the default), `containall` (`--containall`, also a clean environment and IPC "
        "namespace), `contain`, `none`. With `isolation.shared_account` launch accepts only "
        "`contain-pid` and `containall`.",
        choices=tuple(CONTAIN_MODES),
    ),
    Option(
        "container",
        "pass_env",
        "list",
        ["JUPYTERHUB_*", "JPY_*", "NODE_AGENT_*", "BROKER_*", "SLURM_*", "CUDA_VISIBLE_DEVICES", "TZ", "LANG", "LC_*"],
        'With `contain = "containall"` (clean environment): variables (shell patterns) '
        "forwarded into the container through the environment (never on argv).",
    ),
    Option(
        "container",
        "extra_args",
        "list",
        [],
        'Extra runtime arguments inserted before the image (e.g. `["--writable-tmpfs"]`).',
    ),
    Option(
        "container",
        "inner_command",
        "argv",
        ["node-agent", "run"],
        "Command run inside the container (or on the node in no-container mode) before "
        "`-- CMD...`. Empty list = run CMD itself.",
    ),
    # nbgrader
    Option(
        "nbgrader",
        "exchange_dir",
        "template",
        "",
        "Host directory of the nbgrader exchange; empty = none. Bound to `nbgrader.exchange_mount`.",
        placeholders=HOME_VARS,
    ),
    Option(
        "nbgrader",
        "exchange_mount",
        "str",
        "/srv/nbgrader/exchange",
        "Where the exchange directory appears in the container.",
    ),
    Option(
        "nbgrader",
        "config_file",
        "template",
        "",
        "Host path of an `nbgrader_config.py` to bind read-only; empty = none.",
        placeholders=HOME_VARS,
    ),
    Option(
        "nbgrader",
        "config_mount",
        "str",
        "/etc/jupyter/nbgrader_config.py",
        "Where `nbgrader.config_file` appears in the container.",
    ),
    # webdav
    Option(
        "webdav",
        "enabled",
        "bool",
        False,
        "Mount a WebDAV share on the node before the container starts and bind it in.",
    ),
    Option(
        "webdav",
        "url",
        "str",
        "",
        "Default share URL (http/https with a host name). A per-user URL in the environment "
        "variable named by `webdav.url_env` wins.",
    ),
    Option(
        "webdav", "url_env", "str", "NODE_AGENT_WEBDAV_URL", "Environment variable that may carry the user's share URL."
    ),
    Option(
        "webdav",
        "mount_command",
        "argv",
        [],
        "Mount command as an argv template (no shell): placeholders {url}, {mount_point}, "
        '{user}, {home}. Example: `["rclone", "mount", "--daemon", ":webdav:", '
        '"{mount_point}", "--webdav-url", "{url}"]`.',
        placeholders=("url", "mount_point", "user", "home"),
    ),
    Option(
        "webdav",
        "credential_env",
        "envmap",
        {},
        "Credentials for the mount command, from the environment only: maps the name the "
        "mount command reads to the job variable holding the value, e.g. "
        '`{RCLONE_WEBDAV_PASS = "NODE_AGENT_WEBDAV_PASSWORD"}`.',
    ),
    Option("webdav", "mount_point", "template", "{home}/WebDAV", "Mount point on the node.", placeholders=HOME_VARS),
    Option(
        "webdav",
        "container_mount_point",
        "str",
        "",
        "Where the share appears in the container; empty = `<container.home>/WebDAV`.",
    ),
    Option(
        "webdav",
        "required",
        "bool",
        False,
        "Fail the launch when the mount fails (otherwise log and continue without it).",
    ),
    Option(
        "webdav",
        "unmount_command",
        "argv",
        ["umount", "{mount_point}"],
        "Unmount command (argv template, no shell; placeholders {mount_point}, {user}, "
        "{home}). When launch mounted the share it runs the container command as a child "
        "(passing on SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2), runs this after the child "
        "exits and exits with the child's status. For rclone or other FUSE mounts made as "
        'a normal user: `["fusermount", "-u", "{mount_point}"]` (or '
        "`fusermount3`). Empty = never unmount (launch execs the container command, the "
        "share outlives the job).",
        placeholders=("mount_point", "user", "home"),
    ),
    Option("webdav", "timeout", "int", 60, "Seconds the mount command (and the unmount command) may take.", minimum=1),
    # isolation between users (docs/deploy.md)
    Option(
        "isolation",
        "shared_account",
        "bool",
        True,
        "All users' jobs run as ONE cluster account (the hub's service account, "
        '`submit_as = "service"`). The container is then the only wall between users '
        "who share a node, so launch refuses a container setup without a PID namespace and "
        "a private /tmp (`container.contain` must be `contain-pid` or `containall`), one that "
        "binds the home root, another user's home or overlay, or one that shares /tmp "
        "between jobs (`--workdir`). Set false only when every job runs as the user's own "
        'Unix account (`submit_as = "user"`).',
    ),
    Option(
        "isolation",
        "allow_weak",
        "bool",
        False,
        "Start even when the `isolation.shared_account` checks fail (each problem is logged "
        "as a warning at every launch). Only for single-user machines and tests: another "
        "user's notebook on the same node can then read this job's environment, including "
        "its hub API token.",
    ),
)

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(o.section for o in SCHEMA))
OPTIONS: dict[str, Option] = {o.key: o for o in SCHEMA}


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    """Every option's default as a ``{section: {option: default}}`` document (not expanded)."""
    out: dict[str, dict[str, Any]] = {}
    for o in SCHEMA:
        out.setdefault(o.section, {})[o.name] = o.default
    return out


__all__ = [
    "CLEANENV_MODES",
    "CONTAIN_MODES",
    "HOME_VARS",
    "ISOLATING_MODES",
    "OPTIONS",
    "PATH_VARS",
    "SCHEMA",
    "SECTIONS",
    "Option",
    "defaults_as_dict",
]
