"""The production kit (examples/production/) run as systemd would run it, on the real
single-node Slurm, submitting through a login node (a real sshd, tests/sshd.py).

The units are started as systemd would (tests/production_kit.py: only paths, addresses, ports
and account names substituted); on this host every address is loopback and the login node is
a test sshd on it.

The broker gets a ``NOTIFY_SOCKET`` the test listens on: READY=1 must arrive only once the
broker's REST API answers. ``systemd-analyze verify`` (Debian's systemd, installed by
scripts/install-sysdeps.sh) checks the units; it runs here without systemd as PID 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from devstack.stack import wait_http

from e2e import Hub
from harness import find_chp, save_stack_logs, wait_until
from production_kit import PROD, SYSTEMD_PATH, UNITS, ProductionKit
from slurm_cluster import Accounts, others_can_reach, others_can_run_python, real_binary, run

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.timeout(900)]


def make_kit(root: Path, sshd, acc: Accounts) -> ProductionKit:
    """The kit on this host: every address loopback, the login node this machine's test sshd."""
    kit = ProductionKit(
        root,
        login_port=sshd.port,
        login_key=sshd.client_key,
        login_known_hosts=sshd.known_hosts,
        service=acc.service,
        group=acc.group,
    )
    kit.install()
    # the cluster side: an HPC config for `node-agent launch` (no container on this machine)
    scratch = root / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)
    (root / "node-agent" / "hpc-config.toml").write_text(
        f'[storage]\nscratch_dir = "{scratch}"\nhome_root = "{{scratch_dir}}/homes"\ncreate_home = true\n'
        "[logging]\nenabled = false\n[overlay]\nenabled = false\n[container]\nenabled = false\n"
        "[isolation]\nshared_account = false\n"
    )
    return kit


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """The units as shipped, with only the install prefix pointed at this checkout's tools
    (verify checks that each ExecStart exists); any warning counts as a failure."""
    analyze = shutil.which("systemd-analyze") or pytest.fail(
        "systemd-analyze missing: scripts/install-sysdeps.sh installs Debian's systemd package"
    )
    site = SimpleNamespace(
        paths=[
            ("/opt/jupyterhub-hpc-broker/node/node_modules/.bin", os.path.dirname(find_chp())),
            ("/opt/jupyterhub-hpc-broker/bin", os.path.dirname(sys.executable)),
        ]
    )
    for unit in UNITS.values():
        text = (PROD / unit).read_text()
        for old, new in site.paths:
            text = text.replace(old, new)
        (tmp_path / unit).write_text(text)
    r = subprocess.run(
        [analyze, "verify", *[str(tmp_path / u) for u in UNITS.values()]], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr
    # and it does catch a broken unit
    (tmp_path / "broken.service").write_text("[Service]\nType=notifyy\nExecStart=/nonexistent/broker serve\n")
    r = subprocess.run([analyze, "verify", str(tmp_path / "broken.service")], capture_output=True, text=True)
    assert r.returncode != 0 and "Failed to parse service type" in r.stderr, r.stderr


def _api(url: str, token: str, scheme: str = "Bearer") -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"{scheme} {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_production_units_spawn_on_slurm_and_survive_a_hub_restart(tmp_path, slurm_cluster, sshd, accounts):
    acc = accounts
    site = make_kit(tmp_path / "site", sshd, acc)
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    hub = Hub(site.as_stack())  # type: ignore[arg-type]
    user = acc.user
    try:
        with (
            others_can_run_python(),
            others_can_reach(
                str(sshd.root / "authorized_keys"),
                str(tmp_path / "site" / "node-agent" / "hpc-config.toml"),
                str(tmp_path / "site" / "scratch"),
            ),
        ):
            site.start("proxy")
            wait_http(site.as_stack().proxy_api_url + "/api/routes", 30, site.procs["proxy"], "CHP")

            # the broker: READY=1 only once its API answers
            site.start("broker", NOTIFY_SOCKET=notify_path)
            notify.settimeout(60)
            assert notify.recv(4096) == b"READY=1"
            assert _api(site.as_stack().broker_url + "/api/sessions", site.tokens["BROKER_API_TOKEN"]) == 200
            runtime = tmp_path / "site" / "var" / "broker" / "runtime.json"
            assert (runtime.stat().st_mode & 0o777) == 0o600

            site.start("hub")
            wait_http(site.as_stack().hub_api_url, 90, site.procs["hub"], "jupyterhub")

            t0 = time.monotonic()
            hub.spawn(user, timeout=240)
            print(f"\n[production] spawn through the login node, as {user} via sudo: {time.monotonic() - t0:.1f} s")
            assert hub.through_proxy(user, "api/status")[0] == 200
            session = hub.session_of(user)
            job_id = session["job_id"]
            assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%u %T").stdout.split() == [user, "RUNNING"]

            # `broker status` as an admin would type it: no arguments, in the config's directory
            r = subprocess.run(
                [sys.executable, "-m", "broker.app", "status"],
                cwd=tmp_path / "site" / "etc",
                env={"PATH": SYSTEMD_PATH, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0 and user in r.stdout and job_id in r.stdout, r.stdout + r.stderr

            # restart the hub: the job keeps running and the restarted hub picks it up
            site.stop("hub")
            assert hub.through_proxy(user, "api/status")[0] == 200  # CHP and the tunnel: no hub needed
            site.start("hub")
            wait_http(site.as_stack().hub_api_url, 90, site.procs["hub"], "jupyterhub")
            wait_until(
                lambda: hub.api(hub.user_path(user))[1].get("servers", {}).get("", {}).get("ready"),
                60,
                interval=0.5,
                what="the restarted hub to see the server ready",
            )
            assert hub.through_proxy(user, "api/status")[0] == 200
            after = hub.session_of(user)
            assert (after["id"], after["state"], after["job_id"]) == (session["id"], "ready", job_id)
            assert run(real_binary("squeue"), "-h", "-j", job_id, "-o", "%T").stdout.strip() == "RUNNING"

            hub.stop(user)
            wait_until(
                lambda: (
                    run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()
                    in ("", "CANCELLED")
                ),
                30,
                what="the job cancelled through sudo on the login node",
            )
            site.stop("hub")
            site.stop("broker")
            assert notify.recv(4096) == b"STOPPING=1"
            assert not runtime.exists()
    finally:
        for name in ("hub", "broker", "proxy"):
            site.stop(name)
        notify.close()
        run(real_binary("scancel"), "-u", user)
        save_stack_logs(site.as_stack(), "production-logs")  # type: ignore[arg-type]
