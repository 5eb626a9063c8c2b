"""A real browser for the browser tests (test_browser.py, test_site.py): Debian's chromium,
headless, driven by PyPI's playwright.

``chromium`` (module fixture; conftest.py registers this module as a plugin): the browser,
chromium apt-installed and playwright pip-installed when missing. :func:`login` signs in through
the hub's shared-password form, :func:`shot` saves a screenshot, :func:`run_in_new_notebook`
opens a notebook from JupyterLab's launcher and runs one cell. :data:`RECORD_PROGRESS` (an init
script) reports every progress event of the pending page to a ``recordProgress`` binding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Records every progress event the pending page receives (the page shows each one), across
# navigations, through a binding the test exposes.
RECORD_PROGRESS = """
(() => {
  const Orig = window.EventSource;
  if (!Orig || Orig.__recorded) return;
  function Recorded(url, opts) {
    const es = new Orig(url, opts);
    es.addEventListener("message", (e) => { try { window.recordProgress(e.data); } catch (err) {} });
    return es;
  }
  Recorded.prototype = Orig.prototype;
  Recorded.__recorded = true;
  window.EventSource = Recorded;
})();
"""


@pytest.fixture(scope="module")  # not session: playwright's sync API keeps an event loop running while open
def chromium():
    """Debian's chromium (installed with apt if missing) and PyPI's playwright."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0:
            pytest.fail(f"{CHROMIUM} is missing and installing it needs root: apt-get install chromium")
        subprocess.run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "chromium"],
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
    try:
        import playwright  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], check=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def shot(page, directory: str, name: str) -> None:
    page.screenshot(path=os.path.join(directory, f"{name}.png"), full_page=True)


def login(context, stack, user: str, shots: str):
    """A new page of *context*, signed in to *stack*'s hub as *user* (shared password)."""
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(stack.public_url + "/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", stack.password)
    shot(page, shots, f"{user}-01-login")
    page.click("#login_submit")
    page.wait_for_load_state()
    return page


def run_in_new_notebook(page, code: str, expected: str) -> None:
    """In JupyterLab (on *page*): a new notebook from the launcher, *code* typed into its first
    cell and run until its output is *expected*."""
    page.wait_for_selector(".jp-LauncherCard", timeout=120_000)
    page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
    cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    cell.wait_for(timeout=60_000)
    # the kernel must be up before the cell runs (the indicator says idle)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=120_000)
    cell.click()
    page.keyboard.type(code)
    wait_until(lambda: cell.inner_text().strip() == code, 10, what=f"the cell to hold {code}")
    out = page.locator(".jp-OutputArea-output").first
    # A run issued while Lab is still attaching the kernel is dropped silently (the cell keeps
    # "[ ]"), so run the cell again until it has an output (the code must be idempotent).
    for _attempt in range(8):
        cell.click()
        page.keyboard.press("Shift+Enter")
        try:
            out.wait_for(timeout=15_000)
            break
        except Exception:
            continue
    wait_until(lambda: out.inner_text().strip() == expected, 30, what=f"cell output {expected}")
