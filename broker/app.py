"""The ``broker`` command: a traitlets Application configured by ``broker_config.py``.

Subcommands: ``serve`` (run the daemon), ``status`` (live sessions), ``generate-config``.
Every option is a trait of :class:`BrokerApp` (``c.BrokerApp.<name>`` in broker_config.py,
or ``--BrokerApp.<name>=value`` on the command line). Secrets (tokens) are better taken
from the environment than the config file; they are never logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from urllib.parse import urlparse

from traitlets import Bool, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application, TraitError

from . import log as broker_log
from .api import BrokerAPI
from .client import BrokerClient, BrokerError
from .control import ControlLimits
from .core import Broker, load_or_create_host_key
from .hubapi import DEFAULT_BURST, DEFAULT_MAX_BODY, DEFAULT_RATE, DEFAULT_STRIP_HEADERS, HubApiPolicy, api_prefix_of
from .limits import AdmissionControl
from .proxy import ChpClient
from .status import render_table
from .store import SessionStore


class ConfigError(Exception):
    """A configuration problem; the message names the option."""


class BrokerApp(Application):
    name = "broker"
    description = "Tunnel broker between JupyterHub and notebooks running as HPC batch jobs."
    raise_config_file_errors = True

    config_file = Unicode("broker_config.py", help="The configuration file to load.").tag(config=True)

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
    accounting_sacct = Unicode("sacct", help="sacct command `broker accounting` runs for CPU/GPU time of Slurm job ids ('' disables; use that when job ids are not Slurm's).").tag(config=True)

    proxy_api_url = Unicode("http://127.0.0.1:8001", help="configurable-http-proxy's REST API URL.").tag(config=True)
    proxy_auth_token = Unicode(help="configurable-http-proxy's auth token (env CONFIGPROXY_AUTH_TOKEN). Required.").tag(config=True)
    hub_api_url = Unicode(help="The hub API URL agents may reach through their tunnel, e.g. http://127.0.0.1:8081/hub/api (env JUPYTERHUB_API_URL). Required.").tag(config=True)

    enrol_ttl = Float(86400.0, help="Seconds an enrolment secret stays valid (covers time pending in the queue).").tag(config=True)
    tunnel_wait_timeout = Float(10.0, help="Seconds a hub-side connection waits for a reconnecting agent before it is closed.").tag(config=True)
    reconcile_interval = Float(5.0, help="Seconds between comparisons of CHP's routes with the session table.").tag(config=True)
    keepalive_interval = Float(15.0, help="Seconds between SSH keepalives to agents (0 disables).").tag(config=True)
    keepalive_count_max = Integer(3, help="Unanswered keepalives before an agent connection is dropped.").tag(config=True)
    login_timeout = Float(30.0, help="Seconds an SSH client has to authenticate.").tag(config=True)
    max_preauth_per_source = Integer(64, help="Unauthenticated SSH connections admitted at once from one source address (0: no cap). At the cap the source is throttled: newer connections wait (no banner) and each admission replaces its least advanced unauthenticated connection.").tag(config=True)
    max_preauth_total = Integer(512, help="Unauthenticated SSH connections (admitted or waiting) allowed at once in total (0: no cap); at the cap the broker stops accepting and further connections wait in the kernel's listen queue.").tag(config=True)
    max_waiting_per_source = Integer(32, help="Connections of a throttled source held waiting for their turn (no SSH state); a newcomer to a full room replaces the oldest one that has sent nothing. 0: refuse a throttled source's connections outright.").tag(config=True)
    throttle_interval = Float(1.0, help="Seconds between admissions of a throttled source (penalised, or at max_preauth_per_source), jittered by ±50%.").tag(config=True)
    penalty_threshold = Integer(10, help="Failed SSH authentications from one source (within penalty_window) before it is penalised: throttled even below its cap (0: no penalties).").tag(config=True)
    penalty_window = Float(60.0, help="Seconds over which failed authentications from one source are counted.").tag(config=True)
    penalty_base = Float(10.0, help="Seconds a penalised source is throttled; doubles for each further penalty.").tag(config=True)
    penalty_max = Float(600.0, help="Longest penalty, in seconds.").tag(config=True)
    penalty_exempt = List(Unicode(), help="Networks (CIDR) never penalised nor throttled per source, e.g. a NAT gateway all compute nodes share.").tag(config=True)
    max_hub_api_channels = Integer(64, help="Open hub-API channels allowed per agent connection (0: no cap).").tag(config=True)
    hub_api_strip_headers = List(Unicode(), list(DEFAULT_STRIP_HEADERS), help="Identity headers removed from every request on the hub-API relay (case insensitive, '_' = '-'), besides Forwarded, X-Forwarded-*, X-Real-Ip and the like, which always are. Include the header your hub's header authenticator trusts (RemoteUserAuthenticator.header_name).").tag(config=True)
    hub_api_max_body = Integer(DEFAULT_MAX_BODY, help="Largest request body (bytes) on the hub-API relay; larger ones get 413 (0: no cap).").tag(config=True)
    hub_api_rate = Float(DEFAULT_RATE, help="Hub-API requests per second per session, over all its channels (token bucket; more get 429; 0: no cap).").tag(config=True)
    hub_api_burst = Integer(DEFAULT_BURST, help="Hub-API requests a session may make at once before hub_api_rate applies (the token bucket's size).").tag(config=True)
    control_rate = Float(10.0, help="Control messages per second an agent connection may send on average (0: no rate limit); a connection over the limit is closed. An honest agent sends a few per connection plus one heartbeat every NODE_AGENT_HEARTBEAT seconds.").tag(config=True)
    control_burst = Integer(100, help="Control messages an agent connection may send at once (the token bucket's size).").tag(config=True)
    control_queue = Integer(256, help="Control messages of one agent connection waiting to be handled, at most; a connection that fills the queue is closed.").tag(config=True)

    log_level = Unicode("INFO", help="Log level: DEBUG, INFO, WARNING, ERROR.").tag(config=True)
    log_json = Bool(False, help="Write logs as JSON lines.").tag(config=True)

    @default("api_token")
    def _api_token_default(self) -> str:
        return os.environ.get("BROKER_API_TOKEN", "")

    @default("metrics_token")
    def _metrics_token_default(self) -> str:
        return os.environ.get("BROKER_METRICS_TOKEN", "")

    @default("proxy_auth_token")
    def _proxy_token_default(self) -> str:
        return os.environ.get("CONFIGPROXY_AUTH_TOKEN", "")

    @default("hub_api_url")
    def _hub_api_default(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    @validate("log_level")
    def _valid_level(self, proposal: dict) -> str:
        v = proposal["value"].upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise TraitError(f"BrokerApp.log_level: must be DEBUG, INFO, WARNING or ERROR, got {proposal['value']!r}")
        return v

    @validate("penalty_exempt")
    def _valid_networks(self, proposal: dict) -> list:
        import ipaddress

        for net in proposal["value"]:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise TraitError(f"BrokerApp.penalty_exempt: not a network: {net!r}") from None
        return proposal["value"]

    @validate("hub_api_strip_headers")
    def _valid_header_names(self, proposal: dict) -> list:
        import re

        for name in proposal["value"]:
            if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
                raise TraitError(f"BrokerApp.hub_api_strip_headers: not a header name: {name!r}")
        return proposal["value"]

    @validate("hub_api_max_body", "hub_api_rate", "hub_api_burst")
    def _valid_hub_api_limit(self, proposal: dict) -> float:
        v = proposal["value"]
        low = 1 if proposal["trait"].name == "hub_api_burst" else 0
        if v < low:
            raise TraitError(f"BrokerApp.{proposal['trait'].name}: must be at least {low}, got {v}")
        return v

    @validate("control_rate", "control_burst", "control_queue")
    def _valid_control(self, proposal: dict) -> float:
        v = proposal["value"]
        low = 0 if proposal["trait"].name == "control_rate" else 1
        if not v >= low:  # also refuses NaN
            raise TraitError(f"BrokerApp.{proposal['trait'].name}: must be at least {low}, got {v}")
        return v

    @validate("throttle_interval")
    def _positive_interval(self, proposal: dict) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"BrokerApp.throttle_interval: must be positive, got {proposal['value']}")
        return proposal["value"]

    @validate("ssh_port", "api_port")
    def _valid_port(self, proposal: dict) -> int:
        v = proposal["value"]
        if not 0 <= v <= 65535:
            raise TraitError(f"BrokerApp.{proposal['trait'].name}: must be 0..65535, got {v}")
        return v

    # -- derived settings ---------------------------------------------------------------
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

    def check(self) -> tuple[str, int]:
        """Validate settings that need each other; raise ConfigError naming the option."""
        if not self.api_token:
            raise ConfigError("BrokerApp.api_token: not set (set it in broker_config.py or BROKER_API_TOKEN)")
        if len(self.api_token) < 16:
            raise ConfigError("BrokerApp.api_token: too short (use at least 16 random characters)")
        if self.metrics_token and len(self.metrics_token) < 16:
            raise ConfigError("BrokerApp.metrics_token: too short (use at least 16 random characters)")
        if not self.proxy_auth_token:
            raise ConfigError("BrokerApp.proxy_auth_token: not set (set it or CONFIGPROXY_AUTH_TOKEN); the broker refuses to run without it")
        if not self.hub_api_url:
            raise ConfigError("BrokerApp.hub_api_url: not set (e.g. http://127.0.0.1:8081/hub/api, or JUPYTERHUB_API_URL)")
        u = urlparse(self.hub_api_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"BrokerApp.hub_api_url: not an http(s) URL with a host: {self.hub_api_url!r}")
        p = urlparse(self.proxy_api_url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ConfigError(f"BrokerApp.proxy_api_url: not an http(s) URL with a host: {self.proxy_api_url!r}")
        try:
            self.hub_api_policy()
        except ValueError as e:
            raise ConfigError(f"BrokerApp.hub_api_url: {e}") from None
        port = u.port or (443 if u.scheme == "https" else 80)
        return u.hostname, port

    def hub_api_policy(self) -> HubApiPolicy:
        """What the hub-API relay lets through: the API prefix from hub_api_url, and the hub_api_* options."""
        return HubApiPolicy(api_prefix=api_prefix_of(self.hub_api_url), strip_headers=tuple(self.hub_api_strip_headers),
                            max_body=self.hub_api_max_body, rate=self.hub_api_rate, burst=self.hub_api_burst)

    def load(self, argv: list[str]) -> None:
        self.parse_command_line(argv)
        if self.config_file and os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
            self.parse_command_line(argv)  # the command line wins over the file


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
    hub_api = app.check()
    broker_log.configure(app.log_level, app.log_json)
    log = broker_log.get_logger(component="app")
    os.makedirs(app.state_dir, mode=0o700, exist_ok=True)
    try:
        key = load_or_create_host_key(app.path(app.host_key_path, "ssh_host_ed25519_key"))
    except (OSError, ValueError) as e:  # mode too open, unreadable, or not a key
        raise ConfigError(f"BrokerApp.host_key_path: {e}") from None
    store = SessionStore(app.path(app.db_path, "broker.sqlite"))
    public_host = app.ssh_public_host or (app.ssh_host if app.ssh_host not in ("0.0.0.0", "", "::") else os.uname().nodename)
    broker = Broker(
        store=store, host_key=key, hub_api=hub_api, chp=ChpClient(app.proxy_api_url, app.proxy_auth_token),
        ssh_listen=(app.ssh_host, app.ssh_port), ssh_public_host=public_host, enrol_ttl=app.enrol_ttl,
        tunnel_wait_timeout=app.tunnel_wait_timeout, reconcile_interval=app.reconcile_interval,
        keepalive_interval=app.keepalive_interval, keepalive_count_max=app.keepalive_count_max,
        login_timeout=app.login_timeout,
        admission=AdmissionControl(
            max_preauth_per_source=app.max_preauth_per_source, max_preauth_total=app.max_preauth_total,
            max_waiting_per_source=app.max_waiting_per_source, throttle_interval=app.throttle_interval,
            max_wait=app.login_timeout, penalty_threshold=app.penalty_threshold, penalty_window=app.penalty_window,
            penalty_base=app.penalty_base, penalty_max=app.penalty_max, exempt=app.penalty_exempt),
        max_hub_api_channels=app.max_hub_api_channels, hub_api_policy=app.hub_api_policy(),
        control_limits=ControlLimits(rate=app.control_rate, burst=app.control_burst, queue=app.control_queue),
    )
    soft, hard = raise_nofile_limit()
    capacity = (soft - FD_RESERVE) // 2 if soft != resource.RLIM_INFINITY else None
    if capacity is not None and capacity < 1000:
        log.warning("file descriptor limit", soft=soft, hard=hard, live_sessions_capacity=capacity,
                    hint="raise LimitNOFILE (systemd) / ulimit -Hn to at least 2 x sessions + 256")
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
    log.info("serving", api=api_url, ssh=f"{app.ssh_host}:{broker.ssh_port}", fingerprint=broker.fingerprint)

    await stop.wait()
    log.info("stopping on signal")
    await runner.cleanup()
    await broker.stop()
    store.close()


async def status(app: BrokerApp, as_json: bool) -> int:
    client = BrokerClient(app.resolved_api_url(), app.api_token)
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
    client = BrokerClient(app.resolved_api_url(), app.api_token, timeout=max(5.0, interval))
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


def accounting(app: BrokerApp, rest: list[str]) -> int:
    import argparse

    from . import accounting as acct

    p = argparse.ArgumentParser(prog="broker accounting", description="Per-user usage report from the session store.")
    p.add_argument("--since", help="start of the period (YYYY-MM-DD, local midnight, or ISO date-time); default: everything")
    p.add_argument("--until", help="end of the period, exclusive; default: now")
    p.add_argument("--user", help="only this user")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--no-sacct", action="store_true", help="do not query Slurm's sacct for CPU/GPU time")
    args = p.parse_args(rest)
    now = time.time()
    try:
        since = acct.parse_when(args.since) if args.since else 0.0
        until = acct.parse_when(args.until) if args.until else now + 1
        rep = acct.report(app.path(app.db_path, "broker.sqlite"), since=since, until=until, user=args.user,
                          sacct="" if args.no_sacct else app.accounting_sacct, now=now)
    except acct.AccountingError as e:
        print(f"broker accounting: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(acct.render_json(rep))
    elif args.format == "csv":
        if not rep["sacct"]["available"]:
            print(f"broker accounting: CPU/GPU columns empty: {rep['sacct']['note']}", file=sys.stderr)
        sys.stdout.write(acct.render_csv(rep))
    else:
        print(acct.render_table(rep))
    return 0


USAGE = """usage: broker {serve,status,generate-config} [options]

  serve             run the broker (SSH server for agents, REST API, route publisher)
  status [--json]   list live sessions (user, server, job, node, port, state, bytes, heartbeat)
  status --watch [--interval S]   redraw that table every S seconds (default 2) until Ctrl-C
  accounting [--since DATE] [--until DATE] [--user U] [--format table|csv|json] [--no-sacct]
                    per-user sessions, hours, bytes and (from sacct) CPU/GPU hours; reads the
                    session database read-only (see docs/admin.md)
  generate-config   write a commented broker_config.py to stdout (or -o FILE)

