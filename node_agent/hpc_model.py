"""The validated HPC config as typed objects, and the per-user paths of one launch.

The section classes have no defaults of their own: every value comes from
:mod:`node_agent.hpc_validate`, which takes it from the file or from the option's default in
:data:`node_agent.hpc_schema.SCHEMA`. :func:`build_config` passes each section exactly the
schema's options (plus the few derived fields named below), so a field without an option, or an
option without a field, fails at once with a ``TypeError`` instead of drifting apart.

Paths in these objects are expanded (``~``, ``$VAR``) and absolute; templates still hold their
``{placeholders}``, which :meth:`HpcConfig.user_paths` fills in for one user.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .hpc_schema import SECTIONS
from .templating import render_template
from .usernames import safe_username


@dataclass
class MaintenanceConfig:
    enabled: bool
    message: str
    allowed_users: list[str]


@dataclass
class StorageConfig:
    scratch_dir: str
    home_root: str
    create_home: bool
    home_mode: int  # derived: the octal string of the file, parsed


@dataclass
class LoggingConfig:
    enabled: bool
    dir: str
    per_day: bool
    date_format: str
    debug: bool


@dataclass
class OverlayConfig:
    enabled: bool
    size: str
    size_bytes: int  # derived from ``size``
    location: str
    create: bool
    check: str
    when_busy: str
    lock_timeout: int


@dataclass
class ContainerConfig:
    enabled: bool
    runtime: str
    load_command: str
    load_shell: list[str]
    image: str
    gpu_image: str
    gpu: str
    gpu_flag: str
    home: str
    workdir: str
    binds: list[str]
    extra_binds: list[str]
    no_mount: list[str]
    contain: str
    pass_env: list[str]
    extra_args: list[str]
    inner_command: list[str]


@dataclass
class NbgraderConfig:
    exchange_dir: str
    exchange_mount: str
    config_file: str
    config_mount: str


@dataclass
class WebdavConfig:
    enabled: bool
    url: str
    url_env: str
    mount_command: list[str]
    credential_env: dict[str, str]
    mount_point: str
    container_mount_point: str
    required: bool
    unmount_command: list[str]
    timeout: int


@dataclass
class IsolationConfig:
    shared_account: bool
    allow_weak: bool


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

    def template_values(self) -> dict[str, str]:
        """The values of the placeholders of binds and nbgrader paths (``{user}`` is escaped)."""
        return dict(
            user=self.safe_user,
            scratch_dir=self.scratch_dir,
            home_root=self.home_root,
            home=self.home,
            container_home=self.container_home,
        )


@dataclass
class HpcConfig:
    maintenance: MaintenanceConfig
    storage: StorageConfig
    logging: LoggingConfig
    overlay: OverlayConfig
    container: ContainerConfig
    nbgrader: NbgraderConfig
    webdav: WebdavConfig
    isolation: IsolationConfig
    source: str | None  # the file it was read from, for error messages

    def is_maintenance_blocked(self, user: str) -> bool:
        """Maintenance is on and ``user`` matches none of ``maintenance.allowed_users``."""
        if not self.maintenance.enabled:
            return False
        return not any(fnmatch.fnmatchcase(user, pat) for pat in self.maintenance.allowed_users)

    def user_paths(self, user: str) -> UserPaths:
        """The paths of ``user``'s launch; raises UserNameError for an unusable name."""
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
            container_webdav_mount_point=self.webdav.container_mount_point or os.path.join(chome, "WebDAV"),
        )

    def image_for(self, gpu: bool) -> str:
        """The image of a GPU job (``container.gpu_image`` if set) or of a CPU job."""
        if gpu and self.container.gpu_image:
            return self.container.gpu_image
        return self.container.image


_SECTION_TYPES: dict[str, type] = {
    "maintenance": MaintenanceConfig,
    "storage": StorageConfig,
    "logging": LoggingConfig,
    "overlay": OverlayConfig,
    "container": ContainerConfig,
    "nbgrader": NbgraderConfig,
    "webdav": WebdavConfig,
    "isolation": IsolationConfig,
}


def build_config(values: Mapping[str, Any], source: str | None) -> HpcConfig:
    """The model from validated values.

    ``values`` maps every schema key (``section.name``) to its final value, with the derived
    fields in their final form too: ``storage.home_mode`` as an int and ``overlay.size_bytes``.
    """
    sections: dict[str, Any] = {}
    for sec in SECTIONS:
        prefix = sec + "."
        fields = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        sections[sec] = _SECTION_TYPES[sec](**fields)
    return HpcConfig(**sections, source=source)


__all__ = [
    "ContainerConfig",
    "HpcConfig",
    "IsolationConfig",
    "LoggingConfig",
    "MaintenanceConfig",
    "NbgraderConfig",
    "OverlayConfig",
    "StorageConfig",
    "UserPaths",
    "WebdavConfig",
    "build_config",
]
