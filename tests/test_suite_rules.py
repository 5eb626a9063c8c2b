"""Rules of the test suite itself, checked on its source with ``ast``.

* No module of the suite imports a test module (``test_*``): what modules share lives in the
  helper modules (harness.py, e2e.py, broker_cli.py, ...) and conftest.py's fixtures.
* No module of the suite writes to this process's environment (``os.environ[...] = ...``,
  ``del os.environ[...]``, ``os.environ.update/setdefault/pop/...``, ``os.putenv``/``unsetenv``):
  a test that needs a variable uses ``monkeypatch.setenv`` (undone after the test), and child
  processes get theirs with ``env=`` (a Stack gets its ``PATH`` as an argument).

Each checker is also run on a snippet that breaks its rule, so that the rule can fail.
"""

from __future__ import annotations

import ast
import glob
import os

import pytest

from harness import REPO

TESTS = os.path.join(REPO, "tests")

#: methods of os.environ that change it
ENVIRON_WRITERS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def suite_modules() -> list[str]:
    return sorted(glob.glob(os.path.join(TESTS, "*.py")))


def imported_test_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``test_*`` module, at any depth (function-local too)."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module else [a.name for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0].startswith("test_")]
    return found


def environ_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every write to the process environment through ``os`` (under any alias)."""
    os_names = {"os"}
    environ_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            environ_names |= {a.asname or a.name for a in node.names if a.name == "environ"}

    def is_environ(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.Attribute)
            and n.attr == "environ"
            and isinstance(n.value, ast.Name)
            and n.value.id in os_names
        ) or (isinstance(n, ast.Name) and n.id in environ_names)

    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if is_environ(t) or (isinstance(t, ast.Subscript) and is_environ(t.value)):
                found.append((node.lineno, ast.unparse(t)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if is_environ(f.value) and f.attr in ENVIRON_WRITERS:
                found.append((node.lineno, ast.unparse(f)))
            if isinstance(f.value, ast.Name) and f.value.id in os_names and f.attr in ("putenv", "unsetenv"):
                found.append((node.lineno, ast.unparse(f)))
    return found


def _violations(check) -> list[str]:
    out = []
    for path in suite_modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        out += [f"{os.path.relpath(path, REPO)}:{line}: {what}" for line, what in check(tree)]
    return out


def test_the_suite_has_modules_to_check():
    names = {os.path.basename(p) for p in suite_modules()}
    assert {"conftest.py", "harness.py", "test_suite_rules.py"} <= names
    assert sum(n.startswith("test_") for n in names) > 20


def test_no_module_of_the_suite_imports_a_test_module():
    bad = _violations(imported_test_modules)
    assert not bad, (
        "import shared helpers from tests/harness.py (or another helper module), not from a test module:\n"
        + "\n".join(bad)
    )


def test_no_module_of_the_suite_writes_to_the_process_environment():
    bad = _violations(environ_writes)
    assert not bad, (
        "use monkeypatch.setenv, env= for child processes, or the stack factory's path=, instead of:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    "code",
    [
        "import test_api",
        "from test_tunnel_security import Harness",
        "def f():\n    from test_e2e_apptainer import build_image",
        "import importlib\nimportlib.import_module('test_x')",
    ],
)
def test_the_import_rule_catches(code):
    assert imported_test_modules(ast.parse(code))


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.environ['PATH'] = 'x'",
        "import os\ndel os.environ['X']",
        "import os\nos.environ['PATH'] += ':x'",
        "import os\nos.environ.update(A='1')",
        "import os\nos.environ.setdefault('A', '1')",
        "import os\nos.environ.pop('A', None)",
        "import os\nos.putenv('A', '1')",
        "import os as o\no.environ['A'] = '1'",
        "from os import environ\nenviron['A'] = '1'",
        "import os\nos.environ = {}",
    ],
)
def test_the_environ_rule_catches(code):
    assert environ_writes(ast.parse(code))


@pytest.mark.parametrize(
    "code",
    [
        "import os\nx = os.environ['PATH']",
        "import os\nenv = dict(os.environ, PATH='x')",
        "def t(monkeypatch):\n    monkeypatch.setenv('A', '1')",
        "import os\nfrom unittest import mock\nmock.patch.dict(os.environ, {'A': '1'})",
        "env = {}\nenv['PATH'] = 'x'",
    ],
)
def test_the_environ_rule_allows(code):
    assert not environ_writes(ast.parse(code))
