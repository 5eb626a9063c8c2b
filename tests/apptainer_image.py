"""The images for the Apptainer tests, and Apptainer itself.

:func:`build_shipped_image` runs ``make images`` (``singularity/cpu.sif`` from ``cpu.def``: what
sites run; its stages are cached outside the checkout) for test_images.py and
test_e2e_image_slurm.py.

:func:`ensure_apptainer` installs Apptainer (as root, with scripts/install-apptainer.sh) or skips
the test. :func:`build_image` makes a SIF from ``singularity/tiny/build.py``'s sandbox (sh,
coreutils basics, the host's python3 + standard library) plus the system shared libraries that
the test's Python needs; the Python environment itself is not copied but bound read-only at
the same paths (:func:`python_binds`). Used by test_e2e_apptainer.py, test_e2e_isolation.py,
test_nbgrader.py and test_webdav.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import node_agent

REPO = Path(__file__).resolve().parent.parent
#: The shipped compute image, as ``make images`` leaves it.
CPU_SIF = REPO / "singularity" / "cpu.sif"
#: the directory the imported node_agent package lives in (the checkout under test)
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(node_agent.__file__)))


def ensure_apptainer() -> None:
    """Install Apptainer as root with the project's script if missing; skip if that fails."""
    if (
        shutil.which("apptainer") is None
        and os.geteuid() == 0
        and os.environ.get("NODE_AGENT_TEST_INSTALL_APPTAINER", "1") == "1"
    ):
        t0 = time.monotonic()
        r = subprocess.run(
            ["bash", str(REPO / "scripts" / "install-apptainer.sh")], capture_output=True, text=True, timeout=900
        )
        print(f"install-apptainer.sh: exit {r.returncode} in {time.monotonic() - t0:.1f}s")
        if r.returncode != 0:
            pytest.skip(f"scripts/install-apptainer.sh failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    if shutil.which("apptainer") is None:
        pytest.skip("apptainer is not installed and could not be installed (run scripts/install-apptainer.sh as root)")
    r = subprocess.run(["apptainer", "version"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"apptainer does not run here: {r.stderr.strip()[:200]}")
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666) if os.geteuid() == 0 else None


def python_binds() -> list[str]:
    """Host trees bound read-only at the same path: the test's venv, its base Python, the
    checkout (editable install). System prefixes are never bound over the image's /usr."""
    out = []
    for p in (sys.prefix, sys.base_prefix, PKG_ROOT):
        p = os.path.realpath(p)
        if p in ("/", "/usr", "/usr/local") or any(p == q.split(":")[0] for q in out):
            continue
        out.append(f"{p}:{p}:ro")
    return out


def tmp_bind_workdir(workdir: Path) -> list[str]:
    """With --contain, the container's /tmp and /var/tmp are private and empty, so a checkout or
    venv that lives under them (a CI clone in /tmp, say) cannot be bound at its own path. Give
    Apptainer a --workdir whose tmp/ and var_tmp/ hold empty mount points for those binds. That
    /tmp is the same for every job, which launch refuses under a shared account unless
    isolation.allow_weak is set (this test has one user; tests/test_e2e_isolation.py makes one
    workdir per job instead)."""
    needed = [b.split(":")[0] for b in python_binds()]
    under_tmp = [p for p in needed if p.startswith(("/tmp/", "/var/tmp/"))]
    if not under_tmp:
        return []
    for p in under_tmp:
        sub = "tmp" if p.startswith("/tmp/") else "var_tmp"
        rel = p[len("/tmp/") :] if sub == "tmp" else p[len("/var/tmp/") :]
        (workdir / sub / rel).mkdir(parents=True, exist_ok=True)
    return ["--workdir", str(workdir)]


def _system_libs_of_prefixes(prefixes: list[str]) -> list[str]:
    """Shared libraries outside the prefixes that their extension modules (and python) need."""
    files = []
    for pre in prefixes:
        for dirpath, _dirs, names in os.walk(pre):
            files += [
                os.path.join(dirpath, n) for n in names if n.endswith(".so") or ".so." in n or n.startswith("python3")
            ]
    libs: set[str] = set()
    for i in range(0, len(files), 200):
        r = subprocess.run(["ldd", *files[i : i + 200]], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if "=> /" in line:
                lib = line.split("=>", 1)[1].split()[0]
                if not any(lib.startswith(p + "/") for p in prefixes):
                    libs.add(lib)
    return sorted(libs)


def build_image(out: Path) -> Path:
    """The tiny sandbox + system libraries for the bound Python, as a SIF."""
    spec = importlib.util.spec_from_file_location("tiny_build", REPO / "singularity" / "tiny" / "build.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)  # type: ignore[union-attr]
    sb = out.parent / "sandbox"
    tiny.make_sandbox(str(sb), False, tiny.base_python())
    prefixes = [b.split(":")[0] for b in python_binds()]
    for lib in _system_libs_of_prefixes(prefixes):
        tiny.copy_into(str(sb), lib)
        tiny.copy_into(str(sb), os.path.realpath(lib))
    for p in prefixes:  # bind destinations exist in the image
        os.makedirs(str(sb) + p, exist_ok=True)
    subprocess.run(
        ["apptainer", "-s", "build", "--force", str(out), str(sb)], check=True, capture_output=True, timeout=300
    )
    shutil.rmtree(sb, ignore_errors=True)
    return out


def make_images() -> tuple[subprocess.CompletedProcess[str], float]:
    """``make images`` (cpu.sif) with this interpreter's pip; its result and duration."""
    t0 = time.monotonic()
    r = subprocess.run(
        ["make", "-s", "images", f"PYTHON={sys.executable}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return r, time.monotonic() - t0


def build_shipped_image(pytestconfig: pytest.Config) -> dict[str, object]:
    """``make images``, for a session fixture: skipped (with the script's reason) when a
    prerequisite such as root/fakeroot is missing, failed on any other error. The duration and
    whether the image was built or found in the cache are written to the terminal. Returns the
    build's output, its duration in seconds and whether it was a cold build."""
    ensure_apptainer()
    r, seconds = make_images()
    out = r.stdout + r.stderr
    missing = [line for line in out.splitlines() if line.startswith("build-images: missing prerequisite:")]
    if r.returncode != 0 and missing:
        pytest.skip(missing[0])
    assert r.returncode == 0, f"make images failed ({r.returncode}):\n{out[-6000:]}"
    cold = "image cpu: built" in out
    line = (
        f"make images: cpu.sif {CPU_SIF.stat().st_size / 2**20:.0f} MiB, "
        f"{'built' if cold else 'cached'} in {seconds:.1f} s"
        + ("" if cold else " (stages reused from the cache; IMAGES_REFRESH=1 for a cold build)")
    )
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{line}")
    print(line)
    return {"output": out, "seconds": seconds, "cold": cold}
