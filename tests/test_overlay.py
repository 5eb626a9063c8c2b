"""Race-free, idempotent home and overlay creation; corrupt overlays are detected."""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_agent import overlay as ov

REPO = Path(__file__).resolve().parent.parent
SIZE = 16 << 20

pytestmark = pytest.mark.skipif(ov.find_tool("mkfs.ext3") is None, reason="mkfs.ext3 (e2fsprogs) not installed")

# each worker waits for a common start time, then races to create the same overlay
WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from node_agent import overlay as ov
path, start = sys.argv[2], float(sys.argv[3])
while time.time() < start:
    pass
r = ov.ensure_overlay(path, SIZE, lock_timeout=60)
print(json.dumps({"created": r.created, "size": r.size}))
""".replace("SIZE", str(SIZE))


def test_concurrent_creation_yields_one_valid_overlay(tmp_path):
    img = tmp_path / "overlays" / "alice.img"
    n = 6
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(REPO), str(img), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["created"] for r in results) == 1, results
    assert all(r["size"] == SIZE for r in results)
    ov.check_overlay(str(img), fsck=True)
    # nothing half-written left behind; only the image and its lock file
    assert sorted(os.listdir(img.parent)) == ["alice.img", "alice.img.lock"]
    # apptainer's layout is inside
    out = subprocess.run([ov.find_tool("debugfs"), "-R", "ls -l /", str(img)], capture_output=True, text=True).stdout
    assert "upper" in out and "work" in out


def test_idempotent_second_call_reuses(tmp_path):
    img = str(tmp_path / "o.img")
    r1 = ov.ensure_overlay(img, SIZE)
    ino = os.stat(img).st_ino
    r2 = ov.ensure_overlay(img, 32 << 20)  # a changed size never resizes an existing image
    assert r1.created and not r2.created
    assert os.stat(img).st_ino == ino and os.path.getsize(img) == SIZE


def test_create_false_returns_none(tmp_path):
    assert ov.ensure_overlay(str(tmp_path / "o.img"), SIZE, create=False) is None
    assert not (tmp_path / "o.img").exists()


def test_leftover_partial_file_is_cleaned(tmp_path):
    img = tmp_path / "o.img"
    stale = tmp_path / ".o.img.tmp-1234-deadbeef"
    stale.write_bytes(b"\0" * 4096)
    ov.ensure_overlay(str(img), SIZE)
    assert not stale.exists()
    ov.check_overlay(str(img))


def _valid(tmp_path, name="o.img"):
    img = tmp_path / name
    ov.ensure_overlay(str(img), SIZE)
    return img


def test_truncated_overlay_detected(tmp_path):
    img = _valid(tmp_path)
    os.truncate(img, SIZE // 2)
    with pytest.raises(ov.OverlayCorrupt) as ei:
        ov.ensure_overlay(str(img), SIZE)
    msg = str(ei.value)
    assert str(img) in msg and "truncated" in msg
    assert f"mv {img} {img}.broken" in msg and "e2fsck" in msg


def test_zeroed_superblock_detected(tmp_path):
    img = _valid(tmp_path)
    with open(img, "r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 1024)
    with pytest.raises(ov.OverlayCorrupt, match="no ext2/3/4 superblock"):
        ov.check_overlay(str(img))
    assert img.exists(), "a corrupt overlay must never be deleted automatically"


def test_empty_and_tiny_files_detected(tmp_path):
    img = tmp_path / "o.img"
    img.write_bytes(b"")
    with pytest.raises(ov.OverlayCorrupt, match="too small"):
        ov.ensure_overlay(str(img), SIZE)
    img.write_bytes(b"x" * 1500)
    with pytest.raises(ov.OverlayCorrupt, match="too small"):
        ov.check_overlay(str(img))


def test_fsck_mode_detects_damaged_metadata(tmp_path):
    img = _valid(tmp_path)
    ov.check_overlay(str(img), fsck=True)
    # damage the block group descriptors/bitmaps after the superblock: the quick check still
    # passes, e2fsck -n does not
    with open(img, "r+b") as f:
        f.seek(2048)
        f.write(os.urandom(8192))
    ov.check_overlay(str(img))
    with pytest.raises(ov.OverlayCorrupt, match="file system errors"):
        ov.check_overlay(str(img), fsck=True)


def test_directory_in_place_of_image(tmp_path):
    (tmp_path / "o.img").mkdir()
    with pytest.raises(ov.OverlayCorrupt, match="not a regular file"):
        ov.ensure_overlay(str(tmp_path / "o.img"), SIZE)


def test_lock_timeout_is_reported(tmp_path):
    img = tmp_path / "o.img"
    fd = os.open(str(img) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t0 = time.monotonic()
        with pytest.raises(ov.OverlayError, match="timed out after 0.3s"):
            ov.ensure_overlay(str(img), SIZE, lock_timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        os.close(fd)
    assert not img.exists()


def test_creation_failure_leaves_nothing(tmp_path, monkeypatch):
    img = tmp_path / "o.img"
    monkeypatch.setattr(ov, "find_tool", lambda name: "/bin/false")
    with pytest.raises(ov.OverlayError, match="mkfs.ext3 failed"):
        ov.ensure_overlay(str(img), SIZE)
    assert sorted(os.listdir(tmp_path)) == ["o.img.lock"]


def test_in_use_lock_is_exclusive(tmp_path):
    img = str(tmp_path / "o.img")
    a, b = ov.InUseLock(img), ov.InUseLock(img)
    assert a.try_acquire()
    assert not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()


def test_home_creation(tmp_path):
    home = tmp_path / "homes" / "alice"
    assert ov.ensure_home(str(home), 0o700)
    assert ov.ensure_home(str(home), 0o700)  # idempotent
    assert (home.stat().st_mode & 0o777) == 0o700
    assert not ov.ensure_home(str(tmp_path / "homes" / "bob"), create=False)
    (tmp_path / "homes" / "file").write_text("x")
    with pytest.raises(ov.OverlayError, match="not a directory"):
        ov.ensure_home(str(tmp_path / "homes" / "file"))
