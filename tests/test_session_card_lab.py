"""What users see of their batch job, in a real browser (Debian's chromium via playwright) on the
REAL single-node Slurm, with JupyterHub + CHP + broker + SlurmBrokerSpawner and the node agent in
the job:

* the session card on the hub home page: the queue state (Slurm's reason) while the job is held
  (``scontrol hold``), then the node while it runs, then "ended" with the reason once Slurm ends
  the job at its (shortened: ``scontrol update TimeLimit=``) walltime;
* the card's log link: the owner gets the job's output (page and download), another user 403,
  a hub admin 200;
* JupyterLab's time-left extension, installed from the project's wheel (built here with the
  extension, as ``make images`` does; its data files are put on the server's ``JUPYTER_PATH`` /
  ``JUPYTER_CONFIG_PATH``): "time left H:MM" in the status bar, counting down; Slurm's walltime
  signal to the agent (``scancel --batch --signal=USR1``, what ``--signal=B:USR1@N`` sends) makes
  the notification appear, and an edited, unsaved notebook is saved on disk within 10 s.

Screenshots go to ``test-artifacts/session-card/``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import time

import pytest

import browser
from e2e import Hub
from harness import ARTIFACTS, REPO, wait_until
from slurm_cluster import hub_config, real_binary, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.timeout(900),
    pytest.mark.usefixtures("cancel_leftover_jobs"),
]

SHOTS = os.path.join(ARTIFACTS, "session-card")
USER = "alice"
ADMIN = "hpcadmin"  # a hub admin (c.Authenticator.admin_users), signing in with ADMIN_PASSWORD
ADMIN_PASSWORD = secrets.token_urlsafe(36)
MARK = "saved-by-the-walltime-warning"

# Jobs of this profile cannot start for an hour, so the test can hold them before they run.
LATER_PROFILE = (
    "c.SlurmBrokerSpawner.profiles = [{'name': 'later', 'description': 'starts in an hour', "
    "'req_options': '--begin=now+1hour'}]"
)


@pytest.fixture(scope="module")
def stack_options(slurm_cluster, tmp_path_factory):
    """The module's ``stack``: SlurmBrokerSpawner; the servers get the wheel's JupyterLab
    extension, and Lab's autosave off (so only the walltime warning can save the notebook)."""
    os.makedirs(SHOTS, exist_ok=True)
    for old in glob.glob(os.path.join(SHOTS, "*.png")):
        os.unlink(old)
    prefix = browser.wheel_data_prefix(tmp_path_factory.mktemp("wheel-data"))
    settings = tmp_path_factory.mktemp("lab-settings")
    docmanager = settings / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    os.chmod(settings, 0o755)
    environment = {
        "NODE_AGENT_HEARTBEAT": "5",
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_CONFIG_PATH": str(prefix / "etc" / "jupyter"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "PYTHONPATH": str(REPO),  # the job imports this checkout's node_agent, as the hub does
    }
    workdir = str(tmp_path_factory.mktemp("card-stack"))
    extra = "\n".join(
        [
            LATER_PROFILE,
            "c.BrokerSpawnerMixin.broker_wait_interval = 0.5",
            f"c.Authenticator.admin_users = {{{ADMIN!r}}}",
            f"c.SharedPasswordAuthenticator.admin_password = {ADMIN_PASSWORD!r}",
            f"c.Spawner.environment = {environment!r}",
        ]
    )
    return dict(
        workdir=workdir,
        logs="session-card-logs",
        poll_interval=1,
        reconcile_interval=1.0,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, extra),
    )


def shot(page, name: str) -> None:
    browser.shot(page, SHOTS, name)


def card_shot(page, name: str) -> None:
    """The card alone, and the whole page."""
    page.locator("#session-card").screenshot(path=os.path.join(SHOTS, f"{name}.png"))
    shot(page, f"{name}-page")


def squeue(job_id: str, fmt: str) -> str:
    return run(real_binary("squeue"), "-h", "-t", "all", "-j", job_id, "-o", fmt).stdout.strip()


def card_text(page, stack, want: str, timeout: float) -> str:
    """Reload the home page until the card's HTML contains *want*; its text."""

    def look() -> str:
        page.goto(stack.public_url + "/hub/home")
        card = page.locator("#session-card")
        return card.inner_text() if card.count() and want in card.evaluate("e => e.outerHTML") else ""

    return wait_until(look, timeout, interval=1.0, what=f"{want!r} on the session card")


