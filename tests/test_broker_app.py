"""The ``broker`` command line, run as a real subprocess with a clean environment."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import time

import pytest

from devstack.stack import free_port

from broker_cli import PY, TOKEN, Served, clean_env, full_env, run

# -- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_over, args, needle",
    [
        ({"BROKER_API_TOKEN": None}, [], "BrokerApp.api_token"),
        ({"BROKER_API_TOKEN": "short"}, [], "BrokerApp.api_token"),
        ({"CONFIGPROXY_AUTH_TOKEN": None}, [], "BrokerApp.proxy_auth_token"),
        ({"JUPYTERHUB_API_URL": None}, [], "BrokerApp.hub_api_url"),
        ({"JUPYTERHUB_API_URL": "ftp://hub/api"}, [], "BrokerApp.hub_api_url"),
        ({"JUPYTERHUB_API_URL": "not a url"}, [], "BrokerApp.hub_api_url"),
        ({}, ["--BrokerApp.hub_api_url=http:///nohost"], "BrokerApp.hub_api_url"),
        ({}, ["--BrokerApp.proxy_api_url=nope"], "BrokerApp.proxy_api_url"),
        ({}, ["--Broker.route_publisher_class=nginx"], "Broker.route_publisher_class"),
    ],
)
def test_serve_refuses_bad_config_with_exit_2(tmp_path, env_over, args, needle):
    env = full_env(tmp_path)
    for k, v in env_over.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    r = run(tmp_path, ["serve", *args], env)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "broker-state").exists()  # refused before touching state


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--BrokerApp.log_level=LOUD"], "BrokerApp.log_level"),
        (["--BrokerApp.ssh_port=70000"], "BrokerApp.ssh_port"),
        (["--BrokerApp.api_port=-1"], "BrokerApp.api_port"),
    ],
)
def test_serve_refuses_bad_trait_values(tmp_path, args, needle):
    r = run(tmp_path, ["serve", *args], full_env(tmp_path))
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "broker-state").exists()


def test_tokens_never_echoed_in_errors(tmp_path):
    r = run(
        tmp_path,
        ["serve", "--BrokerApp.hub_api_url=bad"],
        full_env(tmp_path, CONFIGPROXY_AUTH_TOKEN="chp-very-secret-1"),
    )
    assert r.returncode == 2
    assert TOKEN not in r.stderr + r.stdout and "chp-very-secret-1" not in r.stderr + r.stdout


def test_config_file_in_cwd_is_loaded(tmp_path):
    (tmp_path / "broker_config.py").write_text('c.BrokerApp.hub_api_url = "gopher://from-the-file"\n')
    r = run(tmp_path, ["serve"], full_env(tmp_path, JUPYTERHUB_API_URL=None))
    assert r.returncode == 2
    assert "BrokerApp.hub_api_url" in r.stderr and "gopher://from-the-file" in r.stderr


def test_config_file_option_and_bad_value_in_it(tmp_path):
    cfg = tmp_path / "etc" / "my_broker.py"
    cfg.parent.mkdir()
    cfg.write_text('c.BrokerApp.log_level = "LOUD"\n')
    r = run(tmp_path, ["serve", f"--config-file={cfg}"], full_env(tmp_path))
    assert r.returncode != 0
    assert "BrokerApp.log_level" in r.stderr and "LOUD" in r.stderr


def test_command_line_wins_over_config_file(tmp_path):
    (tmp_path / "broker_config.py").write_text('c.BrokerApp.hub_api_url = "gopher://from-the-file"\n')
    r = run(tmp_path, ["serve", "--BrokerApp.hub_api_url=ftp://from-the-cli"], full_env(tmp_path))
    assert r.returncode == 2
    assert "ftp://from-the-cli" in r.stderr and "gopher" not in r.stderr


def test_usage_and_unknown_command(tmp_path):
    r = run(tmp_path, [], clean_env(tmp_path))
    assert r.returncode == 2 and "serve" in r.stdout and "generate-config" in r.stdout
    r = run(tmp_path, ["--help"], clean_env(tmp_path))
    assert r.returncode == 0 and "status" in r.stdout
    r = run(tmp_path, ["frobnicate"], full_env(tmp_path))
    assert r.returncode == 2 and "frobnicate" in r.stderr


def test_generate_config_lists_every_option_with_help(tmp_path):
    from broker.app import BrokerApp

    r = run(tmp_path, ["generate-config"], full_env(tmp_path))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    # help texts are wrapped over "#  " comment lines: compare with whitespace collapsed
    flat = re.sub(r"\s+", " ", re.sub(r"\n#+ ", " ", text))
    own = BrokerApp.class_own_traits(config=True)
    assert {"api_token", "proxy_auth_token", "hub_api_url", "ssh_port", "api_port", "state_dir", "log_level"} <= set(
        own
    )
    for name, trait in own.items():
        assert f"c.BrokerApp.{name} =" in text, name
        assert trait.help, f"{name} has no help"
        assert re.sub(r"\s+", " ", trait.help) in flat, name
    # the environment's secrets never end up in a generated config file
    assert TOKEN not in text and "chp-token" not in text
    # -o writes the same text to a file
    out = tmp_path / "generated.py"
    r = run(tmp_path, ["generate-config", "-o", str(out)], full_env(tmp_path))
    assert r.returncode == 0 and out.read_text().strip() == text.strip()
    # and the generated file is a valid config file that changes nothing
    r = run(tmp_path, ["serve", f"--config-file={out}", "--BrokerApp.proxy_api_url=bad"], full_env(tmp_path))
    assert r.returncode == 2 and "BrokerApp.proxy_api_url" in r.stderr


COMMANDS = ("serve", "status", "accounting", "generate-config")


def test_help_lists_every_subcommand(tmp_path):
    r = run(tmp_path, ["--help"], clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^([a-z-]+)$", r.stdout.split("Subcommands", 1)[1], re.M)
    assert set(COMMANDS) <= set(listed), r.stdout
    for command in COMMANDS:  # and each has its own help
        r = run(tmp_path, [command, "--help"], clean_env(tmp_path))
        assert r.returncode == 0 and "--config-file" in r.stdout, (command, r.stdout, r.stderr)
    r = run(tmp_path, [], clean_env(tmp_path))  # the short usage too
    assert r.returncode == 2 and all(command in r.stdout for command in COMMANDS)


def test_generate_config_writes_every_component_option(tmp_path):
    from broker.app import MOVED_OPTIONS, BrokerApp
    from broker.core import Broker
    from broker.limits import AdmissionControl
    from broker.proxy import RoutePublisher

    r = run(tmp_path, ["generate-config"], full_env(tmp_path))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    flat = re.sub(r"\s+", " ", re.sub(r"\n#+ ", " ", text))
    assert "c.AdmissionControl.max_preauth_total = 512" in text
    assert "c.RoutePublisher.reconcile_interval = 5.0" in text and "c.Broker.login_timeout = 30.0" in text
    for cls in (Broker, AdmissionControl, RoutePublisher):
        own = cls.class_own_traits(config=True)
        assert own, cls
        for name, trait in own.items():
            assert f"c.{cls.__name__}.{name} =" in text, (cls, name)
            assert trait.help and re.sub(r"\s+", " ", trait.help) in flat, (cls, name)
    # each option is in one place: the moved ones are no longer BrokerApp's
    for old, new in MOVED_OPTIONS.items():
        assert f"c.BrokerApp.{old} =" not in text and f"c.{new} =" in text
        assert old not in BrokerApp.class_own_traits()


def test_old_spelling_in_config_file_still_works_and_warns(tmp_path):
    """``c.BrokerApp.max_preauth_total`` (now ``c.AdmissionControl.max_preauth_total``) still takes
    effect: with a total of 1, a second connection to the agents' port gets no banner while the
    first is unauthenticated, and gets it once the first closes. The warning names the new spelling,
    for the file and for an old spelling on the command line alike."""
    (tmp_path / "broker_config.py").write_text("c.BrokerApp.max_preauth_total = 1\n")
    s = Served(tmp_path, str(tmp_path / "state"))
    s.args.append("--BrokerApp.penalty_threshold=0")
    s.start()
    conns = []
    try:
        out = s.output()
        assert "BrokerApp.max_preauth_total is deprecated" in out and "c.AdmissionControl.max_preauth_total" in out, out
        assert "BrokerApp.penalty_threshold is deprecated" in out and "c.AdmissionControl.penalty_threshold" in out
        ssh_port = int(open(os.path.join(s.state_dir, "ssh_port")).read())

        def connect() -> socket.socket:
            c = socket.create_connection(("127.0.0.1", ssh_port), timeout=10)
            c.sendall(b"SSH-2.0-probe\r\n")
            conns.append(c)
            return c

        first = connect()
        assert first.recv(8) == b"SSH-2.0-"  # admitted: the broker's banner
        second = connect()
        second.settimeout(1.5)
        with pytest.raises(socket.timeout):
            second.recv(8)  # the total of 1 is taken: not accepted yet
        first.close()
        second.settimeout(10)
        assert second.recv(8) == b"SSH-2.0-"  # a slot freed: admitted now
    finally:
        for c in conns:
            c.close()
        assert s.stop() == 0, s.output()


def test_old_spellings_move_to_their_components_and_the_command_line_wins(tmp_path):
    import asyncssh

    from broker.app import MOVED_OPTIONS, BrokerApp, ServeCommand
    from broker.core import Broker
    from broker.proxy import ChpClient
    from broker.store import SessionStore

    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "c.AdmissionControl.max_preauth_total = 5\nc.BrokerApp.control_rate = 2.5\n"
        "c.BrokerApp.penalty_exempt = ['10.0.0.0/8']\n"
    )
    app = BrokerApp()
    app.initialize(
        [
            "serve",
            f"--config-file={cfg}",
            "--BrokerApp.max_preauth_total=6",
            "--BrokerApp.login_timeout=3",
            "--BrokerApp.reconcile_interval=7",
        ]
    )
    command = app.subapp
    assert isinstance(command, ServeCommand)
    broker = Broker(
        parent=command,
        store=SessionStore(str(tmp_path / "s.sqlite")),
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        hub_api=("127.0.0.1", 1),
        chp=ChpClient("http://127.0.0.1:1", "t"),
    )
    assert broker.login_timeout == 3 and broker.control_rate == 2.5 and broker.control_limits.rate == 2.5
    assert broker.admission.max_preauth_total == 6  # the command line's old spelling beats the file's new one
    assert [str(n) for n in broker.admission.exempt] == ["10.0.0.0/8"]
    assert broker.routes is not None and broker.routes.reconcile_interval == 7
    warned = "\n".join(command.deprecations())
    for old in ("max_preauth_total", "login_timeout", "reconcile_interval", "control_rate", "penalty_exempt"):
        assert f"BrokerApp.{old} is deprecated: use c.{MOVED_OPTIONS[old]}" in warned
    broker.store.close()


def test_component_option_errors_name_the_option(tmp_path):
    for args, needle in (
        (["--AdmissionControl.throttle_interval=0"], "AdmissionControl.throttle_interval"),
        (["--Broker.hub_api_burst=0"], "Broker.hub_api_burst"),
        (["--BrokerApp.penalty_exempt=not-a-net"], "AdmissionControl.penalty_exempt"),
    ):
        r = run(tmp_path, ["serve", "--BrokerApp.ssh_port=0", "--BrokerApp.api_port=0", *args], full_env(tmp_path))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


# -- serve / status -----------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path, str(tmp_path / "state"))
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def test_serve_status_sigterm_and_host_key_reuse(served):
    served.start()
    assert served.api_url.startswith("http://127.0.0.1:")
    assert stat.S_IMODE(os.stat(served.state_dir).st_mode) == 0o700
    key_path = os.path.join(served.state_dir, "ssh_host_ed25519_key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    key_bytes = open(key_path, "rb").read()
    ssh_port = int(open(os.path.join(served.state_dir, "ssh_port")).read())
    assert ssh_port > 0

    # status --json: empty list first
    r = served.status("--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    r = served.status()
    assert r.returncode == 0, r.stderr
    assert re.match(r"USER\s+SERVER\s+JOB\s+NODE\s+PORT\s+STATE", r.stdout)

    # a session created over the REST API shows up
    created = served.api(
        "POST", "/api/sessions", {"user": "秀樹", "server_name": "gpu", "routespec": "/user/秀樹/gpu/"}
    )
    assert created["ssh"]["port"] == ssh_port
    served.api("PATCH", f"/api/sessions/{created['id']}", {"job_id": "31337", "node": "cn07"})
    r = served.status("--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [s["id"] for s in listed] == [created["id"]]
    s = listed[0]
    assert (s["user"], s["server_name"], s["port"], s["state"], s["job_id"], s["node"]) == (
        "秀樹",
        "gpu",
        created["port"],
        "registered",
        "31337",
        "cn07",
    )
    assert "secret" not in s and "secret_hash" not in s and "agent_key" not in s

    r = served.status()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split()
    assert header[:6] == ["USER", "SERVER", "JOB", "NODE", "PORT", "STATE"]
    row = lines[1].split()
    assert row[:6] == ["秀樹", "gpu", "31337", "cn07", str(created["port"]), "registered"]
    assert created["secret"] not in r.stdout

    # status with a wrong token fails cleanly
    r = run(
        served.tmp_path,
        ["status", f"--BrokerApp.state_dir={served.state_dir}", "--BrokerApp.api_port=0"],
        clean_env(served.tmp_path, BROKER_API_TOKEN="wrong-token-0123456789"),
    )
    assert r.returncode == 1 and "401" in r.stderr

    # SIGTERM: graceful stop, exit 0
    assert served.stop() == 0, served.output()
    out = served.output()
    assert "Traceback" not in out
    assert created["secret"] not in out and TOKEN not in out

    # restart: same host key, same fingerprint, same session port
    served.start()
    assert open(key_path, "rb").read() == key_bytes
    again = served.api("POST", "/api/sessions", {"user": "zoe", "routespec": "/user/zoe/"})
    assert again["ssh"]["fingerprint"] == created["ssh"]["fingerprint"]
    assert again["ssh"]["host_key"] == created["ssh"]["host_key"]
    old = served.api("GET", f"/api/sessions/{created['id']}")
    assert old["port"] == created["port"] and old["state"] == "registered"
    assert served.stop() == 0, served.output()


def test_status_without_broker_fails_cleanly(tmp_path):
    r = run(
        tmp_path,
        ["status", f"--BrokerApp.api_url=http://127.0.0.1:{free_port()}"],
        clean_env(tmp_path, BROKER_API_TOKEN=TOKEN),
    )
    assert r.returncode == 1
    assert "broker status:" in r.stderr and "Traceback" not in r.stderr


def test_host_key_readable_by_others_refused(tmp_path):
    state = tmp_path / "state"
    s = Served(tmp_path, str(state))
    s.start()
    assert s.stop() == 0
    os.chmod(state / "ssh_host_ed25519_key", 0o644)
    s2 = Served(tmp_path, str(state))
    with pytest.raises(AssertionError, match="readable by others"):
        s2.start()
    # refused like every other configuration problem: exit 2, the option named, no traceback
    out = s2.output()
    assert s2.proc.returncode == 2, out
    assert "BrokerApp.host_key_path" in out
    assert "Traceback" not in out


def test_serve_raises_its_fd_soft_limit_and_logs_capacity(tmp_path):
    """Each session holds 2 descriptors: `broker serve` lifts its soft RLIMIT_NOFILE to the hard
    limit and logs how many live sessions that allows (a warning below 1,000)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 600 if hard == resource.RLIM_INFINITY or hard > 600 else hard

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    code = (
        "import resource; from broker.app import raise_nofile_limit; "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], raise_nofile_limit()[0])"
    )
    r = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=lower, env=clean_env(tmp_path)
    )
    assert r.returncode == 0, r.stderr
    before, after = map(int, r.stdout.split())
    assert before == low
    assert after == (hard if hard != resource.RLIM_INFINITY else max(low, 1 << 20))

    s = Served(tmp_path, str(tmp_path / "state"))
    s.start()
    try:
        limits = open(f"/proc/{s.proc.pid}/limits").read()
        m = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits)
        assert m and m.group(1) == m.group(2), f"soft limit not raised to the hard one: {m and m.group(0)}"
        assert "file descriptor limit" in s.output()
        assert "live_sessions_capacity" in s.output()
    finally:
        assert s.stop() == 0, s.output()


