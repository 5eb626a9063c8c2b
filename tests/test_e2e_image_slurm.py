"""End to end into the SHIPPED image on real Slurm: ``singularity/cpu.sif`` built from
``singularity/cpu.def`` by ``make images``, started by ``node-agent launch`` in a Slurm job, with
``node-agent run``, ``jupyterhub-singleuser`` and the kernel all from the image.

Real parts: JupyterHub with ``SlurmBrokerSpawner``, CHP, ``broker serve``, the project's single-node
Slurm, Apptainer, the image as ``make images`` leaves it (cached outside the checkout). The HPC
config runs the container with ``contain = "containall"`` (clean environment, private /tmp, PID
and IPC namespaces) and ``no_mount = ["bind-paths", "cwd"]``: of the host, only the user's home,
the overlay, the job's private runtime directory and the nbgrader exchange (with its config file)
reach the container. No host Python, no checkout: the test asserts it from inside the notebook.

The path: spawn -> ``/api/status`` 200 through CHP -> kernel ``1+1`` -> a file in the home, one in
the overlay and a package ``pip install --user``-ed offline (a wheel made here) -> stop -> the
instructor generates and releases an assignment with the image's nbgrader -> spawn again -> the
three survived -> the student lists, fetches and submits the assignment from the kernel -> stop
-> the instructor collects the submission.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from apptainer_image import CPU_SIF, REPO, build_shipped_image
from e2e import Hub, launch_hub_config
from harness import running_stack, tool_path
from slurm_cluster import hub_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slurm,
    pytest.mark.apptainer,
    pytest.mark.timeout(1800),
    pytest.mark.usefixtures("cancel_leftover_jobs"),
]

USER = "imogen"
COURSE, ASSIGNMENT = "cs101", "ps1"
PROBE_PACKAGE = "hpc_e2e_probe"

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
image = "{scratch}/images/cpu.sif"
contain = "containall"
no_mount = ["bind-paths", "cwd"]
home = "/home/jovyan"
inner_command = ["node-agent", "run"]

[nbgrader]
exchange_dir = "{{scratch_dir}}/nbgrader-exchange"
config_file = "{{scratch_dir}}/nbgrader_config.py"
"""


def probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (one module), made by hand: nothing to download or build."""
    dist_info = f"{PROBE_PACKAGE}-1.0.dist-info"
    files = {
        f"{PROBE_PACKAGE}/__init__.py": "MESSAGE = 'installed with pip --user'\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE_PACKAGE}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{PROBE_PACKAGE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def in_image(image: Path, binds: dict[Path, str], argv: list[str], cwd: str) -> str:
    """*argv* in the image (as the instructor would run it), with only *binds* from the host."""
    flags = [f"--bind={src}:{dst}" for src, dst in binds.items()]
    r = subprocess.run(
        ["apptainer", "exec", "--containall", "--no-mount", "bind-paths,cwd", *flags, "--pwd", cwd, str(image), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{argv}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def image_stack(pytestconfig, slurm_cluster, tmp_path_factory):
    build = build_shipped_image(pytestconfig)
    work = tmp_path_factory.mktemp("image-slurm")
    scratch = work / "scratch"
    (scratch / "images").mkdir(parents=True)
    image = scratch / "images" / "cpu.sif"  # where a site keeps it, outside any checkout
    try:
        os.link(CPU_SIF, image)
    except OSError:
        shutil.copy(CPU_SIF, image)
    exchange = scratch / "nbgrader-exchange"
    exchange.mkdir()
    exchange.chmod(0o777)
    shutil.copy(REPO / "examples" / "nbgrader_config.py", scratch / "nbgrader_config.py")
    config = work / "hpc-config.toml"
    config.write_text(HPC_CONFIG.format(scratch=scratch))
    workdir = str(work / "stack")
    os.makedirs(workdir)
    with running_stack(
        workdir,
        path=tool_path(),
        logs="e2e-image-slurm-logs",
        poll_interval=1,
        spawner_class="hub_plugin.slurm.SlurmBrokerSpawner",
        extra_hub_config=hub_config(workdir, launch_hub_config(config, container_home="/home/jovyan")),
    ) as s:
        s.scratch = scratch
        s.image = image
        s.build_seconds = build["seconds"]
        yield s


def kernel_json(hub: Hub, code: str, timeout: float = 180) -> dict:
    """Run *code* (ending in a ``json.dumps(...)`` expression) in the user's kernel; its value."""
    _, text = hub.run_code(USER, code, timeout=timeout)
    return json.loads(ast.literal_eval(text))


