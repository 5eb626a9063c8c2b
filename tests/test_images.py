"""The shipped image: ``singularity/cpu.sif`` built from ``singularity/cpu.def`` by ``make images``,
then run on its own.

One build per test session (a session fixture; ``scripts/build_images.py`` caches its stages
outside the checkout, so a warm machine only rebuilds the wheel and finds the image cached). The
first call's duration and whether it was a cold or a cached build is written to the terminal.

What it proves:
- ``make images`` builds cpu.sif (within the size target) and a second run reuses the cache;
- ``apptainer test`` passes (the recipe's %test: ``import node_agent.agent``,
  ``node-agent run --help``, ``jupyterhub-singleuser --version``);
- with ``--containall`` and no host binds at all (``--no-mount bind-paths``: not even the admin's
  ``bind path`` entries) the image runs ``node-agent run --help`` and its own Python: ``sys.prefix``
  and ``node_agent`` come from the image's venv, the checkout is not visible, the installed
  distribution is the wheel of this checkout (same ``node_agent`` sources, byte for byte), and the
  node side imports with only its declared dependency (asyncssh).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apptainer_image import CPU_SIF as SIF
from apptainer_image import build_shipped_image, make_images

pytestmark = [pytest.mark.apptainer, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
SIZE_TARGET_MB = 450
CONTAINED = ["apptainer", "exec", "--containall", "--no-mount", "bind-paths"]


@pytest.fixture(scope="session")
def cpu_build(pytestconfig: pytest.Config) -> dict[str, object]:
    """``make images`` once per session (tests/apptainer_image.py)."""
    return build_shipped_image(pytestconfig)


def test_make_images_builds_cpu_sif(cpu_build: dict[str, object]) -> None:
    out = str(cpu_build["output"])
    assert SIF.is_file()
    assert SIF.stat().st_size / 1e6 <= SIZE_TARGET_MB, f"cpu.sif is {SIF.stat().st_size / 1e6:.0f} MB"
    for stage in ("check tools", "wheel", "cpu: base", "cpu: wheelhouse", "cpu: image"):
        assert re.search(rf"\]\s+{re.escape(stage)}: done in [0-9.]+ s", out), f"stage {stage!r} not reported"
    # the image is the one in the cache outside the checkout, keyed by a hash
    m = re.search(r"singularity/cpu\.sif: \d+ MiB \(cache (cpu-[0-9a-f]{16}\.sif)\)", out)
    assert m, out[-2000:]
    assert not m.group(1).startswith(str(REPO))


def test_second_run_reuses_the_cache(cpu_build: dict[str, object]) -> None:
    r, seconds = make_images()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for what in ("base: cached", "wheelhouse: cached", "image cpu: cached"):
        assert what in out, f"{what!r} missing:\n{out}"
    assert seconds < 90, f"a cached make images took {seconds:.0f} s"


def test_apptainer_test_passes(cpu_build: dict[str, object]) -> None:
    r = subprocess.run(["apptainer", "test", str(SIF)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node_agent.agent imports" in r.stdout
    assert "node-agent run --help: ok" in r.stdout
    assert re.search(r"jupyterhub-singleuser \d+\.\d+", r.stdout), r.stdout


def test_node_agent_run_help_in_the_contained_image(cpu_build: dict[str, object]) -> None:
    r = subprocess.run([*CONTAINED, str(SIF), "node-agent", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("usage: node-agent run")
    assert "BROKER_SSH_HOST" in r.stdout


PROBE = r"""
import hashlib, importlib.metadata as md, json, os, pathlib, sys
import asyncssh, node_agent, node_agent.agent
pkg = pathlib.Path(node_agent.__file__).parent
dist = md.distribution("jupyterhub-hpc-broker")
print(json.dumps({
    "prefix": sys.prefix, "base_prefix": sys.base_prefix, "executable": sys.executable,
    "version": sys.version.split()[0],
    "node_agent": node_agent.__file__, "asyncssh": asyncssh.__file__,
    "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pkg.glob("*.py"))},
    "dist_version": dist.version, "installer": (dist.read_text("INSTALLER") or "").strip(),
    "direct_url": dist.read_text("direct_url.json"),
    "checkout_visible": os.path.exists(CHECKOUT),
    "env_path": os.environ.get("PATH", ""),
    "user_site": __import__("site").ENABLE_USER_SITE,
}))
"""


def test_python_in_the_image_is_the_images(cpu_build: dict[str, object]) -> None:
    code = PROBE.replace("CHECKOUT", repr(str(REPO)))
    r = subprocess.run([*CONTAINED, str(SIF), "python", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    p = json.loads(r.stdout.strip().splitlines()[-1])
    host = {os.path.realpath(x) for x in (sys.prefix, sys.base_prefix, str(REPO))}
    for key in ("prefix", "executable", "node_agent", "asyncssh"):
        assert not any(p[key].startswith(h + "/") or p[key] == h for h in host), (key, p[key])
    assert p["prefix"] == "/opt/venv" and p["executable"].startswith("/opt/venv/")
    assert p["node_agent"].startswith(p["prefix"] + "/lib/") and "/site-packages/node_agent/" in p["node_agent"]
    assert not p["checkout_visible"], "the checkout is visible in a --containall run without binds"
    assert p["env_path"].startswith("/opt/venv/bin:")
    assert p["user_site"] is True  # pip install --user works for the image's users
    # exactly this checkout's agent, installed from a wheel (not copied source folders)
    mine = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((REPO / "node_agent").glob("*.py"))}
    assert p["sources"] == mine
    assert p["installer"] == "pip"
    version = re.search(r'^__version__ = "([^"]+)"', (REPO / "wire" / "version.py").read_text(), re.M)
    assert version and p["dist_version"] == version.group(1)  # the one version (wire/version.py)
    assert ".whl" in json.loads(p["direct_url"] or "{}").get("url", ""), p["direct_url"]


def test_jupyterlab_time_left_extension_in_the_image(cpu_build: dict[str, object]) -> None:
    """``make images`` builds JupyterLab's time-left extension first and the wheel carries it: the
    image's JupyterLab lists it enabled, and its server side is enabled in jupyter_server."""
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def lines(*argv: str) -> list[str]:
        r = subprocess.run([*CONTAINED, str(SIF), *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return ansi.sub("", r.stdout + r.stderr).splitlines()

    lab = [line for line in lines("jupyter", "labextension", "list") if "jupyterhub-hpc-timeleft" in line]
    assert lab and "enabled" in lab[0] and "OK" in lab[0], lab
    server = [line.split() for line in lines("jupyter", "server", "extension", "list")]
    assert ["lab_timeleft", "enabled"] in server, server
