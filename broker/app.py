"""The ``broker`` command: a traitlets Application with subcommands, configured by ``broker_config.py``.

Subcommands (traitlets ``subcommands``): ``serve`` (run the daemon), ``status`` (live sessions),
``accounting`` (usage report), ``generate-config`` (a commented config file with every option).
``broker --help`` lists them; ``broker <command> --help`` shows a command's options.

Options live where they act, as in dask-gateway's server: :class:`BrokerApp` holds only the
app's own (paths, ports, tokens, logging); each component is a traitlets ``Configurable`` made
with ``parent=app`` and holds its own options, with its own defaults:
:class:`~broker.core.Broker` (timeouts, keepalives, the hub-API relay's and the control
channel's limits), :class:`~broker.limits.AdmissionControl` (pre-auth caps, throttling,
penalties) and :class:`~broker.proxy.RoutePublisher` (reconciling). Set them as
``c.<Class>.<name>`` in broker_config.py or ``--<Class>.<name>=value`` on the command line (which
wins over the file). Secrets (tokens) are better taken from the environment than the config
file; they are never logged.

Options that moved out of ``BrokerApp`` (:data:`MOVED_OPTIONS`) keep working under their old
spelling ``c.BrokerApp.<name>`` / ``--BrokerApp.<name>``: each is moved to its new place as the
configuration is loaded, with a warning that names the new spelling.

Exit statuses: 0 done; 1 the command failed (broker unreachable, no database...); 2 a usage or
configuration error (the message names the option).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from typing import Any
from urllib.parse import urlparse

from traitlets import Bool, Float, Integer, Unicode, default, observe, validate
from traitlets.config import Application, Config, TraitError, catch_config_error
from traitlets.traitlets import DefaultHandler

from wire.hubapi import HubApiPolicy, api_prefix_of
from wire.version import __version__

from . import log as broker_log
from . import sdnotify
from .api import BrokerAPI
from .client import BrokerClient, BrokerError
from .core import Broker, load_or_create_host_key
from .limits import AdmissionControl
from .options import OptionError, Proposal, option_name
from .proxy import ChpClient, RoutePublisher, publisher_needs_chp
from .runtime import STANDARD_CONFIG, NotFound, locate_api, remove_runtime, write_runtime
from .status import render_table
from .store import SchemaTooNew, SessionStore
from .traefik import TraefikRoutePublisher

#: Options that used to be ``BrokerApp`` traits: old name -> ``"<Class>.<name>"`` now.
MOVED_OPTIONS: dict[str, str] = {
    **{
        name: f"Broker.{name}"
        for name in (
            "enrol_ttl",
            "tunnel_wait_timeout",
            "keepalive_interval",
            "keepalive_count_max",
            "login_timeout",
            "max_hub_api_channels",
            "hub_api_strip_headers",
            "hub_api_max_body",
            "hub_api_rate",
            "hub_api_burst",
            "control_rate",
            "control_burst",
            "control_queue",
        )
    },
    **{
        name: f"AdmissionControl.{name}"
        for name in (
            "max_preauth_per_source",
            "max_preauth_total",
            "max_waiting_per_source",
            "throttle_interval",
            "penalty_threshold",
            "penalty_window",
            "penalty_base",
            "penalty_max",
            "penalty_exempt",
        )
    },
    "reconcile_interval": "RoutePublisher.reconcile_interval",
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A configuration problem; the message names the option."""


def from_environment(trait: str, variable: str) -> DefaultHandler:
    """A ``@default`` handler: *trait*'s default is the environment variable *variable* (or '')."""
    return default(trait)(lambda _self: os.environ.get(variable, ""))


