#!/usr/bin/env python3
"""Build the node-side Apptainer images from ``singularity/<name>.def`` (``make images``).

Usage: ``scripts/build_images.py [cpu] [gpu]`` (default: cpu). Prints each stage with the elapsed
time; the full output of every stage goes to a log file in the cache (named on failure).

Stages, each cached OUTSIDE the checkout and keyed by a hash of what goes into it:

=============  ================================================================================
wheel          the project's wheel, built from a copy of the checkout into ``dist/`` (always
               rebuilt, a few seconds; keyed by the hash of its contents, not its bytes)
base           the recipe's header (Debian ``bookworm`` via debootstrap, the mirror read from the
               build host's apt sources) as a sandbox directory; rebuilt after BASE_MAX_AGE_DAYS
wheelhouse     the image's Python dependencies as wheels, downloaded ON THE BUILD HOST for the
               base's Python/glibc/architecture (the image installs them offline: no index and
               no certificates needed inside the build)
image          ``apptainer build`` of the recipe with its header replaced by the cached base
               (``Bootstrap: localimage``); runs the recipe's %test
=============  ================================================================================

``singularity/<name>.sif`` is then a hard link to the cached image (a copy across file systems).

Privileges: root builds directly. A root whose capability bounding set is not full (some VMs lack
CAP_SYS_RESOURCE, and Apptainer's %post asks for every capability) and ordinary users build with
``--fakeroot``, which needs /etc/subuid and /etc/subgid ranges (added for root with
``apptainer config fakeroot --add root``; for a user, the admin runs it). debootstrap is installed with
apt-get when missing and running as root.

Environment:

=================  ============================================================================
IMAGES_CACHE       cache directory (root: /var/cache/jupyterhub-hpc-broker/images, others:
                   $XDG_CACHE_HOME/jupyterhub-hpc-broker/images)
IMAGES_REFRESH     1: rebuild the base, the wheelhouse and the image instead of reusing them
IMAGES_VERBOSE     1: print every line of the build tools' output (default: stage lines only)
MIRROR             the Debian mirror URL (default: the first Debian archive in this host's apt
                   sources; never written into the repository)
APPTAINER          the apptainer command (default: apptainer)
=================  ============================================================================

Exit status: 0 built (or reused), 1 a stage failed ("build-images: error: ..."), 3 a prerequisite is
missing ("build-images: missing prerequisite: ...": Apptainer, root/fakeroot, debootstrap, pip, a
Debian mirror, a writable cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "singularity"
EXIT_FAILED = 1
EXIT_PREREQ = 3
BASE_MAX_AGE_DAYS = 30
KEEP = {"base": 2, "wheelhouse": 4, "image": 3}  # newest cache entries kept per kind (and per image name)
HEARTBEAT_S = 30.0
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: wheels with stable timestamps
STAMP = ".build-images-built"  # in a cached base: when it was built (its identity in the image key)
#: Built files the wheel carries although git ignores them: JupyterLab's time-left extension
#: (scripts/build-labextension.sh, ``make labextension``; pyproject.toml's data files).
LABEXTENSION_BUILD = "labextension/built"
T0 = time.monotonic()
BUILT: set[Path] = set()  # cache entries this run made (IMAGES_REFRESH rebuilds each only once)


class BuildError(Exception):
    """A stage failed (exit 1) or a prerequisite is missing (exit 3); the message says which."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- output


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name a stage before it runs and report its duration after."""
    say(f"{name} ...")
    t = time.monotonic()
    yield
    say(f"{name}: done in {time.monotonic() - t:.1f} s")


def run(cmd: list[str], log: Path, *, cwd: Path = REPO, env: dict[str, str] | None = None, echo: bool = False) -> None:
    """Run ``cmd``, its output appended to ``log``. With ``echo``, Apptainer's stage lines
    (INFO/WARNING/FATAL) and everything after "Running testscript" are printed; a heartbeat every
    HEARTBEAT_S seconds of silence. On failure: the log's last lines and BuildError."""
    verbose = os.environ.get("IMAGES_VERBOSE") == "1"
    lines: queue.Queue[str | None] = queue.Queue()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        started = last = time.monotonic()
        in_test = False
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last >= HEARTBEAT_S:
                    say(f"  ... still running ({time.monotonic() - started:.0f} s; log {log})")
                    last = time.monotonic()
                continue
            if line is None:
                break
            out.write(line)
            text = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip())
            in_test = in_test or (echo and "Running testscript" in text)
            if verbose or in_test or (echo and re.match(r"(INFO|WARNING|FATAL|ERROR) *:", text)):
                say(f"  {text[:200]}")
                last = time.monotonic()
        status = proc.wait()
    if status != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        print("\n".join("  | " + t for t in tail), file=sys.stderr)
        raise BuildError(f"{Path(cmd[0]).name} exited with status {status} (full log: {log})")


def sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def du_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1e6
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total / 1e6


# ---------------------------------------------------------------- prerequisites


def cache_dir() -> Path:
    if os.environ.get("IMAGES_CACHE"):
        return Path(os.environ["IMAGES_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/jupyterhub-hpc-broker/images")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "jupyterhub-hpc-broker" / "images"


def apptainer() -> str:
    cmd = os.environ.get("APPTAINER", "apptainer")
    path = shutil.which(cmd)
    if path is None:
        raise BuildError(
            f"{cmd} not found. Install Apptainer >= 1.2 (on Debian 12 as root: scripts/install-apptainer.sh; "
            "elsewhere see https://apptainer.org/docs/admin/main/installation.html)",
            EXIT_PREREQ,
        )
    r = subprocess.run([path, "version"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{cmd} does not run here: {(r.stderr or r.stdout).strip()[:300]}", EXIT_PREREQ)
    return path


def full_capabilities() -> bool:
    """True when this process's capability bounding set holds every capability the kernel knows."""
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True
    m = re.search(r"^CapBnd:\s*([0-9a-f]+)", status, re.M)
    full = (1 << (last + 1)) - 1
    return m is None or int(m.group(1), 16) & full == full


def has_subid(user: str, uid: int) -> bool:
    found = []
    for f in ("/etc/subuid", "/etc/subgid"):
        try:
            text = Path(f).read_text()
        except OSError:
            return False
        found.append(any(line.split(":")[0] in (user, str(uid)) for line in text.splitlines() if ":" in line))
    return all(found)


def privilege_flags(app: str) -> tuple[list[str], str]:
    """The ``apptainer build`` flags for this user, and a sentence saying why."""
    uid = os.geteuid()
    if uid == 0 and full_capabilities():
        return [], "root"
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(uid)
    if uid == 0:
        user = "root"
        why = "root without a full capability bounding set: building with --fakeroot"
        if not has_subid("root", 0):
            say("root has no /etc/subuid range, which --fakeroot needs: apptainer config fakeroot --add root")
            r = subprocess.run([app, "config", "fakeroot", "--add", "root"], capture_output=True, text=True)
            if r.returncode != 0 or not has_subid("root", 0):
                raise BuildError(
                    "could not give root a subordinate id range "
                    f"({(r.stderr or r.stdout).strip()[:200]}); add 'root:<start>:65536' to /etc/subuid and /etc/subgid",
                    EXIT_PREREQ,
                )
        return ["--fakeroot"], why
    if has_subid(user, uid):
        return ["--fakeroot"], f"user {user}: building with --fakeroot"
    # Without a range Apptainer falls back to a root-mapped namespace and the fakeroot command,
    # where debootstrap fails ("mounted with noexec or nodev": it cannot mknod).
    raise BuildError(
        f"building an image needs root or Apptainer's fakeroot with subordinate ids: user {user} has no "
        f"/etc/subuid and /etc/subgid range (an admin runs: apptainer config fakeroot --add {user}). "
        "Or build on a machine where you are root and copy the .sif.",
        EXIT_PREREQ,
    )


def debootstrap_ready() -> str:
    """debootstrap's version; installed with apt-get when missing and running as root."""
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if shutil.which("debootstrap") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BuildError(
                "debootstrap is not installed (the recipes' Debian base is made with it): apt-get install debootstrap",
                EXIT_PREREQ,
            )
        say("debootstrap missing: apt-get install debootstrap")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            r = subprocess.run(install, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"apt-get install debootstrap failed: {r.stderr.strip()[-300:]}", EXIT_PREREQ)
    r = subprocess.run(["debootstrap", "--version"], capture_output=True, text=True)
    return r.stdout.strip() or "debootstrap"


def apt_source_uris(etc: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    """(URI, suites) of every enabled ``deb`` source of this host, deb822 files first."""
    found: list[tuple[str, str]] = []
    for f in sorted(glob.glob(str(etc / "sources.list.d" / "*.sources"))):
        for stanza in re.split(r"\n\s*\n", Path(f).read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                m = re.match(r"([A-Za-z-]+):\s*(.*)", line)
                if m and not line.startswith("#"):
                    fields[m.group(1).lower()] = m.group(2).strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            found += [(uri, fields.get("suites", "")) for uri in fields.get("uris", "").split()]
    lists = [etc / "sources.list"] + [Path(p) for p in sorted(glob.glob(str(etc / "sources.list.d" / "*.list")))]
    for one_line in lists:
        if not one_line.is_file():
            continue
        for line in one_line.read_text(errors="replace").splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                found.append((m.group(1), m.group(2)))
    return found


def debian_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian archive this host installs from: $MIRROR, else the first apt source that is a
    Debian archive (its path ends in /debian, or it serves a Debian suite), security archives
    excluded."""
    if os.environ.get("MIRROR"):
        return os.environ["MIRROR"].rstrip("/")
    debian_suites = {"bookworm", "trixie", "forky", "sid", "bullseye", "stable", "testing", "unstable"}
    for uri, suites in apt_source_uris(etc):
        path = uri.rstrip("/")
        if "security" in path.rsplit("/", 1)[-1]:
            continue
        if path.endswith("/debian") or debian_suites & set(suites.split()):
            return path
    raise BuildError(
        "no Debian archive in this host's apt sources (/etc/apt/sources.list.d/*.sources, /etc/apt/sources.list): "
        "set MIRROR to a Debian mirror URL",
        EXIT_PREREQ,
    )


def pip_python() -> str:
    """A Python with pip on the build host: this one, else the checkout's .venv."""
    for py in (sys.executable, str(REPO / ".venv" / "bin" / "python")):
        if os.path.exists(py) and subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return py
    raise BuildError(
        "no pip on the build host (needed to build the wheel and download the wheelhouse): "
        "apt-get install python3-pip, or make venv",
        EXIT_PREREQ,
    )


# ---------------------------------------------------------------- stages


def source_files() -> list[str]:
    """The checkout's files as git sees them (tracked + untracked, not ignored), else everything
    but the usual build and environment directories."""
    r = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    built = [str(p.relative_to(REPO)) for p in sorted((REPO / LABEXTENSION_BUILD).rglob("*")) if p.is_file()]
    if r.returncode == 0:
        return [f for f in r.stdout.decode().split("\0") if f and (REPO / f).is_file()] + built
    skip = {".git", ".venv", ".node", "node_modules", "build", "dist", "__pycache__", "test-artifacts", "demo-state"}
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        out += [os.path.relpath(os.path.join(root, f), REPO) for f in files if not f.endswith(".sif")]
    return out


def build_wheel(py: str, log: Path) -> Path:
    """The project's wheel in dist/ (older wheels of the project there are removed), built from a
    copy of the checkout so no stale build/ directory can leak into it."""
    if not (REPO / LABEXTENSION_BUILD / "package.json").is_file():
        raise BuildError(
            f"JupyterLab's time-left extension is not built ({LABEXTENSION_BUILD}/ is missing): "
            "run `make labextension` (make images does it first)",
            EXIT_PREREQ,
        )
    dist = REPO / "dist"
    dist.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-images-wheel-") as tmp:
        src = Path(tmp) / "src"
        for rel in source_files():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
        out = Path(tmp) / "dist"
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
        run([py, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)], log, env=env)
        wheels = list(out.glob("*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one wheel from pip wheel, got {[w.name for w in wheels]} (log: {log})")
        project = wheels[0].name.split("-")[0]
        for old in dist.glob(f"{project}-*.whl"):
            old.unlink()
        return Path(shutil.move(str(wheels[0]), dist / wheels[0].name))


def wheel_identity(wheel: Path) -> tuple[str, list[str]]:
    """(hash of the wheel's file names and contents, its Requires-Dist lines)."""
    with zipfile.ZipFile(wheel) as z:
        names = sorted(z.namelist())
        digest = sha256(*(n + ":" + hashlib.sha256(z.read(n)).hexdigest() for n in names))
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in z.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    return digest, sorted(requires)


def split_recipe(text: str) -> tuple[str, str]:
    """(header: the lines before the first %section without comments and blank lines, so recipes
    with the same base share it; the sections)."""
    m = re.search(r"^%[a-z]+", text, re.M)
    if m is None:
        raise BuildError("recipe has no sections")
    lines = [line.strip() for line in text[: m.start()].splitlines()]
    return "".join(line + "\n" for line in lines if line and not line.startswith("#")), text[m.start() :]


def uses_arg(text: str, name: str) -> bool:
    return re.search(r"\{\{\s*" + name + r"\s*\}\}", text) is not None


def fresh(path: Path) -> bool:
    """A cache entry to reuse: present, and built by this run or no IMAGES_REFRESH asked for;
    touched when reused (pruning keeps the most recently used)."""
    if not path.exists() or (os.environ.get("IMAGES_REFRESH") == "1" and path not in BUILT):
        return False
    os.utime(path)
    return True


def build_base(app: str, flags: list[str], header: str, cache: Path, log: Path) -> Path:
    """The recipe's header as a sandbox directory in the cache (its device nodes removed: Apptainer
    provides /dev at run time, and a --fakeroot build cannot copy them)."""
    arch = os.uname().machine
    mirror = debian_mirror() if uses_arg(header, "MIRROR") else ""
    key = sha256("base", header, mirror, arch)[:16]
    base = cache / f"base-{key}"
    built = base_built(base)
    if built and (time.time() - float(built)) / 86400 < BASE_MAX_AGE_DAYS and fresh(base):
        say(f"base: cached {base.name} ({du_mb(base):.0f} MB, built {time.ctime(float(built))})")
        return base
    version = debootstrap_ready()
    say(f"base: {version}, mirror from {'MIRROR' if os.environ.get('MIRROR') else 'the host apt sources'}")
    with tempfile.TemporaryDirectory(prefix="tmp-base-", dir=cache) as tmp:
        hdr = Path(tmp) / "header.def"
        hdr.write_text(header)
        out = Path(tmp) / "root"
        args = ["--build-arg", f"MIRROR={mirror}"] if mirror else []
        run([app, "build", *flags, "--sandbox", *args, str(out), str(hdr)], log, echo=True)
        for dev in (out / "dev").iterdir() if (out / "dev").is_dir() else []:
            if dev.is_dir() and not dev.is_symlink():
                shutil.rmtree(dev)
            else:
                dev.unlink()
        (out / STAMP).write_text(f"{time.time():.3f}\n")
        if base.exists():
            shutil.rmtree(base)
        out.rename(base)
        BUILT.add(base)
    say(f"base: built {base.name} ({du_mb(base):.0f} MB)")
    return base


def base_built(base: Path) -> str:
    """When the base was built (seconds since the epoch, as text); "" if it is not there."""
    try:
        return (base / STAMP).read_text().strip()
    except OSError:
        return ""


def base_python(app: str, base: Path) -> dict[str, str]:
    """The base's Python version, glibc version and machine, asked of its own python3."""
    code = (
        "import json, os, platform, sys;"
        "print(json.dumps({'py': '%d%d' % sys.version_info[:2], 'glibc': os.confstr('CS_GNU_LIBC_VERSION').split()[1],"
        " 'machine': platform.machine()}))"
    )
    r = subprocess.run([app, "exec", "--contain", str(base), "python3", "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"cannot run python3 in the base {base}: {r.stderr.strip()[-300:]}")
    info: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
    return info


def platform_tags(glibc: str, machine: str) -> list[str]:
    """pip --platform tags a base with this glibc accepts (pip does not expand manylinux itself)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    tags += [f"{name}_{machine}" for name, m in legacy.items() if m <= minor and machine in ("x86_64", "i686")]
    if machine not in ("x86_64", "i686") and minor >= 17:
        tags.append(f"manylinux2014_{machine}")
    return tags


def requirement_files(name: str) -> list[Path]:
    """singularity/<name>-requirements.txt and the files it includes with -r, in order."""
    out: list[Path] = []
    todo = [RECIPES / f"{name}-requirements.txt"]
    while todo:
        path = todo.pop(0)
        if path in out:
            continue
        if not path.is_file():
            raise BuildError(f"{path.relative_to(REPO)} is missing (the image's notebook-side requirements)")
        out.append(path)
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:-r|--requirement)[\s=]+(\S+)", line)
            if m:
                todo.append((path.parent / m.group(1)).resolve())
    return out


def build_wheelhouse(
    py: str, name: str, wheel: Path, requires: list[str], target: dict[str, str], cache: Path, log: Path
) -> Path:
    """Every wheel the image installs besides the project's own, for the base's Python."""
    files = requirement_files(name)
    texts = [p.name + "\n" + p.read_text() for p in files]
    key = sha256("wheelhouse", name, *texts, *requires, json.dumps(target, sort_keys=True))[:16]
    house = cache / f"wheelhouse-{key}"
    if fresh(house):
        say(f"wheelhouse: cached {house.name} ({len(list(house.glob('*.whl')))} wheels, {du_mb(house):.0f} MB)")
        return house
    with tempfile.TemporaryDirectory(prefix="tmp-wheelhouse-", dir=cache) as tmp:
        out = Path(tmp) / "wheels"
        py_version = f"{target['py'][0]}.{target['py'][1:]}"
        cmd = [py, "-m", "pip", "download", "-d", str(out), "--only-binary=:all:", "--python-version", py_version]
        cmd += ["--implementation", "cp", "--abi", f"cp{target['py']}"]
        for tag in platform_tags(target["glibc"], target["machine"]):
            cmd += ["--platform", tag]
        run([*cmd, str(wheel), "-r", str(files[0])], log, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
        (out / wheel.name).unlink(missing_ok=True)  # the project's wheel goes in through DIST
        if house.exists():
            shutil.rmtree(house)
        out.rename(house)
        BUILT.add(house)
    say(f"wheelhouse: downloaded {house.name} ({len(list(house.glob('*.whl')))} wheels, {du_mb(house):.0f} MB)")
    return house


def build_image(
    app: str, flags: list[str], name: str, sections: str, base: Path, wheel: Path, house: Path, key: str, log: Path
) -> Path:
    """``apptainer build`` of the recipe's sections on the cached base (runs %test)."""
    cache = base.parent
    sif = cache / f"{name}-{key}.sif"
    if fresh(sif):
        say(f"image {name}: cached {sif.name} ({du_mb(sif):.0f} MB)")
        return sif
    for arg in ("DIST", "WHEELHOUSE"):
        if not uses_arg(sections, arg):
            raise BuildError(f"singularity/{name}.def does not use {{{{ {arg} }}}}: not a recipe this script builds")
    with tempfile.TemporaryDirectory(prefix=f"tmp-{name}-", dir=cache) as tmp:
        dist = Path(tmp) / "dist"
        dist.mkdir()
        shutil.copy2(wheel, dist / wheel.name)
        recipe = Path(tmp) / f"{name}.def"
        recipe.write_text(
            f"# singularity/{name}.def on the cached base\nBootstrap: localimage\nFrom: {base}\n\n{sections}"
        )
        out = Path(tmp) / f"{name}.sif"
        args = ["--build-arg", f"DIST={dist}", "--build-arg", f"WHEELHOUSE={house}"]
        run([app, "build", *flags, *args, str(out), str(recipe)], log, echo=True)
        out.chmod(0o444)
        out.rename(sif)
        BUILT.add(sif)
    say(f"image {name}: built {sif.name} ({du_mb(sif):.0f} MB), %test passed")
    return sif


def link(sif: Path, name: str) -> Path:
    """singularity/<name>.sif: a hard link to the cached image (a copy across file systems)."""
    dst = RECIPES / f"{name}.sif"
    with contextlib.suppress(FileNotFoundError):
        if dst.stat().st_ino == sif.stat().st_ino:
            return dst
        dst.unlink()
    try:
        os.link(sif, dst)
    except OSError:
        shutil.copy2(sif, dst)
    return dst


def prune(cache: Path) -> None:
    """Keep the newest KEEP entries of each kind (per image name for images)."""
    groups: dict[str, list[Path]] = {}
    for p in cache.iterdir():
        m = re.match(r"(base|wheelhouse)-[0-9a-f]+$|([a-z0-9_]+)-[0-9a-f]+\.sif$", p.name)
        if m:
            groups.setdefault(m.group(1) or "image:" + (m.group(2) or ""), []).append(p)
    for kind, paths in groups.items():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in paths[KEEP[kind.split(":")[0]] :]:
            say(f"cache: removing {old.name} (older than the newest {KEEP[kind.split(':')[0]]})")
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def build(names: list[str]) -> None:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the cache directory {cache} ({exc}): set IMAGES_CACHE", EXIT_PREREQ) from exc
    logs = cache / "logs"
    say(f"build-images: {', '.join(names)}; cache {cache}")
    with stage("check tools"):
        app = apptainer()
        version = subprocess.run([app, "version"], capture_output=True, text=True).stdout.strip()
        flags, why = privilege_flags(app)
        py = pip_python()
        say(f"apptainer {version}; {why}; pip from {py}")
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build-images run (lock {cache / '.lock'})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for old in logs.glob("*.log"):  # each run's logs start empty
            old.unlink()
        with stage("wheel"):
            wheel = build_wheel(py, logs / "wheel.log")
            digest, requires = wheel_identity(wheel)
            plain = [r for r in requires if "extra ==" not in r]
            say(f"wheel: {wheel.relative_to(REPO)} (contents {digest[:12]}; requires {', '.join(plain)})")
        for name in names:
            recipe = RECIPES / f"{name}.def"
            if not recipe.is_file():
                raise BuildError(f"no recipe {recipe.relative_to(REPO)}")
            text = recipe.read_text()
            header, sections = split_recipe(text)
            with stage(f"{name}: base"):
                base = build_base(app, flags, header, cache, logs / "base.log")
            with stage(f"{name}: wheelhouse"):
                target = base_python(app, base)
                house = build_wheelhouse(py, name, wheel, requires, target, cache, logs / f"{name}-wheelhouse.log")
            with stage(f"{name}: image"):
                reqs = [p.read_text() for p in requirement_files(name)]
                base_id = f"{base.name}@{base_built(base)}"
                key = sha256("image", text, *reqs, base_id, digest, house.name)[:16]
                sif = build_image(app, flags, name, sections, base, wheel, house, key, logs / f"{name}-image.log")
            dst = link(sif, name)
            say(f"{dst.relative_to(REPO)}: {sif.stat().st_size / 2**20:.0f} MiB (cache {sif.name})")
        prune(cache)
    say(f"build-images: done in {time.monotonic() - T0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        build(args or ["cpu"])
    except BuildError as exc:
        what = "missing prerequisite" if exc.status == EXIT_PREREQ else "error"
        print(f"build-images: {what}: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # e.g. a checkout whose dist/ this user cannot write
        print(f"build-images: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
