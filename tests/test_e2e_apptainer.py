"""End to end with a REAL Apptainer container: hub + CHP + broker + ``node-agent launch`` with
``container.enabled = true``, an overlay and ``contain = "contain-pid"``; the node agent and
``jupyterhub-singleuser`` (and the notebook's kernel) run INSIDE the container.

The image (cheapest honest way, built in ~10 s): ``singularity/tiny/build.py``'s sandbox (sh,
coreutils basics, the host's python3 + standard library and shared libraries), plus every
system shared library that any extension module of the test's Python needs (found with ``ldd``),
turned into a SIF with ``apptainer build``. The Python environment that runs this test
(``sys.prefix``, its base interpreter ``sys.base_prefix`` and the project checkout, which is
installed editable) is *not* copied: it is bound read-only at the same paths through the HPC
config's ``container.binds`` - the way a site binds ``/opt/sw`` - and ``PATH`` inside the
container is set with ``container.extra_args = ["--env", "PATH=..."]`` (Apptainer does not pass
the host's PATH into the container). So the processes run in the container's mount and PID
namespaces, on its root file system, with its private /tmp, its ``--home`` bind and its overlay.

What it proves: spawn -> 200 through CHP -> a kernel reports the container's marker file
(``/etc/tiny-image``, which does not exist on the host), ``/.singularity.d`` and
``APPTAINER_CONTAINER``, a PID namespace, and writes a file into ``~`` and one into the overlay
(``/opt``) -> stop -> spawn again -> both files are still there (read via the kernel) -> stop.
"""

from __future__ import annotations

import ast
import json
import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import node_agent
from hub_plugin.demo import Stack

from conftest import tool_path
from e2e import Hub

pytestmark = [pytest.mark.e2e, pytest.mark.apptainer, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parent.parent
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(node_agent.__file__)))


def ensure_apptainer() -> None:
    """Install Apptainer as root with the project's script if missing; skip if that fails."""
    if shutil.which("apptainer") is None and os.geteuid() == 0 and \
            os.environ.get("NODE_AGENT_TEST_INSTALL_APPTAINER", "1") == "1":
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(REPO / "scripts" / "install-apptainer.sh")],
                           capture_output=True, text=True, timeout=900)
        print(f"install-apptainer.sh: exit {r.returncode} in {time.monotonic() - t0:.1f}s")
        if r.returncode != 0:
            pytest.skip(f"scripts/install-apptainer.sh failed (exit {r.returncode}): "
                        f"{r.stderr.strip()[-300:]}")
    if shutil.which("apptainer") is None:
        pytest.skip("apptainer is not installed and could not be installed "
                    "(run scripts/install-apptainer.sh as root)")
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
        rel = p[len("/tmp/"):] if sub == "tmp" else p[len("/var/tmp/"):]
        (workdir / sub / rel).mkdir(parents=True, exist_ok=True)
    return ["--workdir", str(workdir)]


def _system_libs_of_prefixes(prefixes: list[str]) -> list[str]:
    """Shared libraries outside the prefixes that their extension modules (and python) need."""
    files = []
    for pre in prefixes:
        for dirpath, _dirs, names in os.walk(pre):
            files += [os.path.join(dirpath, n) for n in names
                      if n.endswith(".so") or ".so." in n or n.startswith("python3")]
    libs: set[str] = set()
    for i in range(0, len(files), 200):
        r = subprocess.run(["ldd", *files[i:i + 200]], capture_output=True, text=True)
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
    subprocess.run(["apptainer", "-s", "build", "--force", str(out), str(sb)], check=True,
                   capture_output=True, timeout=300)
    shutil.rmtree(sb, ignore_errors=True)
    return out


HPC_CONFIG = """
[storage]
scratch_dir = "{scratch}"

[logging]
enabled = true
debug = true

[overlay]
enabled = true
size = "64M"

[container]
enabled = true
image = "{image}"
contain = "contain-pid"
home = "/home/jovyan"
binds = {binds}
extra_args = ["--env", "PATH={bindir}:/usr/local/bin:/usr/bin:/bin"{workdir}]
inner_command = ["{bindir}/node-agent", "run"]
{isolation}"""


