"""The project's modules import one another without cycles, and the node side stays small.

Every import counts: module level, inside functions and under ``if TYPE_CHECKING:`` alike, since a
function-local or type-only import is how a cycle (or a dependency) hides. The graph is built from
the source with :mod:`ast`, so nothing is imported or executed.

The node side is what a compute node (an image) carries: ``node_agent`` and ``wire``. They import
nothing of ``broker`` or ``hub_plugin`` and no third-party package but asyncssh (and tomli on
Python 3.10); ``wire.contract`` is standard library only. tests/test_agent_run.py runs the agent
from a ``sys.path`` holding only these.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("broker", "node_agent", "hub_plugin", "wire", "lab_timeleft")
#: What each node-side package may import besides the standard library and itself.
NODE_SIDE = {"node_agent": {"wire", "asyncssh", "tomli"}, "wire": {"asyncssh"}}
#: Node-side modules that import the standard library only.
STDLIB_ONLY = ("wire/contract.py", "wire/hubapi.py", "wire/ratelimit.py", "wire/tasks.py")


def project_modules() -> dict[str, str]:
    """Module name -> file path for every module of the shipped packages."""
    found = {}
    for package in PACKAGES:
        for root, _dirs, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[rel.removesuffix(".__init__")] = path
    return found


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules *module* imports (resolving relative imports and ``from pkg import mod``)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module that is *name* or a parent of it
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def top_level_imports(path: str) -> set[str]:
    """The top-level names of every absolute import in the file at *path*, wherever it stands."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.partition(".")[0])
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    graph = {m: imports_of(m, p, known) for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle with them
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m in PACKAGES and d.startswith(m + "."))}
    return graph


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_resolve_relative_and_function_local(tmp_path):
    pkg = tmp_path / "broker"
    pkg.mkdir()
    (pkg / "x.py").write_text(
        "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .y import Y\n"
        "def f():\n    from . import z\n"
    )
    known = {"broker", "broker.x", "broker.y", "broker.z"}
    assert imports_of("broker.x", str(pkg / "x.py"), known) == {"broker", "broker.y", "broker.z"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph()
    sub = {m: {d for d in deps if d.startswith(package)} for m, deps in graph.items() if m.startswith(package)}
    assert find_cycle(sub) is None, f"import cycle: {' -> '.join(find_cycle(sub) or [])}"


def test_no_import_cycle_across_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_top_level_imports_sees_function_local_and_type_only_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text(
        "from __future__ import annotations\nimport os.path\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from hub_plugin.x import Y\n"
        "def f():\n    import broker.policy\n    from . import sibling\n"
    )
    assert top_level_imports(str(mod)) == {"__future__", "os", "typing", "hub_plugin", "broker"}


@pytest.mark.parametrize("package", sorted(NODE_SIDE))
def test_node_side_imports_only_its_dependencies(package):
    """No module of ``node_agent`` or ``wire`` imports ``broker``, ``hub_plugin`` or a third-party
    package other than asyncssh (tomli: Python 3.10's TOML reader)."""
    allowed = NODE_SIDE[package] | set(sys.stdlib_module_names) | {package}
    found = {m: p for m, p in project_modules().items() if m == package or m.startswith(package + ".")}
    assert len(found) > 1
    bad = {m: sorted(top_level_imports(p) - allowed) for m, p in found.items()}
    assert not {m: names for m, names in bad.items() if names}


@pytest.mark.parametrize("path", STDLIB_ONLY)
def test_stdlib_only_modules(path):
    extra = top_level_imports(os.path.join(REPO, path)) - set(sys.stdlib_module_names)
    assert not extra, f"{path} imports {sorted(extra)}"
