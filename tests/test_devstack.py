"""The development stack (devstack/) stays out of what ships, and takes its PATH as an argument.

No services are started here: the end-to-end modules run the stack for real.
"""

from __future__ import annotations

import ast
import glob
import os
import sys

from devstack.stack import Stack

from harness import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SHIPPED = ("broker", "node_agent", "hub_plugin")


def test_the_wheel_does_not_contain_devstack():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]
    assert set(SHIPPED) <= set(packages)
    assert not [p for p in packages if p.split(".")[0] == "devstack"], packages
    assert not os.path.exists(os.path.join(REPO, "hub_plugin", "demo.py"))


def test_no_shipped_module_imports_devstack():
    bad = []
    for pkg in SHIPPED:
        for path in glob.glob(os.path.join(REPO, pkg, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                bad += [f"{os.path.relpath(path, REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "devstack"]
    assert not bad, bad


def test_the_hub_config_names_shipped_modules_only(tmp_path):
    """The hub a Stack runs imports what ships (its spawner, templates), not the dev stack."""
    stack = Stack(str(tmp_path / "stack"))
    try:
        with open(stack.write_hub_config()) as f:
            config = f.read()
    finally:
        stack.stop()
    tree = ast.parse(config)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"os", "sys", *SHIPPED}, imported
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [v for v in strings if "devstack" in v or "hub_plugin.demo" in v]
    assert "hub_plugin.spawners.LocalBrokerSpawner" in strings


def test_services_get_the_path_given_and_this_process_keeps_its_own(tmp_path):
    before = dict(os.environ)
    stack = Stack(str(tmp_path / "stack"), path="/opt/given/bin:/usr/bin")
    try:
        env = stack.env()
    finally:
        stack.stop()
    assert env["PATH"] == os.path.dirname(sys.executable) + os.pathsep + "/opt/given/bin:/usr/bin"
    assert dict(os.environ) == before
    default = Stack(str(tmp_path / "default"))
    try:
        assert default.env()["PATH"] == os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    finally:
        default.stop()