@pytest.fixture(scope="module")
def apptainer_stack(tmp_path_factory):
    ensure_apptainer()
    os.environ["PATH"] = tool_path()
    work = tmp_path_factory.mktemp("apptainer-e2e")
    t0 = time.monotonic()
    image = build_image(work / "image" / "notebook.sif")
    build_s = time.monotonic() - t0
    print(f"image {image} ({image.stat().st_size / 1e6:.0f} MB) built in {build_s:.1f}s")
    scratch = work / "scratch"
    scratch.mkdir()
    config = work / "hpc-config.toml"
    binds = "[" + ", ".join(f'"{b}"' for b in python_binds()) + "]"
    workdir = tmp_bind_workdir(work / "container-workdir")
    config.write_text(HPC_CONFIG.format(scratch=scratch, image=image, binds=binds,
                                        bindir=os.path.dirname(sys.executable),
                                        workdir="".join(f', "{a}"' for a in workdir),
                                        isolation="[isolation]\nallow_weak = true\n" if workdir else ""))
    s = Stack(str(work / "stack"), extra_hub_config=(
        f"c.BrokerSpawnerMixin.agent_command = 'node-agent launch --config {config} --'\n"
        "c.BrokerSpawnerMixin.broker_wait_interval = 0.5\n"
        # the host's notebook dir does not exist in the container: serve the container home
        "c.Spawner.notebook_dir = '/home/jovyan'\n"
        # the job imports the checkout under test (bound below), not only the venv's install
        f"c.Spawner.environment = {{'PYTHONPATH': {PKG_ROOT!r}}}\n"))
    s.scratch = str(scratch)
    s.image_build_seconds = build_s
    try:
        yield s.start()
    finally:
        s.stop()


PROBE = r"""
import json, os
proof = {
    "marker": open('/etc/tiny-image').read().strip() if os.path.exists('/etc/tiny-image') else None,
    "singularity_d": os.path.isdir('/.singularity.d'),
    "apptainer_container": os.environ.get('APPTAINER_CONTAINER'),
    "home": os.path.expanduser('~'),
    "pid1": open('/proc/1/cmdline', 'rb').read().split(b'\0')[0].decode(),
}
open(os.path.expanduser('~/persist.txt'), 'w').write(TOKEN)
open('/opt/overlay-proof.txt', 'w').write(TOKEN)
json.dumps(proof)
"""

READ_BACK = r"""
import json, os
json.dumps({"home": open(os.path.expanduser('~/persist.txt')).read(),
            "overlay": open('/opt/overlay-proof.txt').read(),
            "marker": os.path.exists('/etc/tiny-image')})
"""


def test_notebook_runs_inside_apptainer_and_home_persists(apptainer_stack):
    hub = Hub(apptainer_stack)
    user = "anna"
    token = secrets.token_hex(8)
    t0 = time.monotonic()
    spawn1 = hub.spawn(user, timeout=150)
    status, _ = hub.through_proxy(user, "api/status")
    assert status == 200
    _, text = hub.run_code(user, f"TOKEN = {token!r}\n" + PROBE, timeout=90)
    proof = json.loads(ast.literal_eval(text))
    assert proof["marker"] == "built by singularity/tiny/build.py", proof  # the image's own file
    assert not os.path.exists("/etc/tiny-image")  # ... which the host does not have
    assert proof["singularity_d"] and proof["apptainer_container"], proof
    assert proof["home"] == "/home/jovyan", proof
    host_pid1 = open("/proc/1/cmdline", "rb").read().split(b"\0")[0].decode()
    assert proof["pid1"] != host_pid1, (proof, host_pid1)  # own PID namespace (--pid)
    host_home = Path(apptainer_stack.scratch) / "homes" / user
    assert (host_home / "persist.txt").read_text() == token
    hub.stop(user)

    spawn2 = hub.spawn(user, timeout=150)
    _, text = hub.run_code(user, READ_BACK, timeout=90)
    back = json.loads(ast.literal_eval(text))
    assert back == {"home": token, "overlay": token, "marker": True}, back
    hub.stop(user)
    logs = "".join(p.read_text(errors="replace")
                   for p in (Path(apptainer_stack.scratch) / "log").iterdir())
    assert "starting apptainer" in logs and "read-only" not in logs
    assert (Path(apptainer_stack.scratch) / "overlays" / f"{user}.img").is_file()
    print(f"inside: {proof}")
    print(f"image build {apptainer_stack.image_build_seconds:.1f}s, spawn1 {spawn1:.1f}s, "
          f"spawn2 {spawn2:.1f}s, whole test {time.monotonic() - t0:.1f}s")
