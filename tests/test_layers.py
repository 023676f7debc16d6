"""The layers of ``node/`` hold: every import points down, and no two modules import each other.

``docs/architecture.md`` draws the layers; this test is what keeps the drawing true. It reads
every module's source (no imports run), so it sees the imports a running program would make,
those inside functions and under ``TYPE_CHECKING`` included: a lazy import that closes a
circle is still a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[1] / "node"

#: Bottom up. A module may import its own layer and the layers before it, never one after it.
#: "base" is the modules directly in node/ (config, errors, concurrency, progress, services).
LAYERS = ["base", "protocol", "net", "models", "inference", "payments", "market", "verify", "app", "api", "dev", "cli"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(NODE.rglob("*.py")):
        parts = path.relative_to(NODE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    if module == "node.__main__":
        return "cli"
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and MODULES[module].name != "__init__.py"):
        return "base"
    return parts[1]


def imports_of(module: str) -> set[str]:
    """Every node module that ``module`` imports, anywhere in its body (packages' __init__ too)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Import):
            targets.update(alias.name for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = package.split(".")[: len(package.split(".")) - stmt.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in stmt.names:
                candidate = f"{base}.{alias.name}"
                targets.add(candidate if candidate in MODULES else base)
    found = set()
    for target in targets:
        if not (target == "node" or target.startswith("node.")):
            continue
        while target not in MODULES:  # an attribute of a module: node.x.y.Name -> node.x.y
            target = target.rpartition(".")[0]
        # importing node.a.b runs node.a's __init__ first
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    found.discard(module)
    found.discard("node")  # node/__init__.py holds the version only
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_layer_is_a_package_or_base():
    for module in MODULES:
        assert layer_of(module) in LAYERS, f"{module} is in no layer: add its package to LAYERS (docs/architecture.md)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    rank = LAYERS.index(layer_of(module))
    upward = sorted(t for t in GRAPH[module] if LAYERS.index(layer_of(t)) > rank)
    assert not upward, f"{module} ({layer_of(module)}) imports a higher layer: {upward}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_cycles_and_upward_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("node.errors") == "base"
    assert layer_of("node.net.host") == "net"
    assert layer_of("node.cli") == "cli"
    assert "node.net.host" in GRAPH["node.market.jobs"]  # the graph is read, not empty
    assert "node.net" in GRAPH["node.market.jobs"]  # a package's __init__ runs before its modules


def test_a_requester_and_a_free_worker_never_import_web3_and_the_cli_never_loads_llama_cpp():
    """docs/architecture.md: web3 is imported by paid nodes only (node.app.paid), llama.cpp by serve/run only.

    A fresh interpreter imports what ``llmarket request``, a free ``serve`` and the gateway
    import at load time, and builds the whole command line; neither library may be loaded.
    """
    code = (
        "import sys\n"
        "import node.app.requester, node.app.worker, node.api.gateway, node.api.dashboard, node.cli.main\n"
        "node.cli.main.build_parser()\n"
        "print([m for m in ('web3', 'llama_cpp', 'node.payments.deposits') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
