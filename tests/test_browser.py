"""The user's path in a real browser (Debian's chromium, headless, driven by playwright):
log in through the shared-password form, choose resources in the options form, watch the
progress messages on the pending page, get JupyterLab, run ``1+1`` in a notebook, see the
walltime on the home page, stop the server from the hub's control panel. And: an invalid
choice in the form comes back as a message in the form.

Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

import browser
from e2e import Hub
from harness import ARTIFACTS, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SHOTS = os.path.join(ARTIFACTS, "browser")

PROFILES = [
    {
        "name": "small",
        "display_name": "Small",
        "description": "1 CPU, 1 GB, 30 minutes",
        "req_nprocs": "1",
        "req_memory": "1G",
        "req_runtime": "0:30:00",
    }
]


@pytest.fixture(scope="module")
def stack_options():
    """The module's ``stack`` (conftest.py); this module's screenshots start afresh."""
    os.makedirs(SHOTS, exist_ok=True)
    for old in glob.glob(os.path.join(SHOTS, "*.png")):
        os.unlink(old)
    return dict(
        name="browser",
        logs="browser-logs",
        poll_interval=2,
        extra_hub_config=(
            "c.BrokerSpawnerMixin.broker_wait_interval = 0.5\n"
            # always show the pending page (a fast spawn would otherwise skip it)
            "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}\n"
            f"c.LocalBrokerSpawner.profiles = {PROFILES!r}\n"
            # so that the home page's warning shows for a 45-minute session
            "c.LocalBrokerSpawner.walltime_warning_minutes = 60\n"
            # a session card per server, named ones too
            "c.JupyterHub.allow_named_servers = True\n"
        ),
    )


def shot(page, name: str) -> None:
    browser.shot(page, SHOTS, name)


def login(context, stack, user: str):
    return browser.login(context, stack, user, SHOTS)


def test_login_options_progress_lab_and_stop(chromium, stack):
    hub = Hub(stack)
    user = "alice"
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    events: list[dict] = []
    context.expose_binding("recordProgress", lambda _source, data: events.append(json.loads(data)))
    context.add_init_script(browser.RECORD_PROGRESS)
    try:
        page = login(context, stack, user)
        page.goto(stack.public_url + "/hub/spawn")
        # the form generated from this machine, with the admin's profile
        page.wait_for_selector("#hpc-partition")
        assert page.locator("#hpc-partition option").first.get_attribute("value") == "local"
        assert "Small" in page.inner_text("form#spawn_form")
        assert "CPUs" in page.inner_text("#hpc-limits")
        page.check("#hpc-profile-custom")
        page.fill("#hpc-nprocs", "1")
        page.fill("#hpc-memory", "1")
        page.fill("#hpc-ngpus", "0")
        page.fill("#hpc-runtime", "0:45")
        page.select_option("#hpc-image", "compute")
        shot(page, f"{user}-02-options")
        page.click("#spawn_form button[type=submit]")

        # the pending page shows the progress messages
        page.wait_for_url("**/hub/spawn-pending/**")
        page.wait_for_function("document.querySelectorAll('#progress-log .progress-log-event').length > 0")
        page.evaluate("document.getElementById('progress-details').open = true")
        shot(page, f"{user}-03-pending")
        page.wait_for_url(f"**/user/{user}/lab**", timeout=120_000)

        messages = [e.get("message", "") for e in events]
        expected = [
            "Registering the session",
            "Submitting the batch job",
            "submitted to the queue",
            "running on",
            "Tunnel connected",
            "Server ready after",
            "Server ready at",
        ]
        positions = []
        for want in expected:
            idx = next((i for i, m in enumerate(messages) if want in m), None)
            assert idx is not None, f"{want!r} not among the progress messages: {messages}"
            positions.append(idx)
        assert positions == sorted(positions), f"progress out of order: {messages}"
        progress = [e["progress"] for e in events if "progress" in e]
        assert progress == sorted(progress) and progress[-1] == 100, events
        assert not any(e.get("failed") for e in events), events
        with open(os.path.join(SHOTS, f"{user}-progress.json"), "w") as f:
            json.dump(events, f, indent=1)

        # the options reached the job
        session = hub.session_of(user)
        script = open(os.path.join(hub.job_dir(session["job_id"]), "script")).read()
        assert "JUPYTERHUB_WALLTIME_END" in script and "+ 2700" in script, script
        _, env = hub.run_code(
            user,
            "import os; (os.environ.get('JUPYTERHUB_IMAGE'), "
            "os.environ.get('JUPYTERHUB_WALLTIME_SECONDS'), "
            "bool(os.environ.get('JUPYTERHUB_WALLTIME_END')))",
        )
        assert env == "('compute', '2700', True)", env

        # JupyterLab: a new notebook, 1+1 -> 2
        page.wait_for_selector(".jp-LauncherCard", timeout=120_000)
        shot(page, f"{user}-04-lab")
        try:
            browser.run_in_new_notebook(page, "1+1", "2")
        finally:
            shot(page, f"{user}-05-notebook")

        # the hub's home page: time left and the warning; stop from there
        page.goto(stack.public_url + "/hub/home")
        page.wait_for_selector("#walltime")
        text = page.inner_text("#walltime")
        assert "Time left:" in text and "min" in text, text
        assert page.is_visible("#walltime-warning"), text
        shot(page, f"{user}-06-home")
        page.click("#stop")
        wait_until(lambda: not hub.api(hub.user_path(user))[1].get("servers"), 60, interval=0.5, what="server to stop")
        assert f"/user/{user}" not in hub.proxy_routes()
        page.wait_for_selector("#stop", state="hidden", timeout=30_000)
        page.reload()
        assert not page.is_visible("#walltime")
        assert "Start My Server" in page.inner_text("#start")
        shot(page, f"{user}-07-stopped")
        assert hub.broker(f"/api/sessions/{session['id']}")[1]["state"] == "closed"
    finally:
        context.close()


def test_invalid_choice_is_shown_in_the_form(chromium, stack):
    hub = Hub(stack)
    user = "bob"
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = login(context, stack, user)
        page.goto(stack.public_url + "/hub/spawn")
        page.check("#hpc-profile-custom")
        page.fill("#hpc-runtime", "99")  # hours; the local backend allows 24
        page.click("#spawn_form button[type=submit]")
        err = page.wait_for_selector(".spawn-error-msg")
        text = err.inner_text()
        assert "Walltime" in text and "at most 24 h" in text, text
        assert "Traceback" not in page.content()
        shot(page, f"{user}-01-invalid-walltime")
        # the form is shown again, usable
        page.check("#hpc-profile-custom")
        page.fill("#hpc-runtime", "1")
        page.select_option("#hpc-image", "gpu")  # this machine offers no GPUs
        page.click("#spawn_form button[type=submit]")
        text = page.wait_for_selector(".spawn-error-msg").inner_text()
        assert "GPU image needs at least one GPU" in text, text
        shot(page, f"{user}-02-invalid-gpu")
        _, info = hub.api(hub.user_path(user))
        assert not info.get("servers"), info  # nothing was started
    finally:
        context.close()


def test_a_session_card_per_server_named_too(chromium, stack):
    """The home page has a card per server, each with its job, node, state and time left; a
    stopped named server keeps its last job's card, "ended" with the reason."""
    hub = Hub(stack)
    user = "carol"
    context = chromium.new_context(viewport={"width": 1280, "height": 1100})
    try:
        page = login(context, stack, user)
        for name in ("", "second"):
            path = hub.user_path(user) + ("/server" if not name else f"/servers/{name}")
            status, body = hub.api(path, "POST", {"profile": "small"})
            assert status in (201, 202), (status, body)

        def both_running():
            servers = hub.api(hub.user_path(user))[1].get("servers", {})
            return all(servers.get(n, {}).get("ready") for n in ("", "second"))

        wait_until(both_running, 120, interval=0.5, what="both servers ready")
        page.goto(stack.public_url + "/hub/home")
        cards = page.locator("#session-cards .session-card")
        assert cards.count() == 2
        jobs = set()
        for name in ("", "second"):
            card = page.locator(f'#session-cards .session-card[data-server-name="{name}"]')
            assert card.get_attribute("data-state") == "running"
            assert "Time left:" in card.locator(".walltime").inner_text()
            assert card.locator(".session-node").inner_text().strip()  # this machine's name
            jobs.add(card.locator(".session-job-id").inner_text().strip())
        assert len(jobs) == 2 and all(j.isdigit() for j in jobs), jobs
        shot(page, f"{user}-01-two-cards")

        status, _ = hub.api(hub.user_path(user) + "/servers/second", "DELETE")
        assert status in (202, 204)
        wait_until(
            lambda: "second" not in hub.api(hub.user_path(user))[1].get("servers", {}), 60, what="second to stop"
        )
        page.goto(stack.public_url + "/hub/home")
        ended = page.locator('#session-cards .session-card[data-server-name="second"]')
        assert ended.get_attribute("data-state") == "ended"
        assert "stopped from the hub" in ended.locator(".session-end-reason").inner_text()
        assert (
            page.locator('#session-cards .session-card[data-server-name=""]').get_attribute("data-state") == "running"
        )
        shot(page, f"{user}-02-named-ended")
        hub.stop(user)
    finally:
        context.close()