def test_card_log_and_lab_time_left_on_slurm(chromium, stack):
    hub = Hub(stack)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    other = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = browser.login(context, stack, USER)

        # -- queued: the job is held -----------------------------------------------------------
        status, body = hub.api(hub.user_path(USER) + "/server", "POST", {"profile": "later"})
        assert status in (201, 202), (status, body)
        job_id = wait_until(lambda: hub.session_of(USER).get("job_id"), 60, what="the job id")
        run(real_binary("scontrol"), "hold", job_id, check=True)
        state, reason = squeue(job_id, "%T %r").split()
        assert state == "PENDING" and reason in ("JobHeldAdmin", "JobHeldUser"), (state, reason)  # admin: as root
        text = card_text(page, stack, reason, 30)
        assert page.get_attribute("#session-card", "data-state") == "queued", text
        assert job_id in page.inner_text("#session-card .session-job-id")
        partition = squeue(job_id, "%P")
        assert partition and partition in page.inner_text("#session-card .session-partition")
        assert "not allocated yet" in page.inner_text("#session-card .session-node")
        card_shot(page, "card-1-queued")

        # -- running: released, started now --------------------------------------------------------
        run(real_binary("scontrol"), "release", job_id, check=True)
        run(real_binary("scontrol"), "update", f"JobId={job_id}", "StartTime=now", check=True)
        wait_until(
            lambda: hub.api(hub.user_path(USER))[1].get("servers", {}).get("", {}).get("ready"),
            180,
            interval=0.5,
            what="the server to be ready",
        )
        node = squeue(job_id, "%N")
        assert node
        card_text(page, stack, "running", 30)
        assert page.inner_text("#session-card .session-node").strip() == node
        assert "Time left:" in page.inner_text("#walltime")
        card_shot(page, "card-2-running")

        # -- the log: the owner's page and download, another user 403, a hub admin 200 ----------
        page.click("#session-card a.session-log")
        page.wait_for_selector("#job-log")
        assert job_id in page.inner_text("#log-job-id")
        log_text = page.inner_text("#job-log")
        assert "node-agent" in log_text, log_text[-2000:]
        shot(page, "log-page")
        log_url = page.url.split("?")[0]
        download = context.request.get(log_url + "?download=1")
        assert download.status == 200
        assert download.headers["content-disposition"] == f'attachment; filename="job-{job_id}.log"'
        assert "node-agent" in download.text()
        other_page = browser.login(other, stack, "mallory")
        response = other_page.goto(log_url)
        assert response is not None and response.status == 403
        assert response.request.redirected_from is None  # refused here, not sent to a login page
        denied = other.request.get(log_url + "?download=1")
        assert denied.status == 403 and "node-agent" not in denied.text()
        assert other.request.get(log_url.replace(f"/{USER}", "/nobody")).status == 403
        admin = chromium.new_context()
        try:
            browser.login(admin, stack, ADMIN, password=ADMIN_PASSWORD)
            admin_view = admin.request.get(log_url + "?download=1")
            assert admin_view.status == 200 and "node-agent" in admin_view.text()
        finally:
            admin.close()

        # -- JupyterLab: time left, counting down --------------------------------------------------
        page.goto(stack.public_url + f"/user/{USER}/lab")
        page.wait_for_selector(".jp-LauncherCard", timeout=120_000)
        item = page.locator(".jp-hpc-TimeLeft")
        item.wait_for(timeout=30_000)
        wait_until(lambda: item.inner_text().startswith("time left"), 30, what="time left in the status bar")
        first_text = item.inner_text()
        assert re.fullmatch(r"time left 0:(2\d|30)", first_text), first_text  # a 30-minute job
        first_left, first_at = int(item.get_attribute("data-seconds-left") or 0), time.monotonic()
        page.locator("#jp-main-statusbar").screenshot(path=os.path.join(SHOTS, "lab-1-statusbar.png"))
        shot(page, "lab-1-time-left")

        # an edited notebook, not saved
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
        cell.wait_for(timeout=60_000)
        notebooks = os.path.join(stack.workdir, "notebooks")
        path = wait_until(lambda: sorted(glob.glob(os.path.join(notebooks, "Untitled*.ipynb"))), 30)[0]
        cell.click()
        page.keyboard.type(f"print('{MARK}')")
        page.wait_for_selector(".jp-Document.jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty", timeout=10_000)
        assert MARK not in open(path).read()

        # -- Slurm's walltime signal reaches the agent: notification, all saved within 10 s ----------
        run(real_binary("scancel"), "--batch", "--signal=USR1", job_id, check=True)
        fired = time.monotonic()
        page.get_by_text("close to its time limit").first.wait_for(timeout=10_000)
        wait_until(lambda: MARK in open(path).read(), max(0.1, 10 - (time.monotonic() - fired)), what="saved notebook")
        saved_after = time.monotonic() - fired
        print(f"\n[lab] walltime signal -> notebook saved on disk: {saved_after:.1f} s")
        assert page.locator(".jp-hpc-TimeLeft.jp-hpc-TimeLeft-warning").count() == 1
        shot(page, "lab-2-walltime-warning")

        # counting down: the seconds fall with the clock, the text with the minutes
        left = int(item.get_attribute("data-seconds-left") or 0)
        elapsed = time.monotonic() - first_at
        assert first_left - elapsed - 3 <= left <= first_left - elapsed + 3, (first_left, left, elapsed)
        wait_until(lambda: item.inner_text() != first_text, 65, interval=1.0, what="the status bar to count down")
        assert item.inner_text() < first_text, (first_text, item.inner_text())
        page.locator("#jp-main-statusbar").screenshot(path=os.path.join(SHOTS, "lab-3-statusbar-later.png"))

        # -- ended: Slurm ends the job at its (now shorter) walltime ---------------------------------
        run(real_binary("scontrol"), "update", f"JobId={job_id}", "TimeLimit=1", check=True)
        card_text(page, stack, 'data-state="ended"', 180)
        # the hub may show the ended card a moment before it has Slurm's final state (COMPLETING
        # -> TIMEOUT); the reason must become the walltime within the settle window
        text = card_text(page, stack, "walltime reached", 60)
        assert page.get_attribute("#session-card", "data-state") == "ended", text
        assert page.inner_text("#session-card .session-end-reason") == "walltime reached", text
        assert job_id in page.inner_text("#session-card .session-job-id")
        assert page.inner_text("#session-card .session-node").strip() == node
        assert squeue(job_id, "%T") in ("TIMEOUT", "")
        card_shot(page, "card-3-ended")
        # the ended job's log stays readable for its owner
        assert "node-agent" in context.request.get(log_url + "?download=1").text()
    finally:
        other.close()
        context.close()
