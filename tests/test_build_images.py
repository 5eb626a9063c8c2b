"""scripts/build_images.py's pure parts (no Apptainer, no network): the mirror read from apt
sources, the recipe header the base cache is keyed by, requirement includes, pip platform tags."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_images", REPO / "scripts" / "build_images.py")
assert _spec is not None and _spec.loader is not None
bi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bi)

MIRROR = "http://mirror.example/debian"


def apt(tmp_path: Path, sources: str = "", one_line: str = "") -> Path:
    (tmp_path / "sources.list.d").mkdir()
    if sources:
        (tmp_path / "sources.list.d" / "debian.sources").write_text(sources)
    if one_line:
        (tmp_path / "sources.list").write_text(one_line)
    return tmp_path


def test_mirror_from_deb822_skips_security_and_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIRROR", raising=False)
    etc = apt(
        tmp_path,
        "Types: deb\nURIs: http://other.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src deb\n# a comment: here\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n",
    )
    assert bi.debian_mirror(etc) == MIRROR


def test_mirror_from_one_line_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIRROR", raising=False)
    etc = apt(
        tmp_path,
        one_line="# deb http://x.example/debian bookworm main\ndeb [arch=amd64] http://m.example/d bookworm main\n",
    )
    assert bi.debian_mirror(etc) == "http://m.example/d"  # serves a Debian suite


def test_mirror_override_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = apt(tmp_path, one_line="deb http://archive.example/ubuntu noble main\n")
    monkeypatch.delenv("MIRROR", raising=False)
    with pytest.raises(bi.BuildError) as err:
        bi.debian_mirror(etc)
    assert err.value.status == bi.EXIT_PREREQ and "MIRROR" in str(err.value)
    monkeypatch.setenv("MIRROR", MIRROR + "/")
    assert bi.debian_mirror(etc) == MIRROR


def test_recipes_share_one_base_header() -> None:
    cpu_header, cpu_sections = bi.split_recipe((REPO / "singularity" / "cpu.def").read_text())
    gpu_header, _ = bi.split_recipe((REPO / "singularity" / "gpu.def").read_text())
    assert cpu_header == gpu_header
    assert cpu_header.startswith("Bootstrap: debootstrap\n") and "#" not in cpu_header
    assert bi.uses_arg(cpu_header, "MIRROR") and "://" not in cpu_header  # no mirror in the repo
    assert cpu_sections.startswith("%arguments")
    for arg in ("DIST", "WHEELHOUSE"):
        assert bi.uses_arg(cpu_sections, arg)


def test_requirement_files_follow_includes() -> None:
    names = [p.name for p in bi.requirement_files("gpu")]
    assert names == ["gpu-requirements.txt", "cpu-requirements.txt"]
    assert [p.name for p in bi.requirement_files("cpu")] == ["cpu-requirements.txt"]


def test_platform_tags_cover_older_manylinux() -> None:
    tags = bi.platform_tags("2.36", "x86_64")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_37_x86_64" not in tags
    arm = bi.platform_tags("2.36", "aarch64")
    assert "manylinux2014_aarch64" in arm and not any("manylinux1" in t for t in arm)
