"""The agent's settings: environment variables set by the spawner (few, explicit).

The ``BROKER_*`` names are the wire contract's (:data:`wire.contract.JOB_ENV`).

=========================  =======================================================
variable                   meaning
=========================  =======================================================
BROKER_SSH_HOST            broker SSH address the agent connects out to
BROKER_SSH_PORT            broker SSH port
BROKER_HOST_KEY            broker's public host key (OpenSSH format): pinned
BROKER_SESSION_ID          the session this job serves
BROKER_ENROL_SECRET        one-time enrolment secret; removed from the environment
                           as soon as it is read, never passed to the server
JUPYTERHUB_API_URL         the hub API URL as the broker allows it (the agent
                           reaches it through the tunnel, exposes it on a
                           node-local ephemeral port, and rewrites this variable);
                           its path must end in /hub/api: the relay passes
                           only requests under it
NODE_AGENT_RUNTIME_DIR     where the private socket directory is made
                           (default: $XDG_RUNTIME_DIR, else the temp dir)
NODE_AGENT_HEARTBEAT       seconds between heartbeats (default 10)
NODE_AGENT_KEEPALIVE       seconds between SSH keepalives (default 15)
NODE_AGENT_READY_TIMEOUT   seconds to wait for the server to answer (default 300)
NODE_AGENT_RECONNECT_CAP   cap of the reconnect backoff in seconds (default 30)
NODE_AGENT_JOB_ID          job id shown in ``broker status`` (default: SLURM_JOB_ID,
                           PBS_JOBID, LSB_JOBID, JOB_ID, LOCALBATCH_JOB_ID)
NODE_AGENT_TEST_PROTOCOL   for tests only: the protocol version the agent announces
                           in ``hello`` instead of its own (an integer), to show how
                           a broker treats older and newer agents
=========================  =======================================================
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from urllib.parse import urlparse

from wire import contract
from wire.hubapi import HubApiPolicy, api_prefix_of

SECRET_VARS = (contract.ENV_ENROL_SECRET,)
#: For tests only: the protocol version announced instead of :data:`wire.contract.PROTOCOL_VERSION`.
TEST_PROTOCOL_VAR = "NODE_AGENT_TEST_PROTOCOL"
JOB_ID_VARS = ("NODE_AGENT_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "LOCALBATCH_JOB_ID")


class SettingsError(Exception):
    """A missing or invalid setting; the message names the variable."""


@dataclasses.dataclass
class Settings:
    ssh_host: str
    ssh_port: int
    host_key: str
    session_id: str
    enrol_secret: str = dataclasses.field(repr=False)
    hub_api_url: str
    runtime_dir: str
    heartbeat: float = 10.0
    keepalive: float = 15.0
    ready_timeout: float = 300.0
    reconnect_cap: float = 30.0
    job_id: str = ""
    node: str = ""
    protocol: int = contract.PROTOCOL_VERSION

    @property
    def hub_api_address(self) -> tuple[str, int]:
        u = urlparse(self.hub_api_url)
        return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)

    @classmethod
    def from_env(cls, env: os._Environ[str] | dict[str, str]) -> Settings:
        """Read settings from *env*, removing the enrolment secret from it."""

        def need(name: str) -> str:
            v = env.get(name, "")
            if not v:
                raise SettingsError(f"{name}: not set (the spawner sets it in the job environment)")
            return v

        def number(name: str, default: float) -> float:
            raw = env.get(name, "")
            if not raw:
                return default
            try:
                v = float(raw)
            except ValueError:
                raise SettingsError(f"{name}: must be a number, got {raw!r}") from None
            if v <= 0:
                raise SettingsError(f"{name}: must be positive, got {raw!r}")
            return v

        port_raw = need(contract.ENV_SSH_PORT)
        if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
            raise SettingsError(f"{contract.ENV_SSH_PORT}: must be a port number, got {port_raw!r}")
        hub = need("JUPYTERHUB_API_URL")
        if urlparse(hub).scheme not in ("http", "https") or not urlparse(hub).hostname:
            raise SettingsError(f"JUPYTERHUB_API_URL: not an http(s) URL: {hub!r}")
        try:
            HubApiPolicy(api_prefix=api_prefix_of(hub))  # the relay passes only this prefix
        except ValueError as e:
            raise SettingsError(f"JUPYTERHUB_API_URL: {e}") from None
        protocol_raw = env.get(TEST_PROTOCOL_VAR, "")
        try:
            protocol = int(protocol_raw) if protocol_raw else contract.PROTOCOL_VERSION
        except ValueError:
            raise SettingsError(f"{TEST_PROTOCOL_VAR}: must be an integer, got {protocol_raw!r}") from None
        secret = env.get(contract.ENV_ENROL_SECRET, "")
        for name in SECRET_VARS:
            env.pop(name, None)
        job_id = next((env[v] for v in JOB_ID_VARS if env.get(v)), "")
        return cls(
            ssh_host=need(contract.ENV_SSH_HOST),
            ssh_port=int(port_raw),
            host_key=need(contract.ENV_HOST_KEY),
            session_id=need(contract.ENV_SESSION_ID),
            enrol_secret=secret,
            hub_api_url=hub,
            runtime_dir=env.get("NODE_AGENT_RUNTIME_DIR") or env.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
            heartbeat=number("NODE_AGENT_HEARTBEAT", 10.0),
            keepalive=number("NODE_AGENT_KEEPALIVE", 15.0),
            ready_timeout=number("NODE_AGENT_READY_TIMEOUT", 300.0),
            reconnect_cap=number("NODE_AGENT_RECONNECT_CAP", 30.0),
            job_id=job_id,
            node=socket.gethostname(),
            protocol=protocol,
        )
