"""Browser tests' helpers: Debian's chromium driven by PyPI's playwright (environment notes:
playwright's own browser downloads are not reachable), logging in through the hub's
shared-password form, screenshots in ``test-artifacts/``.

conftest.py registers this module as a plugin, so the ``chromium`` fixture needs no import.
:func:`wheel_data_prefix` gives single-user servers JupyterLab's time-left extension the way
the shipped wheel installs it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness import REPO as _REPO
from harness import wait_until

REPO = Path(_REPO)

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

#: An init script that records every progress event the pending page receives (the page shows
#: each one), across navigations, through a binding the test exposes as ``recordProgress``.
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


def shot(page, shots_dir: str, name: str) -> None:
    """A full-page screenshot ``<shots_dir>/<name>.png``."""
    page.screenshot(path=os.path.join(shots_dir, f"{name}.png"), full_page=True)


def login(context, stack, user: str, shots_dir: str = "", password: str = ""):
    """A new page of *context*, signed in to the hub of *stack* as *user* with *password*
    (default: the stack's shared password); a screenshot of the form as ``<user>-01-login`` when
    *shots_dir* is given."""
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(stack.public_url + "/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", password or stack.password)
    if shots_dir:
        shot(page, shots_dir, f"{user}-01-login")
    page.click("#login_submit")
    page.wait_for_load_state()
    return page


def run_in_new_notebook(page, code: str, expected: str) -> None:
    """In JupyterLab (on *page*): a new notebook from the launcher, *code* typed into its first
    cell and run until its output is *expected* (the code must be idempotent)."""
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
    # "[ ]"), so run the cell again until it has an output.
    for _attempt in range(8):
        cell.click()
        page.keyboard.press("Shift+Enter")
        try:
            out.wait_for(timeout=15_000)
            break
        except Exception:
            continue
    wait_until(lambda: out.inner_text().strip() == expected, 30, what=f"cell output {expected}")


def wheel_data_prefix(dest: Path) -> Path:
    """Build JupyterLab's time-left extension (scripts/build-labextension.sh, node_modules cached
    outside the checkout) and the project's wheel (scripts/build_images.py's ``build_wheel``, as
    ``make images`` does), and unpack the wheel's data files (``share/jupyter/labextensions/...``,
    ``etc/jupyter/jupyter_server_config.d/...``) into *dest*, which is returned: a server started
    with ``JUPYTER_PATH=<dest>/share/jupyter`` and ``JUPYTER_CONFIG_PATH=<dest>/etc/jupyter`` has
    exactly what installing the wheel gives it."""
    env = dict(os.environ, PYTHON=sys.executable)
    env["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable), str(REPO / ".node" / "node_modules" / ".bin"), env.get("PATH", "")]
    )
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-labextension.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, f"build-labextension failed:\n{r.stdout}\n{r.stderr}"
    spec = importlib.util.spec_from_file_location("build_images", REPO / "scripts" / "build_images.py")
    assert spec is not None and spec.loader is not None
    build_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_images)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = build_images.build_wheel(sys.executable, dest / "wheel.log")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            head, sep, rest = name.partition(".data/data/")
            if sep and "/" not in head:
                target = dest / rest
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    assert (dest / "share/jupyter/labextensions/jupyterhub-hpc-timeleft/package.json").is_file()
    assert (dest / "etc/jupyter/jupyter_server_config.d/jupyterhub-hpc-timeleft.json").is_file()
    return dest