class BrokerApp(Application):
    """The ``broker`` command and the app-level options every subcommand shares."""

    name = "broker"
    version = __version__
    description = "Tunnel broker between JupyterHub and notebooks running as HPC batch jobs."
    examples = "\n".join(
        [
            "broker generate-config -o broker_config.py",
            "broker serve --config-file=/etc/broker/broker_config.py",
            "broker serve --AdmissionControl.max_preauth_total=1024",
            "BROKER_API_TOKEN=... broker status --watch",
            "broker accounting --since 2026-03-01 --until 2026-04-01 --format csv",
        ]
    )
    raise_config_file_errors = True
    # (Application adds the app's own class)
    classes = [Broker, AdmissionControl, RoutePublisher, TraefikRoutePublisher]
    aliases = {
        "config-file": "BrokerApp.config_file",
        "config": "BrokerApp.config_file",
        "log-level": "BrokerApp.log_level",
    }
    flags: dict[str, Any] = {}
    # one option a line: the class reads as a table of its options
    # fmt: off
    config_file = Unicode("broker_config.py", help=f"The configuration file to load (the default: ./broker_config.py if it exists, else {STANDARD_CONFIG}).").tag(config=True)

    state_dir = Unicode("broker-state", help="Directory for the session database and SSH host key (created 0700).").tag(config=True)
    db_path = Unicode("", help="SQLite session database (default: <state_dir>/broker.sqlite).").tag(config=True)
    host_key_path = Unicode("", help="SSH host key, created on first start with mode 0600 (default: <state_dir>/ssh_host_ed25519_key).").tag(config=True)

    ssh_host = Unicode("127.0.0.1", help="Address the agents' SSH server listens on. Compute nodes must reach it: on a cluster set the hub host's address, e.g. '0.0.0.0'.").tag(config=True)
    ssh_port = Integer(8022, help="TCP port of the agents' SSH server (0 picks a free port; the spawner learns it from the broker).").tag(config=True)
    ssh_public_host = Unicode("", help="Host name or address the agents connect to (default: ssh_host, or this host's name when ssh_host is 0.0.0.0).").tag(config=True)

    api_host = Unicode("127.0.0.1", help="Address of the REST API. Keep it on loopback.").tag(config=True)
    api_port = Integer(8091, help="TCP port of the REST API (0 picks a free port and writes it to <state_dir>/api_url).").tag(config=True)
    api_socket = Unicode("", help="Serve the REST API on this unix socket (in a 0700 directory) instead of TCP.").tag(config=True)
    api_url = Unicode("", help="URL of the REST API for `broker status` (default: derived from api_socket/api_host/api_port).").tag(config=True)
    api_token = Unicode(help="Bearer token for the REST API (env BROKER_API_TOKEN). Required.").tag(config=True)
    metrics_token = Unicode(help="Optional read-only token for GET /metrics only, e.g. for Prometheus (env BROKER_METRICS_TOKEN). The API token works for /metrics too; without either, /metrics answers 401.").tag(config=True)
    accounting_sacct = Unicode("sacct", help="sacct command `broker accounting` runs for CPU/GPU time of Slurm job ids ('' disables; Slurm only: set '' when job ids are not Slurm's, e.g. with the local backend or Grid Engine).").tag(config=True)

    proxy_api_url = Unicode("http://127.0.0.1:8001", help="configurable-http-proxy's REST API URL.").tag(config=True)
    proxy_auth_token = Unicode(help="configurable-http-proxy's auth token (env CONFIGPROXY_AUTH_TOKEN). Required with Broker.route_publisher_class = 'chp' (the default).").tag(config=True)
    hub_api_url = Unicode(help="The hub API URL agents may reach through their tunnel, e.g. http://127.0.0.1:8081/hub/api (env JUPYTERHUB_API_URL). Required.").tag(config=True)

    # a name, not the numbers traitlets' Application.log_level also takes
    log_level = Unicode("INFO", help="Log level: DEBUG, INFO, WARNING, ERROR.").tag(config=True)
    log_json = Bool(False, help="Write logs as JSON lines.").tag(config=True)
    # fmt: on

    def __init__(self, **kwargs: Any):
        self._moved: list[str] = []  # the old spellings met so far (see update_config)
        super().__init__(**kwargs)

    @default("subcommands")
    def _subcommands(self) -> dict[str, Any]:
        # the classes themselves (not import strings): under ``python -m broker.app`` this module
        # is ``__main__``, and a string would import a second copy of it
        return {
            "serve": (ServeCommand, "Run the broker: the SSH server for agents, the REST API, the route publisher."),
            "status": (
                StatusCommand,
                "List live sessions (user, server, job, node, port, state, bytes, heartbeat): "
                "status [--json], or status --watch [--interval S] to redraw the table every S seconds "
                "until Ctrl-C.",
            ),
            "accounting": (
                AccountingCommand,
                "Per-user sessions, hours, bytes and (from sacct) CPU/GPU hours: "
                "accounting [--since DATE] [--until DATE] [--user U] [--format table|csv|json] "
                "[--no-sacct]. Reads the session database read-only (see docs/admin.md).",
            ),
            "generate-config": (
                GenerateConfigCommand,
                "Write a commented broker_config.py with every option of the "
                "app and its components to stdout (or -o FILE).",
            ),
        }

    _api_token_default = from_environment("api_token", "BROKER_API_TOKEN")
    _metrics_token_default = from_environment("metrics_token", "BROKER_METRICS_TOKEN")
    _proxy_token_default = from_environment("proxy_auth_token", "CONFIGPROXY_AUTH_TOKEN")
    _hub_api_default = from_environment("hub_api_url", "JUPYTERHUB_API_URL")

    @validate("log_level")
    def _valid_level(self, proposal: Proposal) -> str:
        v = str(proposal["value"]).upper()
        if v not in LOG_LEVELS:
            raise OptionError(
                f"{option_name(proposal)}: must be DEBUG, INFO, WARNING or ERROR, got {proposal['value']!r}"
            )
        return v

    @observe("log_datefmt", "log_format", "log_level", "logging_config")
    def _observe_logging_change(self, change: Any) -> None:
        # (Application's own observer would turn the level into a number, which this trait refuses)
        self._configure_logging()

    @validate("ssh_port", "api_port")
    def _valid_port(self, proposal: Proposal) -> int:
        v = proposal["value"]
        if not 0 <= v <= 65535:
            raise OptionError(f"{option_name(proposal)}: must be 0..65535, got {v}")
        return v

    # -- old spellings ----------------------------------------------------------------------
    def update_config(self, config: Config) -> None:
        """Load *config*, moving the old ``BrokerApp.<name>`` of moved options to their new places first."""
        self._move_options(config)
        super().update_config(config)

    def _move_options(self, config: Config) -> None:
        """Rewrite *config* in place: each ``BrokerApp.<old>`` of :data:`MOVED_OPTIONS` becomes its
        ``<Class>.<name>`` (unless that is set in the same place too: the new spelling wins), and is
        remembered for :meth:`deprecations`."""
        if "BrokerApp" not in config:
            return
        section = config["BrokerApp"]
        for old in [name for name in section if name in MOVED_OPTIONS]:
            cls, name = MOVED_OPTIONS[old].split(".")
            value = section.pop(old)
            if name not in config[cls]:
                config[cls][name] = value
            self._moved.append(old)

    def deprecations(self) -> list[str]:
        """A warning for each old spelling the configuration used, naming the new one."""
        return [
            f"BrokerApp.{old} is deprecated: use c.{MOVED_OPTIONS[old]} in broker_config.py "
            f"(--{MOVED_OPTIONS[old]} on the command line); the old spelling still works for now"
            for old in dict.fromkeys(self._moved)
        ]

    # -- derived settings -------------------------------------------------------------------
    def path(self, value: str, name: str) -> str:
        return value or os.path.join(self.state_dir, name)

    def resolved_api_url(self) -> str:
        if self.api_url:
            return self.api_url
        if self.api_socket:
            return "unix:" + self.api_socket
        url_file = os.path.join(self.state_dir, "api_url")
        if self.api_port == 0 and os.path.exists(url_file):
            return open(url_file).read().strip()
        return f"http://{self.api_host}:{self.api_port}"

    def check(self) -> tuple[tuple[str, int], str]:
        """Validate settings that need each other; return the hub API's address and its path
        prefix. Raise ConfigError naming the option."""
        if not self.api_token:
            raise ConfigError("BrokerApp.api_token: not set (set it in broker_config.py or BROKER_API_TOKEN)")
        if len(self.api_token) < 16:
            raise ConfigError("BrokerApp.api_token: too short (use at least 16 random characters)")
        if self.metrics_token and len(self.metrics_token) < 16:
            raise ConfigError("BrokerApp.metrics_token: too short (use at least 16 random characters)")
        try:
            needs_chp = publisher_needs_chp(self.config)
        except ValueError as e:
            raise ConfigError(f"Broker.route_publisher_class: {e}") from None
        if not self.proxy_auth_token and needs_chp:
            raise ConfigError(
                "BrokerApp.proxy_auth_token: not set (set it or CONFIGPROXY_AUTH_TOKEN); the broker refuses to run without it"
            )
        if not self.hub_api_url:
            raise ConfigError(
                "BrokerApp.hub_api_url: not set (e.g. http://127.0.0.1:8081/hub/api, or JUPYTERHUB_API_URL)"
            )
        u = urlparse(self.hub_api_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"BrokerApp.hub_api_url: not an http(s) URL with a host: {self.hub_api_url!r}")
        p = urlparse(self.proxy_api_url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ConfigError(f"BrokerApp.proxy_api_url: not an http(s) URL with a host: {self.proxy_api_url!r}")
        try:
            prefix = HubApiPolicy(api_prefix=api_prefix_of(self.hub_api_url)).api_prefix
        except ValueError as e:
            raise ConfigError(f"BrokerApp.hub_api_url: {e}") from None
        port = u.port or (443 if u.scheme == "https" else 80)
        return (u.hostname, port), prefix

    # -- the command itself -----------------------------------------------------------------
    def usage(self) -> str:
        lines = [f"usage: broker {{{','.join(self.subcommands)}}} [options]", ""]
        lines += [f"  {name:<16} {help_text}" for name, (_cls, help_text) in self.subcommands.items()]
        lines += [
            "",
            "Options of every command: --config-file=FILE (default broker_config.py), --<Class>.<name>=<value>",
            "(see `broker generate-config`). `broker <command> --help` lists a command's options.",
        ]
        return "\n".join(lines)

    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            return
        print(self.usage())
        self.exit(2)


class Command(BrokerApp):
    """A subcommand: the app's options and its own, the config file loaded, then :meth:`run`."""

    subcommands: dict[str, Any] = {}
    examples = ""

    @catch_config_error
    def initialize(self, argv: list[str] | None = None) -> None:
        """Parse the command line, then load the config file (the command line wins over it)."""
        self.parse_command_line(argv)
        self.loaded_config_file = ""
        config_file = self.config_file
        if config_file == "broker_config.py" and not os.path.exists(config_file):
            config_file = STANDARD_CONFIG  # like jupyterhub: the current directory, then the standard place
        if config_file and os.path.exists(config_file):
            self.load_config_file(config_file)
            self.loaded_config_file = config_file
        self.report_deprecations()

    def report_deprecations(self) -> None:
        """Log :meth:`deprecations` (on stderr, through the app's log)."""
        for text in self.deprecations():
            self.log.warning(text)

    def run(self) -> int:
        """Do the command's work; return the exit status."""
        raise NotImplementedError

    def start(self) -> None:
        self.exit(self.run())


class ServeCommand(Command):
    """Run the broker (serve until SIGTERM or SIGINT)."""

    name = "broker serve"
    description = __doc__

    def report_deprecations(self) -> None:
        pass  # logged by serve() once the broker's log is set up (JSON lines with log_json)

    def run(self) -> int:
        asyncio.run(serve(self))
        return 0


class StatusCommand(Command):
    """List the live sessions: a table, JSON, or a table redrawn until Ctrl-C."""

    name = "broker status"
    description = __doc__
    aliases = {**BrokerApp.aliases, "interval": "StatusCommand.interval"}
    flags = {
        "json": ({"StatusCommand": {"json": True}}, "Print the sessions as JSON."),
        "watch": ({"StatusCommand": {"watch": True}}, "Redraw the table every --interval seconds until Ctrl-C."),
    }

    # one option a line: the class reads as a table of its options
    # fmt: off
    json = Bool(False, help="Print the sessions as JSON.").tag(config=True)
    watch = Bool(False, help="Redraw the table every `interval` seconds until Ctrl-C.").tag(config=True)
    interval = Float(2.0, help="Seconds between redraws of --watch (0.1..3600).").tag(config=True)
    # fmt: on

    @validate("interval")
    def _valid_interval(self, proposal: Proposal) -> float:
        v = proposal["value"]
        if not 0.1 <= v <= 3600:
            raise OptionError(f"broker status: --interval: a number of seconds (0.1..3600), got {v!r}")
        return v

    def run(self) -> int:
        if not self.watch:
            return asyncio.run(status(self, self.json))
        try:
            return asyncio.run(status_watch(self, self.interval))
        except KeyboardInterrupt:
            return 0


class AccountingCommand(Command):
    """Per-user usage report from the session store (read-only), with CPU/GPU time from sacct."""

    name = "broker accounting"
    description = __doc__
    aliases = {
        **BrokerApp.aliases,
        "since": "AccountingCommand.since",
        "until": "AccountingCommand.until",
        "user": "AccountingCommand.user",
        "format": "AccountingCommand.format",
    }
    flags = {"no-sacct": ({"AccountingCommand": {"no_sacct": True}}, "Do not query Slurm's sacct for CPU/GPU time.")}

    # one option a line: the class reads as a table of its options
    # fmt: off
    since = Unicode("", help="Start of the period (YYYY-MM-DD, local midnight, or ISO date-time); default: everything.").tag(config=True)
    until = Unicode("", help="End of the period, exclusive; default: now.").tag(config=True)
    user = Unicode("", help="Only this user.").tag(config=True)
    format = Unicode("table", help="table, csv or json.").tag(config=True)
    no_sacct = Bool(False, help="Do not query Slurm's sacct for CPU/GPU time.").tag(config=True)
    # fmt: on

    @validate("format")
    def _valid_format(self, proposal: Proposal) -> str:
        if proposal["value"] not in ("table", "csv", "json"):
            raise OptionError(
                f"broker accounting: --format: invalid choice: {proposal['value']!r} (choose from 'table', 'csv', 'json')"
            )
        return proposal["value"]

    def run(self) -> int:
        return accounting(self)


class GenerateConfigCommand(Command):
    """Write a commented broker_config.py with every option (the app's and its components')."""

    name = "broker generate-config"
    description = __doc__
    aliases = {**BrokerApp.aliases, "o": "GenerateConfigCommand.output", "output": "GenerateConfigCommand.output"}

    output = Unicode("", help="Write to this file instead of stdout.").tag(config=True)

    def run(self) -> int:
        text = BrokerApp().generate_config_file()
        if self.output:
            with open(self.output, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0


#: Descriptors the broker needs besides its 2 per session (store, API, CHP client, logs, margin).
FD_RESERVE = 256


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (each session holds 2 descriptors: its
    hub-side listener and its agent's SSH connection) and return ``(soft, hard)`` as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def serve(app: BrokerApp) -> None:
    broker_log.configure(app.log_level, app.log_json)
    log = broker_log.get_logger(component="app")
    for text in app.deprecations():
        log.warning(text)
    hub_api, api_prefix = app.check()
    os.makedirs(app.state_dir, mode=0o700, exist_ok=True)
    try:
        key = load_or_create_host_key(app.path(app.host_key_path, "ssh_host_ed25519_key"))
    except (OSError, ValueError) as e:  # mode too open, unreadable, or not a key
        raise ConfigError(f"BrokerApp.host_key_path: {e}") from None
    try:
        store = SessionStore(app.path(app.db_path, "broker.sqlite"))
    except SchemaTooNew as e:
        raise ConfigError(f"BrokerApp.db_path: {e}") from None
    public_host = app.ssh_public_host or (
        app.ssh_host if app.ssh_host not in ("0.0.0.0", "", "::") else os.uname().nodename
    )
    try:
        broker = Broker(
            parent=app,
            store=store,
            host_key=key,
            hub_api=hub_api,
            hub_api_prefix=api_prefix,
            chp=ChpClient(app.proxy_api_url, app.proxy_auth_token) if app.proxy_auth_token else None,
            ssh_listen=(app.ssh_host, app.ssh_port),
            ssh_public_host=public_host,
        )
    except TraitError:
        store.close()
        raise
    soft, hard = raise_nofile_limit()
    capacity = (soft - FD_RESERVE) // 2 if soft != resource.RLIM_INFINITY else None
    if capacity is not None and capacity < 1000:
        log.warning(
            "file descriptor limit",
            soft=soft,
            hard=hard,
            live_sessions_capacity=capacity,
            hint="raise LimitNOFILE (systemd) / ulimit -Hn to at least 2 x sessions + 256",
        )
    else:
        log.info("file descriptor limit", soft=soft, hard=hard, live_sessions_capacity=capacity)
    await broker.start()
    from aiohttp import web

    api = BrokerAPI(broker, app.api_token, public_host, metrics_token=app.metrics_token)
    runner = web.AppRunner(api.app, access_log=None, handle_signals=False)
    await runner.setup()
    if app.api_socket:
        os.makedirs(os.path.dirname(os.path.abspath(app.api_socket)), mode=0o700, exist_ok=True)
        site: web.BaseSite = web.UnixSite(runner, app.api_socket)
        await site.start()
        os.chmod(app.api_socket, 0o600)
        api_url = "unix:" + app.api_socket
    else:
        site = web.TCPSite(runner, app.api_host, app.api_port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        api_url = f"http://{app.api_host}:{port}"
    # signals become a graceful stop from here on (before anyone is told we are ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # ssh_port first: api_url is the "ready" signal readers wait for
    with open(os.path.join(app.state_dir, "ssh_port.tmp"), "w") as f:
        f.write(f"{broker.ssh_port}\n")
    os.replace(os.path.join(app.state_dir, "ssh_port.tmp"), os.path.join(app.state_dir, "ssh_port"))
    with open(os.path.join(app.state_dir, "api_url.tmp"), "w") as f:
        f.write(api_url + "\n")
    os.replace(os.path.join(app.state_dir, "api_url.tmp"), os.path.join(app.state_dir, "api_url"))
    write_runtime(app.state_dir, api_url, app.api_token)  # for `broker status` (0600)
    log.info("serving", api=api_url, ssh=f"{app.ssh_host}:{broker.ssh_port}", fingerprint=broker.fingerprint)
    sdnotify.notify(sdnotify.READY)  # systemd Type=notify: the API and the SSH server answer now

    await stop.wait()
    sdnotify.notify(sdnotify.STOPPING)
    log.info("stopping on signal")
    remove_runtime(app.state_dir)
    await runner.cleanup()
    await broker.stop()
    store.close()


def located_api(app: BrokerApp) -> tuple[str, str]:
    """The REST API's URL and token for an admin command (see :mod:`broker.runtime`)."""
    return locate_api(
        api_url=app.api_url,
        api_token=app.api_token,
        state_dir=app.state_dir,
        config_file=getattr(app, "loaded_config_file", ""),
        default_url=app.resolved_api_url(),
    )


async def status(app: BrokerApp, as_json: bool) -> int:
    try:
        client = BrokerClient(*located_api(app))
    except NotFound as e:
        print(f"broker status: {e}", file=sys.stderr)
        return 1
    try:
        sessions = await client.list_sessions()
    except BrokerError as e:
        print(f"broker status: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    if as_json:
        print(json.dumps(sessions, indent=2, ensure_ascii=False))
    else:
        print(render_table(sessions, time.time()))
    return 0


async def status_watch(app: BrokerApp, interval: float) -> int:
    """Redraw the status table every *interval* seconds until Ctrl-C (an unreachable broker is shown, not fatal)."""
    try:
        client = BrokerClient(*located_api(app), timeout=max(5.0, interval))
    except NotFound as e:
        print(f"broker status: {e}", file=sys.stderr)
        return 1
    out = sys.stdout
    try:
        while True:
            now = time.time()
            try:
                body = render_table(await client.list_sessions(), now)
            except BrokerError as e:
                if e.status in (401, 403):
                    print(f"broker status: {e}", file=sys.stderr)
                    return 1
                body = f"broker status: {e} (retrying)"
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            # home + clear screen, then the frame; Ctrl-C to stop
            out.write(f"\x1b[H\x1b[2J{stamp}  every {interval:g}s  (Ctrl-C to stop)\n\n{body}\n")
            out.flush()
            await asyncio.sleep(interval)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    finally:
        await client.close()


def accounting(cmd: AccountingCommand) -> int:
    from . import accounting as acct

    now = time.time()
    try:
        since = acct.parse_when(cmd.since) if cmd.since else 0.0
        until = acct.parse_when(cmd.until) if cmd.until else now + 1
        rep = acct.report(
            cmd.path(cmd.db_path, "broker.sqlite"),
            since=since,
            until=until,
            user=cmd.user or None,
            sacct="" if cmd.no_sacct else cmd.accounting_sacct,
            now=now,
        )
    except acct.AccountingError as e:
        print(f"broker accounting: {e}", file=sys.stderr)
        return 1
    if cmd.format == "json":
        print(acct.render_json(rep))
    elif cmd.format == "csv":
        if not rep["sacct"]["available"]:
            print(f"broker accounting: CPU/GPU columns empty: {rep['sacct']['note']}", file=sys.stderr)
        sys.stdout.write(acct.render_csv(rep))
    else:
        print(acct.render_table(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``broker`` command with *argv* (default: ``sys.argv[1:]``); return its exit status."""
    app = BrokerApp()
    try:
        app.initialize(sys.argv[1:] if argv is None else argv)
        command = app.subapp
        if not isinstance(command, Command):
            if app.extra_args:
                print(f"broker: unknown command {app.extra_args[0]!r}\n\n{app.usage()}", file=sys.stderr)
            else:
                print(app.usage())
            return 2
        if command.extra_args:
            print(
                f"{command.name}: unexpected argument {command.extra_args[0]!r} (see {command.name} --help)",
                file=sys.stderr,
            )
            return 2
        return command.run()
    except SystemExit as e:  # traitlets exits after --help (0) or a bad value (1, message printed)
        if not e.code:
            return 0
        print("broker: configuration error: invalid option value (see the message above)", file=sys.stderr)
        return 2
    except SyntaxError as e:
        print(f"broker: configuration error: {e.filename}: syntax error at line {e.lineno}: {e.msg}", file=sys.stderr)
        return 2
    except (ConfigError, TraitError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