Any option as --BrokerApp.<name>=<value>; --config-file=FILE (default broker_config.py).
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    app = BrokerApp()
    if cmd == "generate-config":
        out = None
        if "-o" in rest:
            out = rest[rest.index("-o") + 1]
        text = app.generate_config_file()
        if out:
            with open(out, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    watch, interval, own = False, 2.0, []
    if cmd == "status":
        i = 0
        while i < len(rest):
            a = rest[i]
            if a == "--watch":
                watch = True
            elif a == "--interval" or a.startswith("--interval="):
                value = a.split("=", 1)[1] if "=" in a else (rest[i + 1] if i + 1 < len(rest) else "")
                i += 0 if "=" in a else 1
                try:
                    interval = float(value)
                    if not 0.1 <= interval <= 3600:
                        raise ValueError
                except ValueError:
                    print(f"broker status: --interval: a number of seconds (0.1..3600), got {value!r}", file=sys.stderr)
                    return 2
            else:
                own.append(a)
            i += 1
        rest = own
    elif cmd == "accounting":  # its own options; --BrokerApp.* and --config-file go to the app
        own = [a for a in rest if not a.startswith(("--BrokerApp.", "--config=", "--config-file="))]
        rest = [a for a in rest if a not in own]
    rest = [a.replace("--config=", "--BrokerApp.config_file=").replace("--config-file=", "--BrokerApp.config_file=") for a in rest]
    try:
        try:
            app.load(rest)
        except SystemExit as e:  # traitlets exits after --help (0) or a bad value (1, message printed)
            if not e.code:
                return 0
            raise ConfigError("invalid option value (see the message above)") from None
        except SyntaxError as e:
            raise ConfigError(f"{app.config_file}: syntax error at line {e.lineno}: {e.msg}") from None
        if cmd == "serve":
            asyncio.run(serve(app))
            return 0
        if cmd == "status":
            if watch:
                try:
                    return asyncio.run(status_watch(app, interval))
                except KeyboardInterrupt:
                    return 0
            return asyncio.run(status(app, as_json))
        if cmd == "accounting":
            return accounting(app, own)
    except (ConfigError, TraitError) as e:
        print(f"broker: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"broker: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
