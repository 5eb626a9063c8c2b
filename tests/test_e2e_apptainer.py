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
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from apptainer_image import PKG_ROOT, build_image, ensure_apptainer, python_binds, tmp_bind_workdir
from e2e import Hub, launch_hub_config
from harness import running_stack, tool_path

pytestmark = [pytest.mark.e2e, pytest.mark.apptainer, pytest.mark.timeout(400)]


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
    config.write_text(
        HPC_CONFIG.format(
            scratch=scratch,
            image=image,
            binds=binds,
            bindir=os.path.dirname(sys.executable),
            workdir="".join(f', "{a}"' for a in workdir),
            isolation="[isolation]\nallow_weak = true\n" if workdir else "",
        )
    )
    with running_stack(
        str(work / "stack"),
        path=tool_path(),
        extra_hub_config=(
            launch_hub_config(config, container_home="/home/jovyan")
            # the job imports the checkout under test (bound below), not only the venv's install
            + f"c.Spawner.environment = {{'PYTHONPATH': {PKG_ROOT!r}}}\n"
        ),
    ) as s:
        s.scratch = str(scratch)
        s.image_build_seconds = build_s
        yield s


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
    logs = "".join(p.read_text(errors="replace") for p in (Path(apptainer_stack.scratch) / "log").iterdir())
    assert "starting apptainer" in logs and "read-only" not in logs
    assert (Path(apptainer_stack.scratch) / "overlays" / f"{user}.img").is_file()
    print(f"inside: {proof}")
    print(
        f"image build {apptainer_stack.image_build_seconds:.1f}s, spawn1 {spawn1:.1f}s, "
        f"spawn2 {spawn2:.1f}s, whole test {time.monotonic() - t0:.1f}s"
    )
