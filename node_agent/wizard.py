"""``node-agent wizard``: write the HPC config file (and a jupyterhub_config.py snippet).

Interactive by default: each question shows its default in brackets; Enter keeps it. Defaults
come from the flags, then from what the wizard finds on the cluster (``sinfo`` partitions and GPU
GRES, ``apptainer``/``singularity`` on PATH), then from the config schema.

``--non-interactive`` takes every answer from flags (or the same defaults) and asks nothing.
The result is validated with :mod:`node_agent.hpc_validate` before anything is written; existing
files are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from .hpc_schema import CONTAIN_MODES, OPTIONS, SECTIONS
from .hpc_toml import dump_toml
from .hpc_validate import HpcConfigError, config_from_dict, parse_size

DEFAULT_OUTPUT = "~/.config/node-agent/hpc-config.toml"
NONE_WORDS = {"none", "-", "no"}


@dataclass
class ClusterInfo:
    partitions: list[str] = field(default_factory=list)
    default_partition: str = ""
    gpu_partitions: dict[str, str] = field(default_factory=dict)  # partition -> GRES
    runtimes: dict[str, str] = field(default_factory=dict)  # name -> path
    sinfo_error: str = ""


def inspect_cluster(timeout: float = 15) -> ClusterInfo:
    """What Slurm and the container runtime look like from here (best effort)."""
    info = ClusterInfo()
    for rt in ("apptainer", "singularity"):
        p = shutil.which(rt)
        if p:
            info.runtimes[rt] = p
    sinfo = shutil.which("sinfo")
    if not sinfo:
        info.sinfo_error = "sinfo not found"
        return info
    try:
        r = subprocess.run(
            [sinfo, "-h", "-o", "%P|%G|%a"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        info.sinfo_error = str(e)
        return info
    if r.returncode != 0:
        info.sinfo_error = (r.stderr.strip() or f"exit {r.returncode}")[:200]
        return info
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        name, gres = parts[0], parts[1]
        avail = parts[2] if len(parts) > 2 else "up"
        if name.endswith("*"):
            name = name[:-1]
            info.default_partition = name
        if name not in info.partitions:
            info.partitions.append(name)
        if "gpu" in gres.lower() and avail != "down":
            info.gpu_partitions.setdefault(name, gres)
    return info


# --------------------------------------------------------------------------------------------
# questions


class Asker:
    def __init__(self, interactive: bool, out=sys.stdout):
        self.interactive = interactive
        self.out = out

    def say(self, text: str = "") -> None:
        if self.interactive:
            print(text, file=self.out, flush=True)

    def text(self, prompt: str, default: str, check=None, allow_empty: bool = True) -> str:
        """Ask for a string. Enter keeps the default; 'none' or '-' clears it."""
        if not self.interactive:
            if check:
                check(default)
            return default
        while True:
            shown = default if default else "none"
            try:
                ans = input(f"{prompt} [{shown}]: ").strip()
            except EOFError:
                raise SystemExit("\nnode-agent wizard: input ended; nothing written") from None
            if ans == "":
                ans = default
            elif ans.lower() in NONE_WORDS and allow_empty:
                ans = ""
            if not ans and not allow_empty:
                print("  an answer is required", file=self.out)
                continue
            if check:
                try:
                    check(ans)
                except ValueError as e:
                    print(f"  {e}; try again", file=self.out)
                    continue
            return ans

    def yes_no(self, prompt: str, default: bool) -> bool:
        if not self.interactive:
            return default
        hint = "Y/n" if default else "y/N"
        while True:
            try:
                ans = input(f"{prompt} [{hint}]: ").strip().lower()
            except EOFError:
                raise SystemExit("\nnode-agent wizard: input ended; nothing written") from None
            if ans == "":
                return default
            if ans in ("y", "yes"):
                return True
            if ans in ("n", "no"):
                return False
            print("  please answer y or n", file=self.out)

    def choice(self, prompt: str, choices: tuple[str, ...], default: str) -> str:
        def check(v: str) -> None:
            if v not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}")

        return self.text(f"{prompt} ({'/'.join(choices)})", default, check, allow_empty=False)


def _check_abs(v: str) -> None:
    if v and not os.path.isabs(os.path.expanduser(v)):
        raise ValueError("must be an absolute path (or start with ~)")


def _check_size(v: str) -> None:
    parse_size(v)


def _check_partition(known: list[str]):
    def check(v: str) -> None:
        if v and known and v not in known:
            raise ValueError(f"unknown partition; sinfo shows: {', '.join(known)}")
        if v and not all(c.isalnum() or c in "-_.," for c in v):
            raise ValueError("partition names contain only letters, digits, '-', '_', '.'")

    return check


# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="node-agent wizard", description=__doc__.split("\n\n")[0])
    p.add_argument("--non-interactive", action="store_true", help="ask nothing; use flags/defaults")
    p.add_argument("--output", "-o", default=None, help=f"config file to write ({DEFAULT_OUTPUT})")
    p.add_argument(
        "--hub-snippet",
        default=None,
        help="where to write the jupyterhub_config.py snippet (default: jupyterhub_config_snippet.py next to --output)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--no-inspect", action="store_true", help="do not run sinfo or look for runtimes")
    g = p.add_argument_group("answers")
    g.add_argument("--container", dest="container", action="store_true", default=None)
    g.add_argument(
        "--no-container",
        dest="container",
        action="store_false",
        help="no-container mode (run the server directly on the node)",
    )
    g.add_argument("--runtime", help="apptainer, singularity or an absolute path")
    g.add_argument("--load-command", help="e.g. 'module load apptainer' ('none' for nothing)")
    g.add_argument("--image", help="image for compute nodes (.sif)")
    g.add_argument("--gpu-image", help="image for GPU nodes (.sif)")
    g.add_argument("--container-home", help="home directory inside the container")
    g.add_argument("--contain", choices=tuple(CONTAIN_MODES), help="isolation mode")
    g.add_argument("--scratch-dir", help="base directory for homes, overlays and logs")
    g.add_argument("--create-home", dest="create_home", action="store_true", default=None)
    g.add_argument("--no-create-home", dest="create_home", action="store_false")
    g.add_argument("--overlay", dest="overlay", action="store_true", default=None)
    g.add_argument("--no-overlay", dest="overlay", action="store_false")
    g.add_argument("--overlay-size", help="e.g. 2G")
    g.add_argument("--partition", help="Slurm partition for CPU jobs")
    g.add_argument("--gpu-partition", help="Slurm partition for GPU jobs ('none' for none)")
    g.add_argument("--runtime-limit", help="job wall time, e.g. 8:00:00")
    g.add_argument("--memory", help="job memory, e.g. 4G")
    g.add_argument("--nbgrader-exchange", help="host directory of the nbgrader exchange")
    g.add_argument("--debug", dest="debug", action="store_true", default=None)
    return p


def _nz(v, default):
    return default if v is None else v


def _default(key: str) -> Any:
    """The schema's default of option ``key`` (the wizard's answer when nothing else says)."""
    return OPTIONS[key].default


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    out = os.path.abspath(os.path.expanduser(a.output or DEFAULT_OUTPUT))
    snippet = os.path.abspath(
        os.path.expanduser(a.hub_snippet or os.path.join(os.path.dirname(out), "jupyterhub_config_snippet.py"))
    )
    if not a.force:
        for p in (out, snippet):
            if os.path.exists(p):
                print(
                    f"node-agent wizard: {p} exists; use --force to overwrite it "
                    f"(or --output/--hub-snippet for another path)",
                    file=sys.stderr,
                )
                return 1
    ask = Asker(not a.non_interactive)
    info = ClusterInfo() if a.no_inspect else inspect_cluster()

    ask.say("node-agent wizard: configures how notebook jobs start on this cluster.")
    ask.say("Press Enter to keep the value in brackets; type 'none' to leave a value empty.")
    if not a.no_inspect:
        ask.say(f"  container runtimes found: {', '.join(info.runtimes) or 'none'}")
        if info.partitions:
            ask.say(
                f"  Slurm partitions: {', '.join(info.partitions)} "
                f"(default {info.default_partition or '?'}); "
                f"with GPUs: {', '.join(info.gpu_partitions) or 'none'}"
            )
        else:
            ask.say(f"  Slurm: not available ({info.sinfo_error})")
    ask.say()

    sec: dict[str, dict] = {s: {} for s in SECTIONS}
    # container
    use_container = ask.yes_no(
        "Run notebooks inside an Apptainer/Singularity container?", _nz(a.container, _default("container.enabled"))
    )
    sec["container"]["enabled"] = use_container
    if use_container:
        found = next(iter(info.runtimes), "")
        runtime = ask.text("Container runtime", a.runtime or found or _default("container.runtime"), allow_empty=False)
        sec["container"]["runtime"] = runtime
        load_default = (
            a.load_command
            if a.load_command is not None
            else (
                ""
                if (runtime in info.runtimes or os.path.isabs(runtime) or a.no_inspect)
                else f"module load {os.path.basename(runtime)}"
            )
        )
        if load_default.lower() in NONE_WORDS:
            load_default = ""
        sec["container"]["load_command"] = ask.text(
            "Command that makes the runtime available (e.g. module load apptainer)", load_default
        )
        sec["container"]["image"] = ask.text(
            "Image for compute nodes (.sif)", a.image or "", _check_abs, allow_empty=False
        )
        gpu_default = a.gpu_image or ""
        if info.gpu_partitions or a.gpu_image or a.gpu_partition:
            sec["container"]["gpu_image"] = ask.text(
                "Image for GPU nodes (.sif; none = same as compute)", gpu_default, _check_abs
            )
        elif gpu_default:
            sec["container"]["gpu_image"] = gpu_default
        sec["container"]["home"] = ask.text(
            "Home directory inside the container", a.container_home or _default("container.home"), allow_empty=False
        )
        sec["container"]["contain"] = ask.choice(
            "Isolation (contain-pid is right for shared accounts)",
            tuple(CONTAIN_MODES),
            a.contain or _default("container.contain"),
        )
    # storage
    scratch = ask.text(
        "Scratch directory for homes, overlays and logs",
        a.scratch_dir or _default("storage.scratch_dir"),
        _check_abs,
        allow_empty=False,
    )
    sec["storage"]["scratch_dir"] = scratch
    sec["storage"]["create_home"] = ask.yes_no(
        "Create a home directory per user?", _nz(a.create_home, _default("storage.create_home"))
    )
    if use_container:
        ov_on = ask.yes_no("Give each user a persistent overlay image?", _nz(a.overlay, _default("overlay.enabled")))
        sec["overlay"]["enabled"] = ov_on
        if ov_on:
            sec["overlay"]["size"] = ask.text(
                "Overlay size", a.overlay_size or _default("overlay.size"), _check_size, allow_empty=False
            )
    else:
        sec["overlay"]["enabled"] = False
    nb = ask.text("nbgrader exchange directory (none = no nbgrader)", a.nbgrader_exchange or "", _check_abs)
    if nb:
        sec["nbgrader"]["exchange_dir"] = nb
    sec["logging"]["debug"] = ask.yes_no("Debug logging?", _nz(a.debug, _default("logging.debug")))
    # batch system (hub side)
    check_part = _check_partition(info.partitions)
    partition = ask.text(
        "Slurm partition for notebook jobs",
        a.partition or info.default_partition or (info.partitions[0] if info.partitions else ""),
        check_part,
    )
    gpu_part_default = a.gpu_partition if a.gpu_partition is not None else next(iter(info.gpu_partitions), "")
    if gpu_part_default.lower() in NONE_WORDS:
        gpu_part_default = ""
    gpu_partition = ask.text("Slurm partition for GPU jobs (none = no GPU profile)", gpu_part_default, check_part)
    runtime_limit = ask.text("Job wall time", a.runtime_limit or "8:00:00")
    memory = ask.text("Job memory", a.memory or "4G")

    data = {s: v for s, v in sec.items() if v}
    try:
        config_from_dict(data, out)
    except HpcConfigError as e:
        print(str(e), file=sys.stderr)
        print("node-agent wizard: nothing written", file=sys.stderr)
        return 2
    img = sec["container"].get("image")
    for key, path in (("container.image", img), ("container.gpu_image", sec["container"].get("gpu_image"))):
        if path and not os.path.exists(os.path.expanduser(path)):
            print(f"note: {key} {path} does not exist yet (build it: see singularity/README.md)", file=sys.stderr)

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    host = socket.gethostname()
    header = (
        f"# HPC-side configuration of the node agent (docs/hpc-config.md).\n"
        f"# Written by `node-agent wizard` on {host}, {now}."
    )
    text = dump_toml(data, header=header)
    snippet_text = render_hub_snippet(out, partition, gpu_partition, runtime_limit, memory, host, now)
    try:
        _write(out, text, a.force)
        _write(snippet, snippet_text, a.force)
    except OSError as e:
        print(f"node-agent wizard: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    print(f"wrote {snippet} (add it to jupyterhub_config.py on the hub)")
    return 0


def render_hub_snippet(
    config_path: str, partition: str, gpu_partition: str, runtime_limit: str, memory: str, host: str, when: str
) -> str:
    agent = f"node-agent launch --config {shlex.quote(config_path)} --"
    lines = [
        f"# jupyterhub_config.py snippet written by `node-agent wizard` on {host}, {when}.",
        "# Notebook jobs go to Slurm; each job runs the node agent, which starts the container",
        f"# configured in {config_path}.",
        'c.JupyterHub.spawner_class = "hub_plugin.spawners.SlurmBrokerSpawner"',
        f"c.SlurmBrokerSpawner.agent_command = {agent!r}",
    ]
    if partition:
        lines.append(f"c.SlurmBrokerSpawner.req_partition = {partition!r}")
    if runtime_limit:
        lines.append(f"c.SlurmBrokerSpawner.req_runtime = {runtime_limit!r}")
    if memory:
        lines.append(f"c.SlurmBrokerSpawner.req_memory = {memory!r}")
    if gpu_partition:
        lines += [
            "",
            "# GPU jobs: a second profile, e.g. with wrapspawner.ProfilesSpawner:",
            "# c.ProfilesSpawner.profiles = [",
            f"#     ('CPU', 'cpu', 'hub_plugin.spawners.SlurmBrokerSpawner', {{'req_partition': {partition!r}}}),",
            f"#     ('GPU', 'gpu', 'hub_plugin.spawners.SlurmBrokerSpawner', "
            f"{{'req_partition': {gpu_partition!r}, 'req_options': '--gres=gpu:1', "
            f"'agent_command': {agent.replace(' --config', ' --gpu --config')!r}}}),",
            "# ]",
        ]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str, force: bool) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never overwrite
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
