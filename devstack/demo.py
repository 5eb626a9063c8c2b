"""The local demo (``make demo``, i.e. ``python -m devstack``): a :class:`~devstack.stack.Stack`
served for a person until Ctrl-C.

The three services run as child processes in ``./demo-state`` (``DEMO_STATE``) and the hub
answers on http://127.0.0.1:8000 (``DEMO_PORT``) with the shared-password authenticator (password
from ``DEMO_PASSWORD``, else generated and printed). Spawned notebooks run as local "batch jobs"
through the node agent and the broker's tunnel; ``BACKEND=slurm`` runs them as jobs of the
project's single-node Slurm instead (``scripts/slurm.sh start``, which needs root),
``BACKEND=sge`` as jobs of the project's single-host Grid Engine cell (``scripts/sge.sh start``,
root too); ``PROXY=traefik`` puts Traefik (jupyterhub-traefik-proxy's file provider) in front
instead of configurable-http-proxy.

Exit status: 0 after a clean stop (SIGINT/SIGTERM, or a service exiting on its own), 1 if the
stack did not start, 2 for a bad ``BACKEND`` or ``PROXY``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

from .stack import PROXIES, Stack

DEMO_SLURM_JOB_NAME = "jupyterhub-demo"


def _scheduler_settings(workdir: str, script: str, what: str, spawner: str, out: str) -> dict[str, Any] | None:
    """Bring up one of the project's schedulers (``scripts/<script> start``, which installs it with
    apt if needed) and configure the hub's *spawner* for it, job output in ``<workdir>/<out>``."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", script)
    print(f"Starting the {what} (scripts/{script} start; installs it with apt if needed) ...", flush=True)
    if subprocess.run(["bash", path, "start"]).returncode != 0:
        print(f"demo: scripts/{script} start failed (it needs root on Debian/Ubuntu)", file=sys.stderr)
        return None
    out_dir = os.path.join(os.path.abspath(workdir), out)
    os.makedirs(out_dir, exist_ok=True)
    os.chmod(out_dir, 0o1777)
    cls = spawner.rsplit(".", 1)[1]
    return {
        "spawner_class": spawner,
        "extra_hub_config": f"c.{cls}.req_output_dir = {out_dir!r}\nc.{cls}.req_job_name = {DEMO_SLURM_JOB_NAME!r}\n",
    }


def slurm_demo_settings(workdir: str) -> dict[str, Any] | None:
    """The project's single-node Slurm (scripts/slurm.sh start) and the hub configured for it."""
    return _scheduler_settings(
        workdir, "slurm.sh", "single-node Slurm", "hub_plugin.slurm.SlurmBrokerSpawner", "slurm-out"
    )


def sge_demo_settings(workdir: str) -> dict[str, Any] | None:
    """The project's single-host Grid Engine cell (scripts/sge.sh start) and the hub configured for it."""
    return _scheduler_settings(
        workdir, "sge.sh", "single-host Grid Engine", "hub_plugin.gridengine.GridEngineBrokerSpawner", "sge-out"
    )


#: BACKEND -> (settings for the Stack, or None if the scheduler did not start; what a job is called)
BACKENDS = {"slurm": (slurm_demo_settings, "Slurm"), "sge": (sge_demo_settings, "Grid Engine")}


def main() -> int:
    workdir = os.environ.get("DEMO_STATE", "demo-state")
    password = os.environ.get("DEMO_PASSWORD") or secrets.token_urlsafe(9)
    port = int(os.environ.get("DEMO_PORT", "8000"))
    backend = os.environ.get("BACKEND", "local") or "local"
    if backend not in ("local", *BACKENDS):
        print(f"demo: BACKEND must be 'local', 'slurm' or 'sge', got {backend!r}", file=sys.stderr)
        return 2
    proxy = os.environ.get("PROXY", "chp") or "chp"
    if proxy not in PROXIES:
        print(f"demo: PROXY must be one of {', '.join(PROXIES)}, got {proxy!r}", file=sys.stderr)
        return 2
    kwargs: dict[str, Any] = {"proxy": proxy}
    job_kind = "local batch"
    if backend in BACKENDS:
        make_settings, job_kind = BACKENDS[backend]
        settings = make_settings(workdir)
        if settings is None:
            return 1
        kwargs.update(settings)
    stack = Stack(workdir, public_port=port, password=password, **kwargs)
    print(f"Starting the demo in {stack.workdir} (logs in {stack.logs}) ...", flush=True)
    try:
        stack.start()
    except Exception as exc:
        print(f"demo: failed to start: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    # `broker status` from where the demo was started (the project root with `make demo`), too
    here = stack.write_broker_config(os.getcwd())
    status_hint = f"cd {os.path.relpath(stack.workdir)} && broker status"
    if here:
        status_hint = f"broker status   (or: {status_hint})"
    print(
        textwrap.dedent(f"""
        JupyterHub is up: {stack.public_url}/
          log in with any user name and the password: {password}
          press Start: the notebook runs as a {job_kind} job behind the broker's tunnel.
          live tunnels:  {status_hint}
        Ctrl-C stops everything.
        """),
        flush=True,
    )
    stopping = {"now": False}

    def _stop(*_: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping["now"]:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    print(f"demo: {name} exited ({proc.returncode}); see {stack.logs}/{name}.log", file=sys.stderr)
                    stopping["now"] = True
            time.sleep(0.5)
    finally:
        print("Stopping ...", flush=True)
        stack.stop()
        if backend == "slurm":  # the demo's notebooks end with it
            subprocess.run(["scancel", "--name", DEMO_SLURM_JOB_NAME], capture_output=True)
        if backend == "sge":  # qdel takes job names too
            subprocess.run(["qdel", DEMO_SLURM_JOB_NAME], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
