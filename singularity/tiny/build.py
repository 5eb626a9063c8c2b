#!/usr/bin/env python3
"""Build a tiny Apptainer image from files of the build host, in seconds, for CI and demos.

No network, no debootstrap, no %post: the image is a sandbox directory filled with a few host
programs (sh, bash, coreutils basics, python3 + its standard library) and the shared libraries
they need (found with ldd). With --with-agent it also carries the project's node_agent package
and the pure-Python/wheel dependencies it needs (asyncssh, cryptography, cffi), taken from the
Python that runs this script, plus a /usr/local/bin/node-agent wrapper.

"%post"-style steps run with `apptainer exec --writable SANDBOX ...` (on some machines %post
fails when building as root). Then `apptainer build OUT.sif SANDBOX` makes the SIF.

    python3 singularity/tiny/build.py --output /tmp/tiny.sif [--with-agent] [--sandbox-only DIR]

The image only works on hosts with the same architecture and a compatible kernel (any Linux
that runs the host's binaries) - it is for tests, not for production (see ../cpu.def).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROGRAMS = [
    "sh",
    "bash",
    "cat",
    "ls",
    "mkdir",
    "rm",
    "env",
    "id",
    "touch",
    "sleep",
    "cp",
    "mv",
    "ln",
    "grep",
    "sed",
    "head",
    "tail",
    "wc",
    "stat",
    "uname",
    "true",
    "false",
    "readlink",
    "dirname",
    "basename",
    "printf",
    "test",
]
# on sys.path of Debian's python3 without any PYTHONPATH
AGENT_LIB = "/usr/lib/python3/dist-packages"
AGENT_MODULES = ["asyncssh", "cryptography", "cffi", "_cffi_backend", "pycparser", "typing_extensions", "bcrypt"]
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "__pycache__",
    "pydoc_data",
    "config-3.11-x86_64-linux-gnu",
}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def copy_into(root: str, path: str) -> None:
    """Copy host ``path`` to the same place under ``root``, keeping symlink chains."""
    seen = set()
    while path not in seen:
        seen.add(path)
        dest = root + path
        if os.path.lexists(dest):
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.islink(path):
            target = os.readlink(path)
            os.symlink(target, dest)
            path = os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        if os.path.isdir(path):
            shutil.copytree(path, dest, symlinks=True)
        else:
            shutil.copy2(path, dest)
        return


def libs_of(path: str) -> list[str]:
    r = subprocess.run(["ldd", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            out.append(m.group(1))
    return out


def copy_with_libs(root: str, path: str) -> None:
    copy_into(root, path)
    real = os.path.realpath(path)
    copy_into(root, real)
    for lib in libs_of(real):
        copy_into(root, lib)
        copy_into(root, os.path.realpath(lib))


def base_python() -> str:
    for cand in ("/usr/bin/python3",):
        if os.path.exists(cand):
            return cand
    return os.path.realpath(sys.executable)


def make_sandbox(root: str, with_agent: bool, python: str) -> None:
    # usr-merged layout like the host (Debian 12: /bin -> usr/bin, ...)
    for d in (
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "usr/sbin",
        "etc",
        "tmp",
        "var/tmp",
        "home",
        "root",
        "opt",
        "proc",
        "sys",
        "dev",
        "run",
        "mnt",
        "srv",
        "usr/local/bin",
    ):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        host = "/" + link
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, link))
        else:
            os.makedirs(os.path.join(root, link), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "var/tmp"), 0o1777)
    for prog in PROGRAMS:
        p = shutil.which(prog, path="/usr/bin:/bin")
        if p:
            copy_with_libs(root, p)
    # python3 + standard library (+ libraries of its extension modules)
    copy_with_libs(root, python)
    os.symlink(os.path.basename(os.path.realpath(python)), root + "/usr/bin/python3") if not os.path.lexists(
        root + "/usr/bin/python3"
    ) else None
    stdlib = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"], text=True
    ).strip()
    os.makedirs(root + stdlib, exist_ok=True)
    for name in os.listdir(stdlib):
        if name in STDLIB_SKIP:
            continue
        copy_into(root, os.path.join(stdlib, name))
    dynload = os.path.join(stdlib, "lib-dynload")
    for so in os.listdir(dynload) if os.path.isdir(dynload) else []:
        for lib in libs_of(os.path.join(dynload, so)):
            copy_into(root, lib)
            copy_into(root, os.path.realpath(lib))
    with open(root + "/etc/tiny-image", "w") as f:
        f.write("built by singularity/tiny/build.py\n")
    # apptainer appends the calling user to these; they must exist
    with open(root + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
    with open(root + "/etc/group", "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    if with_agent:
        dest = root + AGENT_LIB
        os.makedirs(dest, exist_ok=True)
        shutil.copytree(
            os.path.join(REPO, "node_agent"),
            os.path.join(dest, "node_agent"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for mod in AGENT_MODULES:
            spec = importlib.util.find_spec(mod)
            if spec is None or not spec.origin:
                continue
            src = os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin
            target = os.path.join(dest, os.path.basename(src))
            if os.path.isdir(src):
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, target)
            for dirpath, _dirs, files in os.walk(src if os.path.isdir(src) else os.path.dirname(src)):
                for fn in files:
                    if fn.endswith(".so") and (os.path.isdir(src) or fn == os.path.basename(src)):
                        for lib in libs_of(os.path.join(dirpath, fn)):
                            copy_into(root, lib)
                            copy_into(root, os.path.realpath(lib))
                if not os.path.isdir(src):
                    break
        wrapper = root + "/usr/local/bin/node-agent"
        with open(wrapper, "w") as f:
            f.write(
                "#!/bin/sh\n"
                "exec /usr/bin/python3 -c 'import sys; from node_agent.cli import main; "
                'sys.exit(main())\' "$@"\n'
            )
        os.chmod(wrapper, 0o755)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", "-o", default=os.path.join(HERE, "tiny.sif"))
    ap.add_argument("--runtime", default=shutil.which("apptainer") or shutil.which("singularity"))
    ap.add_argument("--with-agent", action="store_true", help="include node_agent, asyncssh and its dependencies")
    ap.add_argument("--python", default=base_python(), help="interpreter to copy into the image")
    ap.add_argument("--sandbox-only", metavar="DIR", help="only make the sandbox directory DIR (no runtime needed)")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    if a.sandbox_only:
        if os.path.exists(a.sandbox_only):
            print(f"{a.sandbox_only} exists", file=sys.stderr)
            return 1
        make_sandbox(a.sandbox_only, a.with_agent, a.python)
        print(f"sandbox {a.sandbox_only} in {time.monotonic() - t0:.1f}s")
        return 0
    if not a.runtime:
        print("apptainer/singularity not found (scripts/install-apptainer.sh)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="tiny-image-")
    try:
        sb = os.path.join(work, "sandbox")
        make_sandbox(sb, a.with_agent, a.python)
        t1 = time.monotonic()
        # the "%post" steps, run in the writable sandbox
        post = "python3 -m compileall -q /usr/lib/python3* >/dev/null 2>&1; true"
        if a.with_agent:
            post += (
                "; python3 -m compileall -q " + AGENT_LIB + " >/dev/null 2>&1; python3 -c 'import asyncssh, node_agent'"
            )
        sh([a.runtime, "-s", "exec", "--writable", "--no-home", sb, "/bin/sh", "-c", post])
        t2 = time.monotonic()
        out = os.path.abspath(a.output)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp_out = out + ".part"
        sh([a.runtime, "-s", "build", "--force", tmp_out, sb])
        os.replace(tmp_out, out)
        t3 = time.monotonic()
        size = os.path.getsize(out) / 1e6
        print(
            f"built {out} ({size:.0f} MB): sandbox {t1 - t0:.1f}s, post {t2 - t1:.1f}s, "
            f"build {t3 - t2:.1f}s, total {t3 - t0:.1f}s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
