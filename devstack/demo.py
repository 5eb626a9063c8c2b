"""The local demo (``make demo``, i.e. ``python -m devstack``): a :class:`~devstack.stack.Stack`
served for a person until Ctrl-C.

The three services run as child processes in ``./demo-state`` (``DEMO_STATE``) and the hub
answers on http://127.0.0.1:8000 (``DEMO_PORT``) with the shared-password authenticator (password
from ``DEMO_PASSWORD``, else generated and printed). Spawned notebooks run as local "batch jobs"
through the node agent and the broker's tunnel; ``BACKEND=slurm`` runs them as jobs of the
project's single-node Slurm instead (``scripts/slurm.sh start``, which needs root).

Exit status: 0 after a clean stop (SIGINT/SIGTERM, or a service exiting on its own), 1 if the
stack did not start, 2 for a bad ``BACKEND``.
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

from .stack import Stack

DEMO_SLURM_JOB_NAME = "jupyterhub-demo"


def slurm_demo_settings(workdir: str) -> dict[str, Any] | None:
    """Bring up the project's single-node Slurm (scripts/slurm.sh start) and configure the hub for it."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "slurm.sh")
    print("Starting the single-node Slurm (scripts/slurm.sh start; installs it with apt if needed) ...", flush=True)
    r = subprocess.run(["bash", script, "start"])
    if r.returncode != 0:
        print("demo: scripts/slurm.sh start failed (it needs root on Debian/Ubuntu)", file=sys.stderr)
        return None
    out_dir = os.path.join(os.path.abspath(workdir), "slurm-out")
    os.makedirs(out_dir, exist_ok=True)
    os.chmod(out_dir, 0o1777)
    return {
        "spawner_class": "hub_plugin.slurm.SlurmBrokerSpawner",
        "extra_hub_config": f"c.SlurmBrokerSpawner.req_output_dir = {out_dir!r}\n"
        f"c.SlurmBrokerSpawner.req_job_name = {DEMO_SLURM_JOB_NAME!r}\n",
    }


def main() -> int:
    workdir = os.environ.get("DEMO_STATE", "demo-state")
    password = os.environ.get("DEMO_PASSWORD") or secrets.token_urlsafe(9)
    port = int(os.environ.get("DEMO_PORT", "8000"))
    backend = os.environ.get("BACKEND", "local") or "local"
    if backend not in ("local", "slurm"):
        print(f"demo: BACKEND must be 'local' or 'slurm', got {backend!r}", file=sys.stderr)
        return 2
    kwargs: dict[str, Any] = {}
    if backend == "slurm":
        settings = slurm_demo_settings(workdir)
        if settings is None:
            return 1
        kwargs = settings
    stack = Stack(workdir, public_port=port, password=password, **kwargs)
    print(f"Starting the demo in {stack.workdir} (logs in {stack.logs}) ...", flush=True)
    try:
        stack.start()
    except Exception as exc:
        print(f"demo: failed to start: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    print(
        textwrap.dedent(f"""
        JupyterHub is up: {stack.public_url}/
          log in with any user name and the password: {password}
          press Start: the notebook runs as a {"Slurm" if stack.spawner_class.endswith("SlurmBrokerSpawner") else "local batch"} job behind the broker's tunnel.
          live tunnels:  cd {os.path.relpath(stack.workdir)} && broker status
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