def test_out_of_file_descriptors_pauses_accepting_and_recovers(tmp_path):
    """With a hard RLIMIT_NOFILE of 128, 200 idle TCP connections to the agents' SSH port exhaust
    the broker's descriptors: it pauses accepting (logged), keeps serving its REST API, and once
    the login timeout drops the idle ones, a real agent enrols."""
    import asyncio
    import resource

    import asyncssh

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    s = Served(tmp_path, str(tmp_path / "state"))
    s.args += [
        "--Broker.login_timeout=3",
        "--AdmissionControl.max_preauth_per_source=0",
        "--AdmissionControl.max_preauth_total=0",
    ]
    s.preexec_fn = limit
    s.start()
    ssh_port = int(open(os.path.join(s.state_dir, "ssh_port")).read())
    idle = []
    try:
        for _ in range(200):
            c = socket.create_connection(("127.0.0.1", ssh_port), timeout=5)
            idle.append(c)
        deadline = time.monotonic() + 15
        while "out of resources" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "out of resources" in s.output(), s.output()[-3000:]
        assert s.proc.poll() is None
        assert s.api("GET", "/api/sessions") == {"sessions": []}  # the API still answers
        created = s.api("POST", "/api/sessions", {"user": "ann", "routespec": "/user/ann/"})
        for c in idle:
            c.close()

        async def enrol() -> str:
            key = asyncssh.generate_private_key("ssh-ed25519")
            pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
            host_key = asyncssh.import_public_key(created["ssh"]["host_key"])
            async with asyncssh.connect(
                "127.0.0.1",
                ssh_port,
                username=created["id"],
                known_hosts=([host_key], [], []),
                password=f"enrol {created['secret']} {pub}",
                client_keys=None,
                preferred_auth="password",
                agent_path=None,
                config=None,
                connect_timeout=20,
            ) as conn:
                return conn.get_extra_info("username")

        assert asyncio.run(enrol()) == created["id"]
        assert s.api("GET", f"/api/sessions/{created['id']}")["state"] == "connected"
    finally:
        for c in idle:
            c.close()
        assert s.stop() == 0, s.output()[-3000:]


def test_serve_without_proxy_token_when_the_hub_adds_the_routes(tmp_path):
    """``--Broker.route_publisher_class=none``: no CHP token needed; sessions still get their port."""
    s = Served(tmp_path, str(tmp_path / "state"))
    s.env.pop("CONFIGPROXY_AUTH_TOKEN")
    s.args.append("--Broker.route_publisher_class=none")
    s.start()
    try:
        session = s.api("POST", "/api/sessions", {"user": "zoe", "server_name": "", "routespec": "/user/zoe/"})
        assert session["port"] > 0 and session["target"].endswith(f":{session['port']}")
    finally:
        assert s.stop() == 0
