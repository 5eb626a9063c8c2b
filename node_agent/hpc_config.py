"""The HPC-side configuration of the node agent: one TOML file, validated at start.

Everything the batch job does on the compute node before the agent's tunnel starts (maintenance
check, user home and overlay, container command, WebDAV mount, logging) is driven by this file.
Only the Python standard library is used here (``tomllib``, Python >= 3.11).

Every error names the option and the reason, for example::

    hpc config error: overlay.size: must be like '2G' or '512M', got 'big'

The schema below (``SCHEMA``) is the single source of truth: validation, defaults, the dataclass
model, ``docs/hpc-config.md`` and the wizard's output all follow it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import re
import string
import textwrap
from dataclasses import dataclass, field
from typing import Any

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with the tomli backport
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

CONFIG_ENV = "NODE_AGENT_HPC_CONFIG"
DEFAULT_CONFIG_PATHS = (
    "~/.config/node-agent/hpc-config.toml",
    "/etc/node-agent/hpc-config.toml",
)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_OVERLAY_BYTES = 4 << 20

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


class HpcConfigError(Exception):
    """One or more configuration errors; ``errors`` holds (option, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return "\n".join(f"hpc config error{where}: {opt}: {why}" for opt, why in self.errors)


# --------------------------------------------------------------------------------------------
# user names


class UserNameError(ValueError):
    pass


_SAFE_CHARS = set(string.ascii_letters + string.digits + ".-")
MAX_USER_LEN = 128


def validate_username(name: str | None) -> str:
    """Reject user names that can never be used safely; return the name unchanged otherwise."""
    if name is None or name == "":
        raise UserNameError("user name is empty (is JUPYTERHUB_USER set?)")
    if "\x00" in name:
        raise UserNameError("user name contains a NUL byte")
    if "/" in name or "\\" in name:
        raise UserNameError("user name contains a path separator")
    if name in (".", "..") or ".." in name:
        raise UserNameError("user name contains '..'")
    if len(name) > MAX_USER_LEN:
        raise UserNameError(f"user name is longer than {MAX_USER_LEN} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UserNameError("user name contains control characters")
    return name


def safe_username(name: str) -> str:
    """Map a validated user name to a string usable as one path component.

    Letters, digits, '.' and '-' are kept; every other character (including '_' itself, so the
    mapping is one-to-one) becomes '_' plus the hex of its UTF-8 bytes. A leading '.' or '-' is
    escaped too (no hidden files, nothing that looks like an option).
    """
    validate_username(name)
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE_CHARS and not (i == 0 and ch in ".-"):
            out.append(ch)
        else:
            out.append("".join(f"_{b:02x}" for b in ch.encode("utf-8")))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# schema


@dataclass(frozen=True)
class Option:
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
CONTAINER_VARS = ("user", "container_home")

SCHEMA: tuple[Option, ...] = (
    # maintenance
    Option("maintenance", "enabled", "bool", False,
           "When true, launches stop at once with `maintenance.message` (exit code 75)."),
    Option("maintenance", "message", "str",
           "The HPC cluster is in maintenance. Please try again later.",
           "Message shown to users (printed to stderr as `NODE-AGENT-MAINTENANCE: <message>`)."),
    Option("maintenance", "allowed_users", "list", [],
           "JupyterHub user names that may still start servers during maintenance "
           "(shell-style patterns allowed, e.g. `admin-*`)."),
    # storage
    Option("storage", "scratch_dir", "path", "~/jupyterhub-hpc",
           "Base directory for everything the agent keeps on the cluster (homes, overlays, logs). "
           "`~` and `$VAR` are expanded."),
    Option("storage", "home_root", "template", "{scratch_dir}/homes",
           "Directory that holds one home directory per user (`{home_root}/{user}`).",
           placeholders=("scratch_dir",)),
    Option("storage", "create_home", "bool", True,
           "Create the user's home on first launch. When false and the home does not exist, "
           "the job gets a throw-away home (changes are lost when the job ends)."),
    Option("storage", "home_mode", "str", "0700",
           "Permission bits (octal) for newly created home directories."),
    # logging
    Option("logging", "enabled", "bool", True, "Write a launch log file in `logging.dir`."),
    Option("logging", "dir", "template", "{scratch_dir}/log",
           "Directory for launch log files.", placeholders=PATH_VARS),
    Option("logging", "per_day", "bool", True,
           "One log file per day (`node-agent-<date>.log`) instead of a single `node-agent.log`."),
    Option("logging", "date_format", "str", "%Y-%m-%d",
           "strftime format of the date in per-day log file names."),
    Option("logging", "debug", "bool", False,
           "Log debug detail (the full container command, timings). Environment values are "
           "never logged."),
    # overlay
    Option("overlay", "enabled", "bool", True,
           "Give each user a persistent ext3 overlay image (`--overlay`) so changes to the "
           "container's file system survive between jobs."),
    Option("overlay", "size", "size", "2G",
           "Size of a new overlay image, e.g. `512M`, `2G` (minimum 4M). Existing images are "
           "never resized."),
    Option("overlay", "location", "template", "{scratch_dir}/overlays/{user}.img",
           "Path of the user's overlay image.", placeholders=HOME_VARS),
    Option("overlay", "create", "bool", True,
           "Create the overlay on first launch. When false, a missing overlay means the job "
           "runs without one."),
    Option("overlay", "check", "choice", "quick",
           "How an existing overlay is checked before use: `quick` (ext superblock and size), "
           "`fsck` (also `e2fsck -n`), `none`.", choices=("quick", "fsck", "none")),
    Option("overlay", "when_busy", "choice", "readonly",
           "What to do when another job of the same user already uses the overlay: mount it "
           "`readonly`, run `without` it, or `fail`.", choices=("readonly", "without", "fail")),
    Option("overlay", "lock_timeout", "int", 300,
           "Seconds to wait for another launch that is creating the same overlay.", minimum=1),
    # container
    Option("container", "enabled", "bool", True,
           "Run the server in an Apptainer/Singularity container. False = no-container mode "
           "(the command runs directly on the node)."),
    Option("container", "runtime", "str", "apptainer",
           "Container runtime binary: `apptainer`, `singularity`, or an absolute path."),
    Option("container", "load_command", "str", "",
           "Shell line run before the runtime is looked up, e.g. `module load apptainer`. "
           "Its environment changes (PATH, ...) are kept. Admin-controlled; never contains "
           "user input."),
    Option("container", "load_shell", "argv", ["/bin/bash", "-lc"],
           "Shell used to run `container.load_command` (the line is appended as one argument)."),
    Option("container", "image", "path", "",
           "Image for ordinary compute nodes (SIF file or sandbox directory). Required when "
           "`container.enabled` is true."),
    Option("container", "gpu_image", "path", "",
           "Image for GPU nodes; empty = use `container.image`."),
    Option("container", "gpu", "choice", "auto",
           "Whether the job is a GPU job: `auto` (GPUs visible via CUDA_VISIBLE_DEVICES, "
           "SLURM_JOB_GPUS, ...), `always`, `never`. `node-agent launch --gpu/--no-gpu` wins.",
           choices=("auto", "always", "never")),
    Option("container", "gpu_flag", "str", "--nv",
           "Runtime flag that enables GPUs (`--nv` for NVIDIA, `--rocm` for AMD)."),
    Option("container", "home", "str", "/home/jovyan",
           "The user's home directory inside the container (`--home HOST:CONTAINER`)."),
    Option("container", "workdir", "str", "",
           "Working directory inside the container (`--pwd`); empty = the container home."),
    Option("container", "binds", "binds", [],
           "Fixed binds, `SRC[:DEST[:ro|rw]]`, always added (site software, shared data). "
           "Templates: {user}, {home}, {scratch_dir}, {home_root}, {container_home}.",
           placeholders=HOME_VARS + ("container_home",)),
    Option("container", "extra_binds", "binds", [],
           "Optional extra binds added after the fixed ones (course data, ...); same syntax. "
           "A bind whose source does not exist is skipped with a log line.",
           placeholders=HOME_VARS + ("container_home",)),
    Option("container", "no_mount", "list", [],
           "Runtime mounts to disable (`--no-mount`), e.g. `[\"tmp\", \"cwd\", \"/etc/hosts\"]`."),
    Option("container", "contain", "choice", "contain-pid",
           "Isolation: `contain-pid` (`--contain --pid`: private /tmp, /dev and PID namespace; "
           "the default), `containall` (`--containall`, also a clean environment and IPC "
           "namespace), `contain`, `none`. With `isolation.shared_account` launch accepts only "
           "`contain-pid` and `containall`.",
           choices=tuple(CONTAIN_MODES)),
    Option("container", "pass_env", "list",
           ["JUPYTERHUB_*", "JPY_*", "NODE_AGENT_*", "BROKER_*", "SLURM_*", "CUDA_VISIBLE_DEVICES",
            "TZ", "LANG", "LC_*"],
           "With `contain = \"containall\"` (clean environment): variables (shell patterns) "
           "forwarded into the container through the environment (never on argv)."),
    Option("container", "extra_args", "list", [],
           "Extra runtime arguments inserted before the image (e.g. `[\"--writable-tmpfs\"]`)."),
    Option("container", "inner_command", "argv", ["node-agent", "run"],
           "Command run inside the container (or on the node in no-container mode) before "
           "`-- CMD...`. Empty list = run CMD itself."),
    # nbgrader
    Option("nbgrader", "exchange_dir", "template", "",
           "Host directory of the nbgrader exchange; empty = none. Bound to "
           "`nbgrader.exchange_mount`.", placeholders=HOME_VARS),
    Option("nbgrader", "exchange_mount", "str", "/srv/nbgrader/exchange",
           "Where the exchange directory appears in the container."),
    Option("nbgrader", "config_file", "template", "",
           "Host path of an `nbgrader_config.py` to bind read-only; empty = none.",
           placeholders=HOME_VARS),
    Option("nbgrader", "config_mount", "str", "/etc/jupyter/nbgrader_config.py",
           "Where `nbgrader.config_file` appears in the container."),
    # webdav
    Option("webdav", "enabled", "bool", False,
           "Mount a WebDAV share on the node before the container starts and bind it in."),
    Option("webdav", "url", "str", "",
           "Default share URL (http/https with a host name). A per-user URL in the environment "
           "variable named by `webdav.url_env` wins."),
    Option("webdav", "url_env", "str", "NODE_AGENT_WEBDAV_URL",
           "Environment variable that may carry the user's share URL."),
    Option("webdav", "mount_command", "argv", [],
           "Mount command as an argv template (no shell): placeholders {url}, {mount_point}, "
           "{user}, {home}. Example: `[\"rclone\", \"mount\", \"--daemon\", \":webdav:\", "
           "\"{mount_point}\", \"--webdav-url\", \"{url}\"]`.",
           placeholders=("url", "mount_point", "user", "home")),
    Option("webdav", "credential_env", "envmap", {},
           "Credentials for the mount command, from the environment only: maps the name the "
           "mount command reads to the job variable holding the value, e.g. "
           "`{RCLONE_WEBDAV_PASS = \"NODE_AGENT_WEBDAV_PASSWORD\"}`."),
    Option("webdav", "mount_point", "template", "{home}/WebDAV",
           "Mount point on the node.", placeholders=HOME_VARS),
    Option("webdav", "container_mount_point", "str", "",
           "Where the share appears in the container; empty = `<container.home>/WebDAV`."),
    Option("webdav", "required", "bool", False,
           "Fail the launch when the mount fails (otherwise log and continue without it)."),
    Option("webdav", "unmount_command", "argv", ["umount", "{mount_point}"],
           "Unmount command (argv template, no shell; placeholders {mount_point}, {user}, "
           "{home}). When launch mounted the share it runs the container command as a child "
           "(passing on SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2), runs this after the child "
           "exits and exits with the child's status. For rclone or other FUSE mounts made as "
           "a normal user: `[\"fusermount\", \"-u\", \"{mount_point}\"]` (or "
           "`fusermount3`). Empty = never unmount (launch execs the container command, the "
           "share outlives the job).",
           placeholders=("mount_point", "user", "home")),
    Option("webdav", "timeout", "int", 60,
           "Seconds the mount command (and the unmount command) may take.", minimum=1),
    # isolation between users (docs/deploy.md)
    Option("isolation", "shared_account", "bool", True,
           "All users' jobs run as ONE cluster account (the hub's service account, "
           "`submit_as = \"service\"`). The container is then the only wall between users "
           "who share a node, so launch refuses a container setup without a PID namespace and "
           "a private /tmp (`container.contain` must be `contain-pid` or `containall`), one that "
           "binds the home root, another user's home or overlay, or one that shares /tmp "
           "between jobs (`--workdir`). Set false only when every job runs as the user's own "
           "Unix account (`submit_as = \"user\"`)."),
    Option("isolation", "allow_weak", "bool", False,
           "Start even when the `isolation.shared_account` checks fail (each problem is logged "
           "as a warning at every launch). Only for single-user machines and tests: another "
           "user's notebook on the same node can then read this job's environment, including "
           "its hub API token."),
)

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(o.section for o in SCHEMA))
OPTIONS: dict[str, Option] = {o.key: o for o in SCHEMA}


# --------------------------------------------------------------------------------------------
# dataclass model


@dataclass
class MaintenanceConfig:
    enabled: bool = False
    message: str = OPTIONS["maintenance.message"].default
    allowed_users: list[str] = field(default_factory=list)


@dataclass
class StorageConfig:
    scratch_dir: str = ""
    home_root: str = "{scratch_dir}/homes"
    create_home: bool = True
    home_mode: int = 0o700


@dataclass
class LoggingConfig:
    enabled: bool = True
    dir: str = "{scratch_dir}/log"
    per_day: bool = True
    date_format: str = "%Y-%m-%d"
    debug: bool = False


@dataclass
class OverlayConfig:
    enabled: bool = True
    size: str = "2G"
    size_bytes: int = 2 << 30
    location: str = "{scratch_dir}/overlays/{user}.img"
    create: bool = True
    check: str = "quick"
    when_busy: str = "readonly"
    lock_timeout: int = 300


@dataclass
class ContainerConfig:
    enabled: bool = True
    runtime: str = "apptainer"
    load_command: str = ""
    load_shell: list[str] = field(default_factory=lambda: ["/bin/bash", "-lc"])
    image: str = ""
    gpu_image: str = ""
    gpu: str = "auto"
    gpu_flag: str = "--nv"
    home: str = "/home/jovyan"
    workdir: str = ""
    binds: list[str] = field(default_factory=list)
    extra_binds: list[str] = field(default_factory=list)
    no_mount: list[str] = field(default_factory=list)
    contain: str = "contain-pid"
    pass_env: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    inner_command: list[str] = field(default_factory=lambda: ["node-agent", "run"])


@dataclass
class NbgraderConfig:
    exchange_dir: str = ""
    exchange_mount: str = "/srv/nbgrader/exchange"
    config_file: str = ""
    config_mount: str = "/etc/jupyter/nbgrader_config.py"


@dataclass
class WebdavConfig:
    enabled: bool = False
    url: str = ""
    url_env: str = "NODE_AGENT_WEBDAV_URL"
    mount_command: list[str] = field(default_factory=list)
    credential_env: dict[str, str] = field(default_factory=dict)
    mount_point: str = "{home}/WebDAV"
    container_mount_point: str = ""
    required: bool = False
    unmount_command: list[str] = field(default_factory=lambda: ["umount", "{mount_point}"])
    timeout: int = 60


@dataclass
class IsolationConfig:
    shared_account: bool = True
    allow_weak: bool = False


@dataclass
class UserPaths:
    """The per-user paths of one launch (all absolute, host side unless named container_*)."""

    user: str  # the raw JupyterHub user name
    safe_user: str  # the escaped path component
    scratch_dir: str
    home_root: str
    home: str
    container_home: str
    overlay: str
    log_dir: str
    webdav_mount_point: str
    container_webdav_mount_point: str


@dataclass
class HpcConfig:
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    container: ContainerConfig = field(default_factory=ContainerConfig)
    nbgrader: NbgraderConfig = field(default_factory=NbgraderConfig)
    webdav: WebdavConfig = field(default_factory=WebdavConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    source: str | None = None

    # ---- helpers used by launch -------------------------------------------------------------
    def is_maintenance_blocked(self, user: str) -> bool:
        if not self.maintenance.enabled:
            return False
        return not any(fnmatch.fnmatchcase(user, pat) for pat in self.maintenance.allowed_users)

    def user_paths(self, user: str) -> UserPaths:
        safe = safe_username(user)
        scratch = self.storage.scratch_dir
        home_root = os.path.normpath(render_template(self.storage.home_root, scratch_dir=scratch))
        home = os.path.join(home_root, safe)
        names = dict(user=safe, scratch_dir=scratch, home_root=home_root, home=home)
        chome = self.container.home
        return UserPaths(
            user=user,
            safe_user=safe,
            scratch_dir=scratch,
            home_root=home_root,
            home=home,
            container_home=chome,
            overlay=os.path.normpath(render_template(self.overlay.location, **names)),
            log_dir=os.path.normpath(render_template(self.logging.dir, **names)),
            webdav_mount_point=os.path.normpath(render_template(self.webdav.mount_point, **names)),
            container_webdav_mount_point=self.webdav.container_mount_point
            or os.path.join(chome, "WebDAV"),
        )

    def image_for(self, gpu: bool) -> str:
        if gpu and self.container.gpu_image:
            return self.container.gpu_image
        return self.container.image


# --------------------------------------------------------------------------------------------
# templates


def template_fields(template: str) -> list[str]:
    """Names used in a ``{name}`` template; raises ValueError on malformed braces."""
    names = []
    for _lit, fname, spec, conv in string.Formatter().parse(template):
        if fname is None:
            continue
        if fname == "" or not fname.isidentifier():
            raise ValueError(f"bad placeholder {{{fname}}} (use {{name}}; write {{{{ for a brace)")
        if spec or conv:
            raise ValueError(f"placeholder {{{fname}}} must not have a format spec or conversion")
        names.append(fname)
    return names


def render_template(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders. Values are inserted literally (never re-parsed)."""
    out = []
    for lit, fname, _spec, _conv in string.Formatter().parse(template):
        out.append(lit)
        if fname is not None:
            out.append(str(values[fname]))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# validation


def parse_size(value: str) -> int:
    m = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"must be like '2G' or '512M', got {value!r}")
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if n < MIN_OVERLAY_BYTES:
        raise ValueError(f"must be at least 4M, got {value!r}")
    return n


def _describe(v: Any) -> str:
    t = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
         dict: "table"}.get(type(v), type(v).__name__)
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{r} ({t})"


def _expand_path(value: str) -> str:
    value = os.path.expanduser(value)

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in os.environ:
            raise ValueError(f"environment variable ${name} is not set")
        return os.environ[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", repl, value)


def _check_abs_template(value: str, allowed: tuple[str, ...]) -> None:
    used = template_fields(value)
    bad = [n for n in used if n not in allowed]
    if bad:
        raise ValueError(
            f"unknown placeholder {{{bad[0]}}}; allowed: "
            + ", ".join("{" + a + "}" for a in allowed)
        )
    if not (value.startswith("/") or value.startswith("{")):
        raise ValueError(f"must be an absolute path, got {value!r}")


_BIND_OPTS = {"ro", "rw"}


def _check_bind(spec: str, allowed: tuple[str, ...]) -> None:
    if not spec or "," in spec:
        raise ValueError(f"bind {spec!r}: must be SRC[:DEST[:ro|rw]], one bind per list item")
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"bind {spec!r}: too many ':' (SRC[:DEST[:ro|rw]])")
    if len(parts) == 3 and parts[2] not in _BIND_OPTS:
        raise ValueError(f"bind {spec!r}: option must be 'ro' or 'rw', got {parts[2]!r}")
    for p in parts[:2]:
        try:
            _check_abs_template(p, allowed)
        except ValueError as e:
            raise ValueError(f"bind {spec!r}: {e}") from None


def _coerce(opt: Option, value: Any) -> Any:
    """Type-check one value; return the normalised value or raise ValueError(reason)."""
    k = opt.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_describe(value)}")
        return value
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_describe(value)}")
        if opt.minimum is not None and value < opt.minimum:
            raise ValueError(f"must be >= {opt.minimum}, got {value}")
        return value
    if k in ("str", "size", "path", "template", "choice"):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        if k == "size":
            parse_size(value)
        elif k == "choice" and value not in opt.choices:
            close = difflib.get_close_matches(value, opt.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"must be one of {', '.join(map(repr, opt.choices))}, got {value!r}{hint}")
        elif k == "path" and value:
            value = os.path.normpath(_expand_path(value))
            if not os.path.isabs(value):
                raise ValueError(f"must be an absolute path (or start with ~), got {value!r}")
        elif k == "template" and value:
            value = _expand_path(value)
            _check_abs_template(value, opt.placeholders)
        return value
    if k in ("list", "argv", "binds"):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"must be a list of strings, got {_describe(value)}")
        for i, x in enumerate(value):
            if "\x00" in x:
                raise ValueError(f"item {i} must not contain a NUL character")
        if k == "argv":
            for i, x in enumerate(value):
                try:
                    used = template_fields(x)
                except ValueError as e:
                    raise ValueError(f"item {i} ({x!r}): {e}") from None
                bad = [n for n in used if n not in opt.placeholders]
                if bad:
                    allowed = ", ".join("{" + a + "}" for a in opt.placeholders) or "none"
                    raise ValueError(
                        f"item {i} ({x!r}): unknown placeholder {{{bad[0]}}}; allowed: {allowed}")
        if k == "binds":
            value = [_expand_path(x) for x in value]
            for x in value:
                _check_bind(x, opt.placeholders)
        return list(value)
    if k == "envmap":
        if not isinstance(value, dict) or not all(
            isinstance(a, str) and isinstance(b, str) for a, b in value.items()
        ):
            raise ValueError(f"must be a table of strings, got {_describe(value)}")
        for a, b in value.items():
            for n in (a, b):
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n):
                    raise ValueError(f"{n!r} is not a valid environment variable name")
        return dict(value)
    raise AssertionError(k)  # pragma: no cover


def _unknown(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(data: dict, source: str | None = None) -> HpcConfig:
    """Validate a parsed TOML document and build the model. Raises HpcConfigError."""
    errors: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise HpcConfigError([("(file)", "must be a TOML table")], source)
    values: dict[str, Any] = {}
    for sec, body in data.items():
        if sec not in SECTIONS:
            if sec in {o.name for o in SCHEMA}:
                owners = [o.key for o in SCHEMA if o.name == sec]
                errors.append((sec, f"unknown option at top level (did you mean {owners[0]!r}?)"))
            else:
                errors.append((sec, "unknown section" + _unknown(sec, list(SECTIONS))))
            continue
        if not isinstance(body, dict):
            errors.append((sec, f"must be a table ([{sec}]), got {_describe(body)}"))
            continue
        for name, v in body.items():
            key = f"{sec}.{name}"
            opt = OPTIONS.get(key)
            if opt is None:
                errors.append((key, "unknown option" + _unknown(key, list(OPTIONS))))
                continue
            try:
                values[key] = _coerce(opt, v)
            except ValueError as e:
                errors.append((key, str(e)))

    def get(key: str) -> Any:
        if key in values:
            return values[key]
        opt = OPTIONS[key]
        d = opt.default
        if opt.kind == "path" and d:
            return os.path.normpath(_expand_path(d))
        if opt.kind == "template" and d:
            return _expand_path(d)
        return list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d

    # cross-field rules
    mode = get("storage.home_mode")
    try:
        home_mode = int(mode, 8)
        if not 0 <= home_mode <= 0o7777:
            raise ValueError
    except ValueError:
        errors.append(("storage.home_mode", f"must be an octal mode like '0700', got {mode!r}"))
        home_mode = 0o700
    if get("container.enabled"):
        if not get("container.image") and "container.image" not in {o for o, _ in errors}:
            errors.append(("container.image",
                           "required when container.enabled is true (or set "
                           "container.enabled = false for no-container mode)"))
        rt = get("container.runtime")
        if not rt or (os.sep in rt and not os.path.isabs(rt)) or any(c.isspace() for c in rt):
            errors.append(("container.runtime",
                           f"must be a program name (apptainer, singularity) or an absolute "
                           f"path without spaces, got {rt!r}"))
        if get("container.load_command") and not get("container.load_shell"):
            errors.append(("container.load_shell", "must not be empty when load_command is set"))
    ch = get("container.home")
    if not ch.startswith("/") or ":" in ch or "," in ch:
        errors.append(("container.home", f"must be an absolute path without ':' or ',', got {ch!r}"))
    wd = get("container.workdir")
    if wd and not wd.startswith("/"):
        errors.append(("container.workdir", f"must be an absolute path, got {wd!r}"))
    for key in ("nbgrader.exchange_mount", "nbgrader.config_mount"):
        v = get(key)
        if not v.startswith("/") or ":" in v:
            errors.append((key, f"must be an absolute path without ':', got {v!r}"))
    flag = get("container.gpu_flag")
    if flag and not flag.startswith("-"):
        errors.append(("container.gpu_flag", f"must be a runtime flag like '--nv', got {flag!r}"))
    for pat in get("container.no_mount"):
        if not pat or "," in pat:
            errors.append(("container.no_mount", f"items must be non-empty, without ',', got {pat!r}"))
    for u in get("maintenance.allowed_users"):
        if not u:
            errors.append(("maintenance.allowed_users", "items must not be empty"))
    cmp = get("webdav.container_mount_point")
    if cmp and (not cmp.startswith("/") or ":" in cmp):
        errors.append(("webdav.container_mount_point",
                       f"must be an absolute path without ':', got {cmp!r}"))
    if get("webdav.enabled"):
        argv = get("webdav.mount_command")
        if not argv:
            errors.append(("webdav.mount_command", "required when webdav.enabled is true"))
        else:
            if template_fields(argv[0]):
                errors.append(("webdav.mount_command",
                               "item 0 (the program) must not contain a placeholder"))
            if not any("mount_point" in template_fields(a) for a in argv):
                errors.append(("webdav.mount_command", "must use the {mount_point} placeholder"))
        uargv = get("webdav.unmount_command")
        if uargv and template_fields(uargv[0]):
            errors.append(("webdav.unmount_command",
                           "item 0 (the program) must not contain a placeholder"))
        if get("webdav.url"):
            try:
                validate_webdav_url(get("webdav.url"))
            except ValueError as e:
                errors.append(("webdav.url", str(e)))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", get("webdav.url_env")):
            errors.append(("webdav.url_env", "must be an environment variable name"))

    if errors:
        raise HpcConfigError(errors, source)

    def section(cls, name: str, **extra):
        kw = {}
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            if key in OPTIONS:
                kw[f.name] = get(key)
        kw.update(extra)
        return cls(**kw)

    return HpcConfig(
        maintenance=section(MaintenanceConfig, "maintenance"),
        storage=section(StorageConfig, "storage", home_mode=home_mode),
        logging=section(LoggingConfig, "logging"),
        overlay=section(OverlayConfig, "overlay", size_bytes=parse_size(get("overlay.size"))),
        container=section(ContainerConfig, "container"),
        nbgrader=section(NbgraderConfig, "nbgrader"),
        webdav=section(WebdavConfig, "webdav"),
        isolation=section(IsolationConfig, "isolation"),
        source=source,
    )


def validate_webdav_url(url: str) -> str:
    """Accept only http(s)://host[:port]/path URLs; raise ValueError(reason) otherwise."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url:
        raise ValueError("URL is empty")
    if len(url) > 2048:
        raise ValueError("URL is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"URL is malformed ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL scheme must be https or http, got {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not contain credentials (use webdav.credential_env)")
    host = parts.hostname or ""
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+", host):
        raise ValueError("URL must have a valid host name")
    if host.startswith("-") or host.startswith("."):
        raise ValueError("URL must have a valid host name")
    del port
    return url


def load_config(path: str | os.PathLike) -> HpcConfig:
    """Read and validate the TOML file at ``path``. Raises HpcConfigError."""
    p = str(path)
    if _toml is None:  # pragma: no cover
        raise HpcConfigError([("(file)", "reading TOML needs Python >= 3.11 (or tomli)")], p)
    try:
        with open(p, "rb") as f:
            data = _toml.load(f)
    except FileNotFoundError:
        raise HpcConfigError([("(file)", "file not found")], p) from None
    except PermissionError:
        raise HpcConfigError([("(file)", "permission denied")], p) from None
    except _toml.TOMLDecodeError as e:
        raise HpcConfigError([("(file)", f"not valid TOML: {e}")], p) from None
    return config_from_dict(data, p)


def find_config(explicit: str | None = None) -> str | None:
    """The config path to use: --config, then $NODE_AGENT_HPC_CONFIG, then the default paths."""
    if explicit:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return env
    for cand in DEFAULT_CONFIG_PATHS:
        p = os.path.expanduser(cand)
        if os.path.exists(p):
            return p
    return None


# --------------------------------------------------------------------------------------------
# writing TOML (for the wizard) and docs


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        out = ['"']
        for ch in v:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def dump_toml(data: dict[str, dict[str, Any]], header: str = "", comments: bool = True) -> str:
    """Write a two-level {section: {option: value}} dict as TOML, with the option help as comments."""
    lines = [header.rstrip()] if header else []
    for sec in SECTIONS:
        body = data.get(sec)
        if not body:
            continue
        if lines:
            lines.append("")
        lines.append(f"[{sec}]")
        for name, v in body.items():
            opt = OPTIONS.get(f"{sec}.{name}")
            if comments and opt is not None:
                lines += ["# " + t for t in textwrap.wrap(_plain(opt.help), 96)]
            lines.append(f"{_toml_key(name)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    return text.replace("`", "")


def _md_default(opt: Option) -> str:
    d = opt.default
    if d == "" or d == [] or d == {}:
        return "(empty)" if opt.kind != "list" and opt.kind != "argv" and opt.kind != "binds" else "`[]`"
    return "`" + _toml_value(d).replace("|", "\\|") + "`"


def render_docs_table() -> str:
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for o in SCHEMA:
        rows.append(
            f"| `{o.key}` | {o.type_name} | {_md_default(o)} | {o.help.replace('|', chr(92) + '|')} |"
        )
    return "\n".join(rows) + "\n"


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for o in SCHEMA:
        out.setdefault(o.section, {})[o.name] = o.default
    return out


__all__ = [
    "HpcConfig", "HpcConfigError", "UserNameError", "UserPaths", "Option", "SCHEMA", "OPTIONS",
    "SECTIONS", "CONTAIN_MODES", "CLEANENV_MODES", "ISOLATING_MODES", "config_from_dict", "load_config",
    "find_config", "parse_size", "safe_username", "validate_username", "validate_webdav_url",
    "render_template", "template_fields", "dump_toml", "render_docs_table", "defaults_as_dict",
]