FIRST_SESSION = r"""
import base64, json, os, subprocess, sys, tempfile
import node_agent
wheel = os.path.join(tempfile.gettempdir(), WHEEL_NAME)
open(wheel, "wb").write(base64.b64decode(WHEEL))
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--user", "--no-index", "--no-deps",
                      "--disable-pip-version-check", "-q", wheel], capture_output=True, text=True)
open(os.path.expanduser("~/persist.txt"), "w").write(TOKEN)
open("/opt/overlay-proof.txt", "w").write(TOKEN)
cmdlines = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip())
    except OSError:
        pass
json.dumps({
    "executable": sys.executable, "prefix": sys.prefix, "node_agent": node_agent.__file__,
    "host_paths_visible": [p for p in HOST_PATHS if os.path.exists(p)],
    "agent": [c for c in cmdlines if "node-agent run" in c],
    "mounts": sorted({line.split()[4] for line in open("/proc/self/mountinfo")}),
    "home": os.path.expanduser("~"), "pip": pip.returncode, "pip_err": pip.stderr[-800:],
})
"""

SECOND_SESSION = r"""
import json, os
import hpc_e2e_probe
json.dumps({"home": open(os.path.expanduser("~/persist.txt")).read(),
            "overlay": open("/opt/overlay-proof.txt").read(),
            "package": hpc_e2e_probe.__file__, "message": hpc_e2e_probe.MESSAGE})
"""

STUDENT = r"""
import json, os, subprocess, sys
os.chdir(os.path.expanduser("~"))
def nbgrader(*args):
    r = subprocess.run([sys.executable, "-m", "nbgrader", *args, "--course", COURSE], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr
listed = nbgrader("list")
fetched = nbgrader("fetch_assignment", ASSIGNMENT)
path = os.path.join(COURSE, ASSIGNMENT, "problem1.ipynb")
nb = json.load(open(path))
nb["cells"][0]["source"] = "answer = 41 + 1  # the student's answer"
json.dump(nb, open(path, "w"))
submitted = nbgrader("submit", ASSIGNMENT)
json.dumps({"list": listed, "fetch": fetched, "submit": submitted})
"""


