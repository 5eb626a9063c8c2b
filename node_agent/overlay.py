"""Per-user home directories and persistent overlay images, created race-free.

Several launches of the same user may run at the same time (named servers, a retry while the
first job is still starting, jobs on different nodes sharing one file system). The rules:

* A home directory is made with ``os.makedirs(exist_ok=True)``: already idempotent.
* An overlay image is only ever *published* complete: it is built in a temporary file next to
  the target (``.NAME.tmp-…``: sparse file + ``mkfs.ext3 -q -F -d SEED``), checked, fsync'ed,
  then hard-linked to its final name (``link`` fails if the name exists, so nothing is ever
  overwritten). Creation runs under an exclusive ``flock`` on ``NAME.lock``; whoever waits
  finds the finished image and reuses it.
* An existing image is checked before use (ext2/3/4 superblock magic, block count against the
  file size; optionally ``e2fsck -n``). A corrupt or truncated image is reported with its path
  and what to do; it is never deleted or "repaired" automatically, as it may hold user files.
* While a job uses an overlay it holds a shared-nothing lock on ``NAME.inuse`` (inherited by the
  container runtime through exec), so a second concurrent job of the same user can fall back to a
  read-only mount instead of corrupting the file system with two writers.

Lock files are never removed (removing a lock file reopens the race it closes). ``flock`` works
across nodes on NFSv4 and on Lustre mounted with ``-o flock``.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("node_agent.overlay")

EXT_MAGIC = 0xEF53
_SB_OFFSET = 1024
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class OverlayError(Exception):
    """Home/overlay preparation failed; the message says what and what to do."""


class OverlayCorrupt(OverlayError):
    pass


@dataclass
class OverlayResult:
    path: str
    created: bool
    size: int


# --------------------------------------------------------------------------------------------
# home directories


def ensure_home(path: str, mode: int = 0o700, create: bool = True) -> bool:
    """Make sure the home directory exists. Returns True if it exists afterwards."""
    if os.path.isdir(path):
        return True
    if os.path.lexists(path):
        raise OverlayError(f"home {path} exists but is not a directory; move it away")
    if not create:
        return False
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as e:
        raise OverlayError(f"cannot create home {path}: {e.strerror}") from None
    try:
        os.chmod(path, mode)  # makedirs' mode is filtered by the umask
    except OSError:
        pass
    log.info("created home %s", path)
    return True


# --------------------------------------------------------------------------------------------
# checks


def _read_superblock(path: str) -> tuple[int, int, bytes]:
    with open(path, "rb") as f:
        f.seek(_SB_OFFSET)
        sb = f.read(1024)
        size = os.fstat(f.fileno()).st_size
    return size, len(sb), sb


def check_overlay(path: str, fsck: bool = False) -> int:
    """Raise OverlayCorrupt if ``path`` is not a complete ext2/3/4 image; return its size."""
    what_to_do = (
        f"The image may still hold the user's files: move it aside "
        f"(mv {path} {path}.broken), inspect or repair it with `e2fsck -f {path}.broken`, "
        f"and the next launch creates a new empty overlay."
    )
    try:
        st = os.stat(path)
    except OSError as e:
        raise OverlayCorrupt(f"overlay {path}: cannot read it ({e.strerror}).") from None
    if not os.path.isfile(path):
        raise OverlayCorrupt(f"overlay {path} is not a regular file. Move it away.")
    try:
        size, n, sb = _read_superblock(path)
    except OSError as e:
        raise OverlayCorrupt(f"overlay {path}: cannot read it ({e.strerror}).") from None
    if n < 1024:
        raise OverlayCorrupt(
            f"overlay {path} is corrupt or incomplete: only {st.st_size} bytes, too small for "
            f"an ext file system (a creation was probably interrupted). {what_to_do}"
        )
    magic = struct.unpack_from("<H", sb, 0x38)[0]
    if magic != EXT_MAGIC:
        raise OverlayCorrupt(
            f"overlay {path} is corrupt or incomplete: no ext2/3/4 superblock "
            f"(magic {magic:#06x}, expected 0xef53). {what_to_do}"
        )
    blocks_lo = struct.unpack_from("<I", sb, 0x04)[0]
    log_bs = struct.unpack_from("<I", sb, 0x18)[0]
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    blocks = blocks_lo
    if incompat & 0x80:  # 64bit feature
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    if log_bs > 6:
        raise OverlayCorrupt(f"overlay {path} is corrupt: impossible block size (log {log_bs}). {what_to_do}")
    need = blocks * (1024 << log_bs)
    if need == 0 or size < need:
        raise OverlayCorrupt(
            f"overlay {path} is truncated: the file system needs {need} bytes but the file has {size}. {what_to_do}"
        )
    if fsck:
        e2fsck = find_tool("e2fsck")
        if e2fsck is None:
            raise OverlayError("overlay.check = 'fsck' but e2fsck was not found on PATH or in /sbin")
        r = subprocess.run(
            [e2fsck, "-n", "-f", path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
        if r.returncode not in (0,):
            tail = r.stdout.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise OverlayCorrupt(
                f"overlay {path} has file system errors (e2fsck -n exit {r.returncode}: "
                f"{' / '.join(tail)[:300]}). {what_to_do}"
            )
    return size


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


# --------------------------------------------------------------------------------------------
# locking


def _flock(fd: int, kind: int, timeout: float | None, what: str) -> None:
    if timeout is None:
        fcntl.flock(fd, kind)
        return
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise OverlayError(f"timed out after {timeout:g}s waiting for the lock {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


# --------------------------------------------------------------------------------------------
# creation


def _make_image(tmp: str, size: int, mkfs: str) -> None:
    seed = tempfile.mkdtemp(prefix="node-agent-overlay-seed-")
    try:
        # Apptainer's layout for writable overlay images: /upper and /work at the top.
        for d in ("upper", "work"):
            os.mkdir(os.path.join(seed, d), 0o755)
            os.chmod(os.path.join(seed, d), 0o755)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: fast even on large sizes
        finally:
            os.close(fd)
        r = subprocess.run(
            [mkfs, "-q", "-F", "-d", seed, tmp],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
        if r.returncode != 0:
            out = r.stdout.decode("utf-8", "replace").strip()[-400:]
            hint = ""
            if "invalid option" in out or "-d" in out and "unknown" in out:
                hint = " (mkfs.ext3 needs e2fsprogs >= 1.43 for -d)"
            raise OverlayError(f"mkfs.ext3 failed with exit {r.returncode}: {out}{hint}")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(seed, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_overlay(
    path: str, size: int, *, create: bool = True, check: str = "quick", lock_timeout: float = 300
) -> OverlayResult | None:
    """Return the usable overlay at ``path``, creating it once if needed.

    Returns None when the image does not exist and ``create`` is false. Raises OverlayCorrupt
    for an unusable existing image and OverlayError for other failures.
    """
    fsck = check == "fsck"
    if os.path.exists(path):  # fast path, no lock needed: published images are complete
        if check != "none":
            check_overlay(path, fsck=fsck)
        return OverlayResult(path, False, os.path.getsize(path))
    if not create:
        return None
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as e:
        raise OverlayError(f"cannot create the overlay directory {parent}: {e.strerror}") from None
    mkfs = find_tool("mkfs.ext3")
    if mkfs is None:
        raise OverlayError(
            "mkfs.ext3 (e2fsprogs) was not found on PATH or in /sbin; it is needed to create overlay images"
        )
    lock_path = path + ".lock"
    try:
        lfd = _open_lock(lock_path)
    except OSError as e:
        raise OverlayError(f"cannot open the lock file {lock_path}: {e.strerror}") from None
    try:
        _flock(lfd, fcntl.LOCK_EX, lock_timeout, lock_path)
        if os.path.exists(path):  # someone else made it while we waited
            if check != "none":
                check_overlay(path, fsck=fsck)
            return OverlayResult(path, False, os.path.getsize(path))
        base = os.path.basename(path)
        # Leftovers of launches that died mid-creation (we hold the lock: nobody else creates).
        for stale in glob.glob(os.path.join(parent, glob.escape(f".{base}.tmp-") + "*")):
            log.warning("removing leftover partial overlay %s", stale)
            try:
                os.unlink(stale)
            except OSError:
                pass
        tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        t0 = time.monotonic()
        try:
            _make_image(tmp, size, mkfs)
            check_overlay(tmp)
            try:
                os.link(tmp, path)  # atomic publish; never replaces an existing file
            except FileExistsError:
                log.warning("overlay %s appeared during creation; using it", path)
                created = False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                # file systems without hard links: rename is atomic, and we hold the lock
                os.rename(tmp, path)
                created = True
            else:
                created = True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        _fsync_dir(parent)
        log.info("created overlay %s (%d bytes) in %.2fs", path, size, time.monotonic() - t0)
        if not created and check != "none":
            check_overlay(path, fsck=fsck)
        return OverlayResult(path, created, os.path.getsize(path))
    except OSError as e:
        raise OverlayError(f"cannot create overlay {path}: {e.strerror or e}") from None
    finally:
        os.close(lfd)


class InUseLock:
    """An exclusive, non-blocking lock that marks an overlay as mounted read-write by a job.

    The descriptor is inheritable so the lock lives on in the container runtime after exec.
    """

    def __init__(self, overlay_path: str):
        self.path = overlay_path + ".inuse"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = _open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self.fd = fd
        return True

    def keep_across_exec(self) -> None:
        if self.fd is not None:
            os.set_inheritable(self.fd, True)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
