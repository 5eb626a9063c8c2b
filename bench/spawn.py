"""Part 2: spawn-to-ready on the local backend, against JupyterHub's stock LocalProcessSpawner.

Each run: POST /users/NAME/server through the hub's REST API, poll the user model every 0.1 s
until the hub reports the server ``ready``, then stop it and wait until it is gone.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from jupyterhub.utils import url_escape_path

from devstack.stack import Stack

from .procs import bin_path, http_json


def _api(stack: Stack, path: str, method: str = "GET") -> tuple[int, Any]:
    return http_json(stack.hub_api_url + path, stack.admin_token, method, scheme="token", timeout=30)


def spawn_once(stack: Stack, user: str, timeout: float = 120) -> float:
    upath = f"/users/{url_escape_path(user)}"
    status, _ = _api(stack, upath)
    if status == 404:
        status, body = _api(stack, upath, "POST")
        if status != 201:
            raise RuntimeError(f"create user: {status} {body}")
    t0 = time.monotonic()
    status, body = _api(stack, upath + "/server", "POST")
    if status not in (201, 202):
        raise RuntimeError(f"spawn: {status} {body}")
    while time.monotonic() - t0 < timeout:
        _, info = _api(stack, upath)
        server = info.get("servers", {}).get("", {}) if isinstance(info, dict) else {}
        if server.get("ready"):
            return time.monotonic() - t0
        if not server and time.monotonic() - t0 > 5:
            raise RuntimeError(f"spawn failed; hub log tail:\n{stack.log_text('hub')[-2000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"spawn not ready within {timeout}s")


def stop_once(stack: Stack, user: str, timeout: float = 60) -> None:
    upath = f"/users/{url_escape_path(user)}"
    status, body = _api(stack, upath + "/server", "DELETE")
    if status not in (202, 204):
        raise RuntimeError(f"stop: {status} {body}")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        _, info = _api(stack, upath)
        if isinstance(info, dict) and not info.get("servers"):
            return
        time.sleep(0.1)
    raise TimeoutError("server did not stop")


def _start_stack(workdir: str, log: Callable[[str], None], **stack_kw: Any) -> Stack:
    for attempt in range(3):  # free_port() races with other processes on a shared machine
        stack = Stack(os.path.join(workdir, f"try{attempt}") if attempt else workdir, **stack_kw)
        try:
            stack.start()
            break
        except (RuntimeError, TimeoutError) as exc:
            stack.stop()
            if attempt == 2:
                raise
            log(f"  stack did not start ({exc}); retrying with new ports")
    return stack


def _figures(times: list[float]) -> dict[str, Any]:
    return {"runs_s": times, "median_s": round(statistics.median(times), 3), "min_s": min(times), "max_s": max(times)}


def bench_spawner(workdir: str, n: int, user: str, log: Callable[[str], None], **stack_kw: Any) -> dict[str, Any]:
    times: list[float] = []
    stack = _start_stack(workdir, log, **stack_kw)
    try:
        for i in range(n):
            dt = spawn_once(stack, user)
            times.append(round(dt, 3))
            log(f"  spawn {i + 1}/{n}: {dt:.2f} s")
            stop_once(stack, user)
    finally:
        stack.stop()
    return _figures(times)


def bench_interleaved(
    spawners: dict[str, tuple[str, dict[str, Any]]], n: int, user: str, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Both (all) hubs up at once; round r spawns with each in turn, rotating who goes first, so
    drift in machine load hits every spawner alike. *spawners*: name -> (workdir, Stack kwargs)."""
    stacks: dict[str, Stack] = {}
    times: dict[str, list[float]] = {name: [] for name in spawners}
    try:
        for name, (workdir, kw) in spawners.items():
            stacks[name] = _start_stack(workdir, log, **kw)
        names = list(spawners)
        for r in range(n):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                dt = spawn_once(stacks[name], user)
                times[name].append(round(dt, 3))
                stop_once(stacks[name], user)
            log(f"  round {r + 1}/{n}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        for stack in stacks.values():
            stack.stop()
    return {name: _figures(t) for name, t in times.items()}


def run(tmp: str, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    import pwd

    # LocalProcessSpawner runs the server as the hub user's unix account: use our own account for both
    user = pwd.getpwuid(os.getuid()).pw_name
    log("spawn-to-ready: broker spawner (local backend)")
    ours = bench_spawner(os.path.join(tmp, "stack-broker"), n, user, log)
    log("spawn-to-ready: JupyterHub LocalProcessSpawner")
    extra = f"c.Spawner.cmd = [{bin_path('jupyterhub-singleuser')!r}]\n"
    stock = bench_spawner(
        os.path.join(tmp, "stack-localprocess"),
        n,
        user,
        log,
        spawner_class="jupyterhub.spawner.LocalProcessSpawner",
        extra_hub_config=extra,
    )
    return {"user": user, "broker_local": ours, "localprocess": stock}
