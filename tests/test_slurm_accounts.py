"""The Slurm account, QoS and reservation on the options form, against a REAL slurmdbd.

The cluster is :func:`slurm_cluster.accounting_cluster`: the same private Slurm + slurmdbd +
MariaDB (in its own mount+network namespace) that test_accounting.py runs, so the shared
development cluster is never touched. The accounts, QoS, associations and reservations are
made with the real ``sacctmgr`` / ``scontrol`` in the test (unique names) and removed after.

The hub is a real JupyterHub + CHP + broker (:func:`harness.running_stack`) on the host,
submitting through a real "login node" (the private sshd of tests/sshd.py, over the spawner's
one pooled SSH connection). There its Slurm commands (``sbatch``, ``squeue``, ``scancel``,
``sinfo``, ``sacctmgr``, ``scontrol``) are the real ones, entered into the cluster's namespace
by short ``nsenter`` wrappers set as the spawner's command options — the way a site points
them at its own binaries; each wrapper notes whether it ran over SSH. The jobs run in the
namespace, whose network cannot reach the broker, so no notebook comes up: these tests look
only at what was submitted (``scontrol show job``), or that nothing was.

``test_unusable_sacctmgr_is_shown_on_the_form`` runs the host's real ``sacctmgr``, which
refuses to work with the shared development cluster's ``accounting_storage/none``.

The cluster has no ``AccountingStorageEnforce`` (as test_accounting.py runs it): Slurm would
take any account, which is why the spawner checks every choice itself. Jobs are submitted by
the service account (root here, ``submit_as = "service"``), which therefore gets an
association with the profile's account — without one Slurm silently charges its default.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from hub_plugin.options_form import TEMPLATE_DIR
from hub_plugin.slurm import SlurmBrokerSpawner

from e2e import Hub, form_login
from harness import running_stack, tool_path, wait_until
from slurm_cluster import JOB_TAG, NsCluster, accounting_cluster, hub_config, real_binary
from sshd import SSHD

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.timeout(900)]

TAG = uuid.uuid4().hex[:6]
ACCT_A, ACCT_B, ACCT_OTHER = f"jha{TAG}", f"jhb{TAG}", f"jhx{TAG}"
QOS_A, QOS_OTHER = f"jhq{TAG}", f"jhz{TAG}"
ALICE = f"jhu{TAG}"  # a Unix account too: a reservation's Users= must name real users
BOB = f"jhv{TAG}"
RES_ALICE, RES_ACCT_A, RES_ROOT = f"jhr{TAG}u", f"jhr{TAG}a", f"jhr{TAG}r"
SITE_MARK = "<!-- the site's own options form -->"
SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "sacctmgr", "scontrol")


def sacctmgr(cluster: NsCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.ns("sacctmgr", "-i", *args, check=check)


@pytest.fixture(scope="module")
def cluster() -> Iterator[NsCluster]:
    with accounting_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def associations(cluster: NsCluster) -> Iterator[None]:
    """ALICE: accounts A and B (default B), QoS_A only on A; BOB: only OTHER. Reservations days
    ahead (so they never hold the node): one for ALICE, one for account A, one for root."""
    subprocess.run(["useradd", "-M", "-N", "-p", "*", "-s", "/usr/sbin/nologin", ALICE], check=True)
    try:
        sacctmgr(cluster, "add", "account", f"{ACCT_A},{ACCT_B},{ACCT_OTHER}")
        sacctmgr(cluster, "add", "qos", f"{QOS_A},{QOS_OTHER}")
        sacctmgr(cluster, "add", "user", ALICE, f"account={ACCT_A},{ACCT_B}", f"defaultaccount={ACCT_B}")
        sacctmgr(cluster, "modify", "user", ALICE, "where", f"account={ACCT_A}", "set", f"qos+={QOS_A}")
        sacctmgr(cluster, "add", "user", BOB, f"account={ACCT_OTHER}")
        # the service account that submits every job charges the profile's account
        sacctmgr(cluster, "add", "user", "root", f"account={ACCT_A}")
        sacctmgr(cluster, "modify", "user", "root", "where", f"account={ACCT_A}", "set", f"qos+={QOS_A}")
        reservations = ((RES_ALICE, f"Users={ALICE}"), (RES_ACCT_A, f"Accounts={ACCT_A}"), (RES_ROOT, "Users=root"))
        for day, (name, who) in enumerate(reservations, start=2):  # one node: they must not overlap
            cluster.ns(
                "scontrol", "create", "reservation", f"ReservationName={name}", who,
                f"StartTime=now+{day}days", "Duration=60", "Nodes=ALL",
            )  # fmt: skip
        yield
    finally:
        for name in (RES_ALICE, RES_ACCT_A, RES_ROOT):
            cluster.ns("scontrol", "delete", f"ReservationName={name}", check=False)
        cluster.ns("scancel", "-n", JOB_TAG, check=False)
        sacctmgr(cluster, "delete", "user", "root", "where", f"account={ACCT_A}", check=False)
        sacctmgr(cluster, "delete", "user", f"{ALICE},{BOB}", check=False)
        sacctmgr(cluster, "delete", "account", f"{ACCT_A},{ACCT_B},{ACCT_OTHER}", check=False)
        sacctmgr(cluster, "delete", "qos", f"{QOS_A},{QOS_OTHER}", check=False)
        subprocess.run(["userdel", ALICE], check=False)


@pytest.fixture(scope="module")
def wrappers(cluster: NsCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the nsenter wrappers; each appends ``NAME ssh|local`` to its calls.log."""
    d = tmp_path_factory.mktemp("ns-slurm")
    assert cluster.holder is not None
    for cmd in SLURM_COMMANDS:
        w = d / cmd
        w.write_text(
            f'#!/bin/sh\nwhere=local; [ -n "$SSH_CONNECTION" ] && where=ssh; echo "{cmd} $where" >> {d}/calls.log\n'
            f'exec nsenter -t {cluster.holder.pid} -m -n -- /usr/bin/{cmd} "$@"\n'
        )
        w.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def hub(associations: None, wrappers: Path, sshd: SSHD, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    workdir = str(tmp_path_factory.mktemp("slurm-accounts"))
    # a site's own form: the shipped one with a mark, found through c.JupyterHub.template_paths
    site = tmp_path_factory.mktemp("site-templates")
    shipped = Path(TEMPLATE_DIR, "options_form.html").read_text()
    (site / "options_form.html").write_text(SITE_MARK + "\n" + shipped)
    profile = {"name": "course", "description": "charged to the course", "req_account": ACCT_A}
    extra = "\n".join(
        [
            f'c.SlurmBrokerSpawner.batch_submit_cmd = "{wrappers}/sbatch --parsable"',
            f'c.SlurmBrokerSpawner.batch_cancel_cmd = "{wrappers}/scancel {{job_id}}"',
            f'c.SlurmBrokerSpawner.squeue_command = "{wrappers}/squeue"',
            f"c.SlurmBrokerSpawner.sinfo_command = \"{wrappers}/sinfo -h -o '%P|%l|%c|%m|%G|%a'\"",
            f'c.SlurmBrokerSpawner.sacctmgr_command = "{wrappers}/sacctmgr"',
            f'c.SlurmBrokerSpawner.scontrol_command = "{wrappers}/scontrol"',
            f"c.SlurmBrokerSpawner.profiles = [{profile!r}]",
            sshd.hub_config(),
            f"c.JupyterHub.template_paths = [{str(site)!r}, {TEMPLATE_DIR!r}]",
        ]
    )
    with running_stack(
        workdir,
        path=tool_path(),
        logs="slurm-accounts-logs",
        poll_interval=1,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, extra),
    ) as stack:
        yield Hub(stack)


