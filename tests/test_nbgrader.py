"""nbgrader through the container: the exchange directory from the HPC config's ``[nbgrader]``
options is bound into a student's Apptainer container, together with
``examples/nbgrader_config.py``.

The container is started with exactly the argv ``node_agent.launch.build_container_argv``
builds (``apptainer exec --contain --pid --home ... --bind EXCHANGE:/srv/nbgrader/exchange:rw
--bind CONFIG:/etc/jupyter/nbgrader_config.py:ro ... IMAGE CMD``) - no hub stack is needed to
test the file flow. The image is tests/apptainer_image.py's (tiny SIF + the test's
Python bound read-only at the same path).

* ``test_exchange_files_through_container``: nbgrader's on-disk layout by hand, no nbgrader
  needed: a file released in ``exchange/<course>/outbound/<assignment>/`` is readable in the
  container; a submission copied in the container to
  ``exchange/<course>/inbound/<student>+<assignment>+<timestamp>/`` appears on the host.
* ``test_real_nbgrader_release_fetch_submit_collect``: REAL nbgrader (0.9.x). nbgrader and the
  five packages it adds to this project's environment are pip-installed with ``--target`` into a
  per-session directory (measured ~4 s, 61 MB; the shared venv is not touched) and bound into the
  container read-only with ``PYTHONPATH``. Instructor on the host: ``generate_assignment`` +
  ``release_assignment``; student in the container: ``list``, ``fetch_assignment``, edit,
  ``submit``; instructor on the host: ``collect`` finds the student's submission. Skipped with
  the pip error if nbgrader cannot be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_agent import hpc_config as hc
from node_agent import launch as la

from apptainer_image import REPO, build_image, ensure_apptainer, python_binds, tmp_bind_workdir

pytestmark = [pytest.mark.apptainer, pytest.mark.timeout(400)]

COURSE = "cs101"
ASSIGNMENT = "ps1"
NBGRADER_PACKAGES = [
    "nbgrader",
    "ipywidgets",
    "notebook",
    "rapidfuzz",
    "jupyterlab_widgets",
    "widgetsnbextension",
]  # what `pip install nbgrader` adds to this project's venv


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    ensure_apptainer()
    t0 = time.monotonic()
    img = build_image(tmp_path_factory.mktemp("nbg-image") / "notebook.sif")
    print(f"image built in {time.monotonic() - t0:.1f}s")
    return img


@pytest.fixture(scope="module")
def nbgrader_dir(tmp_path_factory):
    target = tmp_path_factory.mktemp("nbgrader-pkgs")
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(target),
            *NBGRADER_PACKAGES,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        pytest.skip(f"pip install nbgrader failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    print(f"nbgrader installed with pip --target in {time.monotonic() - t0:.1f}s")
    return target


def make_config(tmp_path: Path, image: Path, extra_binds: list[str] = (), env: dict | None = None):
    scratch = tmp_path / "scratch"
    exchange = scratch / "nbgrader-exchange"
    exchange.mkdir(parents=True)
    exchange.chmod(0o777)  # as nbgrader's docs ask: every student writes below it
    config_file = scratch / "nbgrader_config.py"
    config_file.write_text((REPO / "examples" / "nbgrader_config.py").read_text())
    extra_env = ["--env", f"PATH={os.path.dirname(sys.executable)}:/usr/bin:/bin"]
    for k, v in (env or {}).items():
        extra_env += ["--env", f"{k}={v}"]
    extra_env += tmp_bind_workdir(tmp_path / "container-workdir")
    cfg = hc.config_from_dict(
        {
            "storage": {"scratch_dir": str(scratch)},
            "overlay": {"enabled": False},
            "container": {
                "image": str(image),
                "contain": "contain-pid",
                "binds": python_binds() + list(extra_binds),
                "extra_args": extra_env,
                "inner_command": [],
            },
            "nbgrader": {
                "exchange_dir": "{scratch_dir}/nbgrader-exchange",
                "exchange_mount": "/srv/nbgrader/exchange",
                "config_file": "{scratch_dir}/nbgrader_config.py",
            },
        }
    )
    return cfg, scratch, exchange


def in_container(cfg: hc.HpcConfig, user: str, argv: list[str], timeout: float = 120):
    """Run argv in the user's container, with the argv `node-agent launch` would exec."""
    paths = cfg.user_paths(user)
    os.makedirs(paths.home, mode=0o700, exist_ok=True)
    full = la.build_container_argv(cfg, user, False, argv, path_exists=os.path.exists)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NODE_AGENT_"))}
    env["JUPYTERHUB_USER"] = user  # set by the spawner in every real job
    r = subprocess.run(full, env=env, capture_output=True, text=True, timeout=timeout)
    return full, r


