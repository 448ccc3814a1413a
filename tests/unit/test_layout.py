"""The package layout is the architecture (docs/architecture.md): these tests keep it so.

Imports are read from the source (every `import` and `from ... import`, also those inside
functions), so a lazy import that would tie two layers together counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
ROOT = os.path.join(SRC, "pycni")

# The tools and the CLI on top; the product below never reaches up to them.
TOOLING = {"ctl", "lab", "bench", "harness"}
PRODUCT = {
    "shim",
    "plugin",
    "native",
    "cni",
    "core",
    "ipam",
    "dataplane",
    "rules",
    "agent",
    "cluster",
    "backends",
    "policy",
    "doctor",
    "install",
    "node_config",
    "log",
    "version",
}


def _modules() -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """The pycni modules `module` imports (a package's submodule when that is what is named)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("pycni"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""])
                base = base.rstrip(".")
            else:
                base = node.module or ""
            if not base.startswith("pycni"):
                continue
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            if submodules:
                targets |= submodules
            if len(submodules) < len(node.names):
                targets.add(base)
    return {t for t in targets if t in MODULES and t != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pycni"


def test_every_package_is_placed_in_a_layer():
    layers = {_layer(m) for m in MODULES} - {"pycni", "__main__"}
    assert layers <= TOOLING | PRODUCT, f"place {layers - TOOLING - PRODUCT} in test_layout"


def test_nothing_imports_the_cli():
    offenders = [
        (m, t)
        for m, targets in GRAPH.items()
        for t in targets
        if _layer(t) == "ctl" and _layer(m) != "ctl"
    ]
    assert not offenders


def test_the_product_never_imports_the_lab_the_benchmarks_or_the_harnesses():
    offenders = [
        (m, t)
        for m, targets in GRAPH.items()
        for t in targets
        if _layer(m) in PRODUCT and _layer(t) in TOOLING
    ]
    assert not offenders


def test_the_harnesses_serve_tests_benchmarks_and_the_lab_only():
    users = {_layer(m) for m, targets in GRAPH.items() for t in targets if _layer(t) == "harness"}
    # The lab too: `lab up --kubernetes` runs the containerd and the Kubernetes binaries and
    # images the harnesses build and start (peers, containerd, nodefs, kube).
    assert users <= {"harness", "bench", "lab"}


def test_the_executable_runtimes_exec_imports_only_the_protocol_and_the_plugin():
    # shim.py is exec'd once per pod: cni constants at start-up, the plugin only in-process.
    assert {_layer(t) for t in GRAPH["pycni.shim"]} <= {"cni", "plugin"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles_between_modules():
    # A package's __init__ that imports its own submodules lazily (core's dispatch) is the
    # package using its parts, not a circle: only imports between distinct modules count.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else None


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--no-cache", "src", "tests"],
        ["format", "--check", "--no-cache", "src", "tests"],
    ],
    ids=["lint", "format"],
)
def test_ruff(argv):
    ruff = _tool("ruff")
    assert ruff, "ruff is missing: ./dev setup installs the test extras"
    root = os.path.join(SRC, "..")
    run = subprocess.run([ruff, *argv], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_types():
    mypy = _tool("mypy")
    assert mypy, "mypy is missing: ./dev setup installs the test extras"
    root = os.path.join(SRC, "..")
    run = subprocess.run([mypy], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