def spawn_form(hub: Hub, user: str) -> str:
    """The spawn page as *user* sees it: logged in with the stack's shared password, through CHP."""
    opener = form_login(hub.stack.public_url, user, hub.stack.password)
    with opener.open(hub.stack.public_url + "/hub/spawn", timeout=60) as r:
        assert r.status == 200 and r.url.endswith("/hub/spawn"), r.url
        return str(r.read().decode())


def select_options(page: str, name: str) -> dict[str, bool] | None:
    """value -> selected, of the form's ``<select name=NAME>``; None when there is none."""
    m = re.search(rf'<select[^>]*name="{name}"[^>]*>(.*?)</select>', page, re.S)
    if m is None:
        return None
    return {v: bool(sel) for v, sel in re.findall(r'<option value="([^"]*)"( selected)?', m.group(1))}


def jobs(cluster: NsCluster) -> list[dict[str, str]]:
    """Every job of this run on the cluster, finished ones too (squeue -t all)."""
    out = cluster.ns("squeue", "-h", "-t", "all", "-n", JOB_TAG, "-o", "%i|%a|%q|%T").stdout
    return [dict(zip(("id", "account", "qos", "state"), ln.split("|"), strict=True)) for ln in out.split()]


def test_form_offers_exactly_the_users_accounts_qos_and_reservations(hub: Hub) -> None:
    page = spawn_form(hub, ALICE)
    assert SITE_MARK in page  # the hub's template_paths reach the form
    assert select_options(page, "account") == {ACCT_A: False, ACCT_B: True}  # the default preselected
    qos = select_options(page, "qos")
    assert qos is not None and set(qos) == {"", QOS_A, "normal"} and QOS_OTHER not in page
    # the page narrows QoS to what each account allows
    assert f'"{ACCT_B}": ["normal"]' in page and f'"{ACCT_A}": ["{QOS_A}", "normal"]' in page
    # Users=ALICE and Accounts=A admit her; Users=root does not
    assert select_options(page, "reservation") == {"": False, RES_ALICE: False, RES_ACCT_A: False}
    assert RES_ROOT not in page

    page = spawn_form(hub, BOB)
    assert select_options(page, "account") == {ACCT_OTHER: True}
    assert select_options(page, "reservation") is None
    for name in (ACCT_A, ACCT_B, QOS_A, RES_ALICE, RES_ACCT_A, RES_ROOT):
        assert name not in page, name


