"""Where admin commands (``broker status``) find the running broker's REST API and token.

``broker serve`` writes ``<state_dir>/runtime.json`` (``{"api_url": ..., "api_token": ...}``)
once it serves, with mode 0600 in the 0700 state directory: only root and the broker's own
account can read it. It removes the file on a graceful stop.

:func:`locate_api` is how ``broker status`` finds the broker, the way ``jupyterhub`` finds its
config: the command line and the config file first (``broker_config.py`` in the current
directory, else :data:`STANDARD_CONFIG`), then ``BROKER_API_TOKEN``, then the runtime file of the
configured state directory. When no token is found, :class:`NotFound` carries a message saying
where it looked and what to pass.
"""

from __future__ import annotations

import json
import os

#: The config file admin commands read when there is no ``broker_config.py`` in the current directory.
STANDARD_CONFIG = "/etc/jupyterhub-hpc-broker/broker_config.py"
RUNTIME_FILE = "runtime.json"


class NotFound(Exception):
    """No API token was found; the message says where the command looked and what to pass."""


def runtime_path(state_dir: str) -> str:
    return os.path.join(state_dir, RUNTIME_FILE)


def write_runtime(state_dir: str, api_url: str, api_token: str) -> str:
    """Write the runtime file (0600, created before the secret is written; replaced atomically)."""
    path = runtime_path(state_dir)
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": api_url, "api_token": api_token, "pid": os.getpid()}, f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def remove_runtime(state_dir: str) -> None:
    try:
        os.unlink(runtime_path(state_dir))
    except FileNotFoundError:
        pass


def read_runtime(state_dir: str) -> dict[str, str]:
    """The runtime file's contents; raises :class:`NotFound` saying why it cannot be read."""
    path = os.path.abspath(runtime_path(state_dir))
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist (is the broker running, with this state_dir?)") from None
    except PermissionError:
        raise NotFound(f"{path} is not readable by this account (run as root or the broker's user)") from None
    except (OSError, ValueError) as e:
        raise NotFound(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or not data.get("api_token") or not data.get("api_url"):
        raise NotFound(f"{path}: no api_url/api_token in it")
    return {"api_url": str(data["api_url"]), "api_token": str(data["api_token"])}


def locate_api(*, api_url: str, api_token: str, state_dir: str, config_file: str, default_url: str) -> tuple[str, str]:
    """Return (URL, token) of the broker's REST API for an admin command.

    *api_url*/*api_token* are what the command line, the config file or the environment set
    ('' if nothing did); *config_file* is the file that was loaded ('' if none). The runtime
    file fills in what is missing (its URL is used only when no URL was configured).
    """
    if api_token:
        return api_url or default_url, api_token
    try:
        found = read_runtime(state_dir)
    except NotFound as e:
        where = (
            f"the config file {os.path.abspath(config_file)}"
            if config_file
            else (f"no config file (looked for ./broker_config.py and {STANDARD_CONFIG})")
        )
        raise NotFound(
            "no API token: not on the command line (--BrokerApp.api_token), not in BROKER_API_TOKEN, "
            f"{where} sets none, and the runtime file cannot be read: {e}. Run `broker status` in the "
            "directory of broker_config.py or as root/the broker's user, or pass --config-file=FILE, "
            "or set BROKER_API_TOKEN and --BrokerApp.api_url=URL"
        ) from None
    return api_url or found["api_url"], found["api_token"]