def _assignment_source() -> str:
    """One solution cell, as the instructor writes it (nbgrader strips the solution on release)."""
    cell_meta = {"grade": False, "grade_id": "answer", "locked": False, "schema_version": 3, "solution": True}
    cell = {"cell_type": "code", "execution_count": None, "id": "answer", "outputs": [], "metadata": {}}
    cell["metadata"]["nbgrader"] = {**cell_meta, "task": False}
    cell["source"] = "### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION"
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return json.dumps({"cells": [cell], "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5})


def test_spawn_into_the_shipped_image_on_slurm(image_stack):
    hub = Hub(image_stack)
    scratch: Path = image_stack.scratch
    token = secrets.token_hex(8)
    wheel = probe_wheel(scratch)
    host_paths = sorted({str(REPO), *(os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.executable))})
    t0 = time.monotonic()

    # -- first session: the image's own Python; a file in the home and the overlay, a --user package
    spawn1 = hub.spawn(USER, timeout=300)
    status, body = hub.through_proxy(USER, "api/status")
    assert status == 200, body
    assert hub.run_code(USER, "1+1", timeout=120)[1] == "2"
    code = (
        f"TOKEN = {token!r}\nWHEEL_NAME = {wheel.name!r}\nHOST_PATHS = {host_paths!r}\n"
        f"WHEEL = {base64.b64encode(wheel.read_bytes()).decode()!r}\n" + FIRST_SESSION
    )
    inside = kernel_json(hub, code)
    assert inside["executable"].startswith("/opt/venv/") and inside["prefix"] == "/opt/venv", inside
    assert inside["node_agent"].startswith("/opt/venv/lib/"), inside
    assert inside["host_paths_visible"] == [], inside  # no checkout, no host venv or Python
    assert inside["agent"] and all(a.startswith("/opt/venv/bin/python") for a in inside["agent"]), inside
    assert not any(m.startswith(tuple(host_paths)) for m in inside["mounts"]), inside["mounts"]
    assert inside["home"] == "/home/jovyan"
    assert inside["pip"] == 0, inside["pip_err"]
    session = hub.session_of(USER)
    hub.stop(USER)
    home = scratch / "homes" / USER
    assert (home / "persist.txt").read_text() == token
    assert list((home / ".local" / "lib").glob(f"python3*/site-packages/{PROBE_PACKAGE}/__init__.py"))
    # what launch ran: the image, the home, the overlay and the nbgrader binds; nothing else of the host
    argv = _launch_argv(scratch)
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "--bind"]
    assert binds == [
        f"{scratch}/nbgrader-exchange:/srv/nbgrader/exchange:rw",
        f"{scratch}/nbgrader_config.py:/etc/jupyter/nbgrader_config.py:ro",
    ], argv
    assert argv[argv.index("--home") + 1] == f"{home}:/home/jovyan"
    assert "--containall" in argv and argv[argv.index("--no-mount") + 1] == "bind-paths,cwd"
    assert argv[argv.index("--overlay") + 1] == str(scratch / "overlays" / f"{USER}.img")
    assert str(image_stack.image) in argv and session["job_id"]

    # -- the instructor releases an assignment, with the image's nbgrader
    course = scratch / "course"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    (course / "source" / ASSIGNMENT / "problem1.ipynb").write_text(_assignment_source())
    instructor = {course: "/course", scratch / "nbgrader-exchange": "/srv/nbgrader/exchange"}
    opts = [f"--course={COURSE}", "--CourseDirectory.root=/course", "--Exchange.root=/srv/nbgrader/exchange"]
    for step in ("generate_assignment", "release_assignment"):
        in_image(image_stack.image, instructor, ["nbgrader", step, ASSIGNMENT, *opts], "/course")
    released = scratch / "nbgrader-exchange" / COURSE / "outbound" / ASSIGNMENT / "problem1.ipynb"
    assert "answer = 42" not in released.read_text()

    # -- second session: all three survived; the student fetches and submits from the kernel
    spawn2 = hub.spawn(USER, timeout=300)
    back = kernel_json(hub, SECOND_SESSION)
    assert back["home"] == token and back["overlay"] == token, back
    assert back["package"].startswith("/home/jovyan/.local/lib/python3"), back
    assert back["message"] == "installed with pip --user"
    student = kernel_json(hub, f"COURSE = {COURSE!r}\nASSIGNMENT = {ASSIGNMENT!r}\n" + STUDENT)
    for step in ("list", "fetch", "submit"):
        assert student[step][0] == 0, (step, student[step][1][-2000:])
    assert f"{COURSE} {ASSIGNMENT}" in student["list"][1], student["list"]
    hub.stop(USER)
    inbound = list((scratch / "nbgrader-exchange" / COURSE / "inbound").iterdir())
    assert len(inbound) == 1 and inbound[0].name.startswith(f"{USER}+{ASSIGNMENT}+"), inbound
    assert "the student's answer" in (inbound[0] / "problem1.ipynb").read_text()

    # -- the instructor collects it
    in_image(image_stack.image, instructor, ["nbgrader", "collect", ASSIGNMENT, *opts], "/course")
    assert "the student's answer" in (course / "submitted" / USER / ASSIGNMENT / "problem1.ipynb").read_text()
    print(
        f"\n[image-slurm] make images {image_stack.build_seconds:.0f} s, cpu.sif "
        f"{image_stack.image.stat().st_size / 2**20:.0f} MiB; spawn1 {spawn1:.1f} s, spawn2 {spawn2:.1f} s, "
        f"whole test {time.monotonic() - t0:.0f} s; container mounts: {inside['mounts']}"
    )


def _launch_argv(scratch: Path) -> list[str]:
    """The container argv ``node-agent launch`` logged (``logging.debug``) for the latest job."""
    found: list[str] = []
    for log in sorted((scratch / "log").iterdir()):
        for line in log.read_text(errors="replace").splitlines():
            if "argv: [" in line:
                found = json.loads(line.split("argv: ", 1)[1])
    assert found, "launch logged no argv"
    return found