@pytest.mark.parametrize(
    "body,words",
    [
        ({"account": ACCT_OTHER}, ["Account", ACCT_OTHER, "not available to you", ACCT_A, ACCT_B]),
        ({"qos": QOS_OTHER}, ["QoS", QOS_OTHER, "not available to you"]),
        ({"account": ACCT_B, "qos": QOS_A}, ["QoS", QOS_A, f"not allowed with account '{ACCT_B}'"]),
        ({"reservation": RES_ROOT}, ["Reservation", RES_ROOT, "not available to you"]),
    ],
    ids=["account", "qos", "qos-of-another-account", "reservation"],
)
def test_forged_choice_in_a_rest_spawn_is_refused(
    hub: Hub, cluster: NsCluster, body: dict[str, Any], words: list[str]
) -> None:
    before = jobs(cluster)
    status, answer = hub.api(hub.user_path(ALICE) + "/server", "POST", body)
    assert status == 400, (status, answer)
    message = answer if isinstance(answer, str) else str(answer.get("message"))
    for w in words:
        assert w in message, (w, message)
    time.sleep(2)  # a submission would have shown by now (sbatch takes ~10 ms)
    assert jobs(cluster) == before
    assert cluster.ns("sacct", "-n", "-X", "--name", JOB_TAG, "-A", ACCT_OTHER, "-o", "JobID").stdout.strip() == ""
    _, info = hub.api(hub.user_path(ALICE))
    assert not info.get("servers"), info


def submitted_job(hub: Hub, cluster: NsCluster, user: str, body: dict[str, Any]) -> dict[str, str]:
    """Spawn with *body*; the scontrol record of the job it submitted (the server is stopped)."""
    before = {j["id"] for j in jobs(cluster)}
    status, answer = hub.api(hub.user_path(user) + "/server", "POST", body)
    assert status in (201, 202), (status, answer)
    try:
        new = wait_until(lambda: [j for j in jobs(cluster) if j["id"] not in before], 60, 0.5, "the job")
    finally:
        hub.api(hub.user_path(user) + "/server", "DELETE")
    assert len(new) == 1, new
    text = cluster.ns("scontrol", "show", "job", new[0]["id"]).stdout
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def test_profile_account_reaches_sbatch(hub: Hub, cluster: NsCluster) -> None:
    job = submitted_job(hub, cluster, ALICE, {"profile": "course"})
    assert job["Account"] == ACCT_A and job["JobName"] == JOB_TAG
    _wait_stopped(hub, ALICE)


def test_users_own_account_and_qos_reach_sbatch(hub: Hub, cluster: NsCluster) -> None:
    job = submitted_job(hub, cluster, ALICE, {"account": ACCT_A, "qos": QOS_A})
    assert (job["Account"], job["QOS"]) == (ACCT_A, QOS_A)
    _wait_stopped(hub, ALICE)


def _wait_stopped(hub: Hub, user: str) -> None:
    wait_until(lambda: not hub.api(hub.user_path(user))[1].get("servers"), 60, 0.5, f"{user}'s server gone")


def test_every_lookup_ran_on_the_login_node(hub: Hub, wrappers: Path) -> None:
    """The association and reservation lookups took the submission's path: over SSH."""
    spawn_form(hub, BOB)
    calls = [line.split() for line in (wrappers / "calls.log").read_text().splitlines()]
    assert {c[0] for c in calls} >= {"sacctmgr", "scontrol", "sbatch", "squeue", "sinfo"}
    assert all(where == "ssh" for _, where in calls), calls


@pytest.mark.timeout(120)
def test_unusable_sacctmgr_is_shown_on_the_form() -> None:
    """The host's real sacctmgr with the shared dev cluster's slurm.conf (no slurmdbd)."""
    sacctmgr = real_binary("sacctmgr")
    probe = subprocess.run([sacctmgr, "-nP", "show", "assoc", "format=account"], capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("this machine's Slurm has accounting enabled")
    user = mock.Mock(settings={})
    user.name = ALICE
    s = SlurmBrokerSpawner(
        user=user,
        hub=mock.Mock(),
        sacctmgr_command=sacctmgr,
        sinfo_command="printf 'debug*|1:00:00|4|8000|(null)|up\\n'",  # the form's other half, not under test
        form_slurm_choices=["account", "qos"],
    )
    html = asyncio.run(s.get_options_form())
    assert "Your Slurm accounts could not be read right now" in html
    assert 'name="account"' not in html and 'name="partition"' in html