def test_exchange_files_through_container(tmp_path, image):
    cfg, scratch, exchange = make_config(tmp_path, image)
    outbound = exchange / COURSE / "outbound" / ASSIGNMENT
    outbound.mkdir(parents=True)
    (outbound / "problem1.ipynb").write_text('{"released": "by the instructor"}')
    inbound = exchange / COURSE / "inbound"
    inbound.mkdir()
    inbound.chmod(0o2733)  # nbgrader's mode: students can write, not list
    script = f"""
set -e
ex=/srv/nbgrader/exchange/{COURSE}
test -f /etc/tiny-image                      # we are in the image
cat /etc/jupyter/nbgrader_config.py | grep -q 'Exchange.root = "/srv/nbgrader/exchange"'
mkdir -p ~/{COURSE} && cp -r $ex/outbound/{ASSIGNMENT} ~/{COURSE}/
cat ~/{COURSE}/{ASSIGNMENT}/problem1.ipynb
echo '{{"answer": 42}}' > ~/{COURSE}/{ASSIGNMENT}/problem1.ipynb
sub="$ex/inbound/$JUPYTERHUB_USER+{ASSIGNMENT}+2025-01-01 10:00:00.000000 UTC"
mkdir "$sub" && cp ~/{COURSE}/{ASSIGNMENT}/* "$sub/"
echo "2025-01-01 10:00:00.000000 UTC" > "$sub/timestamp.txt"
! echo x > /etc/jupyter/nbgrader_config.py 2>/dev/null   # the config is read-only
"""
    argv, r = in_container(cfg, "stud1", ["/bin/sh", "-c", script])
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "--bind" in argv and f"{exchange}:/srv/nbgrader/exchange:rw" in argv
    assert f"{scratch}/nbgrader_config.py:/etc/jupyter/nbgrader_config.py:ro" in argv
    assert '"released": "by the instructor"' in r.stdout
    subs = list(inbound.iterdir())
    assert [s.name for s in subs] == [f"stud1+{ASSIGNMENT}+2025-01-01 10:00:00.000000 UTC"]
    assert json.loads((subs[0] / "problem1.ipynb").read_text()) == {"answer": 42}
    # the fetched copy lives in the student's home on the host
    assert (scratch / "homes" / "stud1" / COURSE / ASSIGNMENT / "problem1.ipynb").exists()


SOURCE_NB = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "answer-cell",
            "outputs": [],
            "metadata": {
                "nbgrader": {
                    "grade": False,
                    "grade_id": "answer",
                    "locked": False,
                    "schema_version": 3,
                    "solution": True,
                    "task": False,
                }
            },
            "source": ["### BEGIN SOLUTION\n", "answer = 42\n", "### END SOLUTION"],
        }
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def nbgrader_host(args: list[str], course_root: Path, pkgs: Path, exchange: Path):
    env = dict(
        os.environ, PYTHONPATH=str(pkgs), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    env.pop("JUPYTERHUB_USER", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbgrader",
            *args,
            f"--course={COURSE}",
            f"--CourseDirectory.root={course_root}",
            f"--Exchange.root={exchange}",
        ],
        cwd=course_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"nbgrader {args}: {r.stderr[-2000:]}"
    return r


def test_real_nbgrader_release_fetch_submit_collect(tmp_path, image, nbgrader_dir):
    t0 = time.monotonic()
    pkgs = str(nbgrader_dir)
    cfg, scratch, exchange = make_config(tmp_path, image, extra_binds=[f"{pkgs}:{pkgs}:ro"], env={"PYTHONPATH": pkgs})
    # instructor, on the host: generate + release with real nbgrader
    course = tmp_path / "course"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    (course / "source" / ASSIGNMENT / "problem1.ipynb").write_text(json.dumps(SOURCE_NB))
    nbgrader_host(["generate_assignment", ASSIGNMENT], course, nbgrader_dir, exchange)
    nbgrader_host(["release_assignment", ASSIGNMENT], course, nbgrader_dir, exchange)
    released = exchange / COURSE / "outbound" / ASSIGNMENT / "problem1.ipynb"
    assert "answer = 42" not in released.read_text()  # the solution was stripped
    t_release = time.monotonic() - t0

    # student, in the container: list, fetch, answer, submit (config from the bound file)
    py = sys.executable
    nb = f"~/{COURSE}/{ASSIGNMENT}/problem1.ipynb"
    script = f"""
set -e
test -f /etc/tiny-image
cd ~
{py} -m nbgrader list --course {COURSE} 2>&1
{py} -m nbgrader fetch_assignment {ASSIGNMENT} --course {COURSE} 2>&1
{py} - <<'EOF'
import json, os
p = os.path.expanduser("{nb}")
nb = json.load(open(p))
nb["cells"][0]["source"] = "answer = 41 + 1  # student's answer"
json.dump(nb, open(p, "w"))
EOF
{py} -m nbgrader submit {ASSIGNMENT} --course {COURSE} 2>&1
{py} -m nbgrader list --inbound --course {COURSE} 2>&1 || true
"""
    t1 = time.monotonic()
    _, r = in_container(cfg, "stud1", ["/bin/sh", "-c", script], timeout=180)
    t_student = time.monotonic() - t1
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
    assert f"{COURSE} {ASSIGNMENT}" in r.stdout  # listed as released
    assert "/srv/nbgrader/exchange" in r.stdout  # the exchange root came from the bound config
    home = scratch / "homes" / "stud1"
    assert (home / COURSE / ASSIGNMENT / "problem1.ipynb").exists()
    subs = list((exchange / COURSE / "inbound").iterdir())
    assert len(subs) == 1 and subs[0].name.startswith(f"stud1+{ASSIGNMENT}+"), subs
    assert "student's answer" in (subs[0] / "problem1.ipynb").read_text()
    assert (subs[0] / "timestamp.txt").exists()

    # instructor, on the host: collect finds the submission
    nbgrader_host(["collect", ASSIGNMENT], course, nbgrader_dir, exchange)
    collected = course / "submitted" / "stud1" / ASSIGNMENT / "problem1.ipynb"
    assert "student's answer" in collected.read_text()
    print(
        f"instructor generate+release {t_release:.1f}s, student list+fetch+submit in the "
        f"container {t_student:.1f}s, total {time.monotonic() - t0:.1f}s"
    )
