"""The project's import graph: no cycles, and every import runs with the layering.

    pipelines            -> pipelines
    fedfraud (shared)    -> fedfraud (shared)
    bank_node            -> bank_node, fedfraud, pipelines          (never aggregator)
    aggregator           -> aggregator, fedfraud, pipelines         (never bank_node)
    aggregator.drivers   -> anything below (the only place a bank's node and the aggregator meet)
    fedfraud.cli, dags   -> anything below; nothing imports them

Every import counts, also those inside functions; only ``if TYPE_CHECKING:`` blocks are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedfraud", "pipelines", "bank_node", "aggregator", "dags")
FIXTURES = Path(__file__).parent / "fixtures" / "import_graph"


def module_names(root: Path, packages=PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import sub`` points at ``pkg.sub``)."""
    modules = module_names(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(filter(None, [*anchor, base]))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # ``import a.b.c`` of a module inside a package
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
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


def layer(module: str) -> str:
    if module == "fedfraud.cli" or module.startswith("dags"):
        return "entry"
    if module == "aggregator.drivers" or module.startswith("aggregator.drivers."):
        return "drivers"
    return module.split(".")[0]


ALLOWED = {
    "pipelines": {"pipelines"},
    "fedfraud": {"fedfraud"},
    "bank_node": {"bank_node", "fedfraud", "pipelines"},
    "aggregator": {"aggregator", "fedfraud", "pipelines"},
    "drivers": {"drivers", "aggregator", "bank_node", "fedfraud", "pipelines"},
    "entry": {"drivers", "aggregator", "bank_node", "fedfraud", "pipelines"},
}


def layering_breaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                  if layer(target) not in ALLOWED[layer(source)])


@pytest.fixture(scope="module")
def project_graph():
    return import_graph(ROOT)


def test_the_graph_sees_every_package_and_function_level_imports(project_graph):
    assert {m.split(".")[0] for m in project_graph} == set(PACKAGES)
    # fedfraud.cli imports the drivers only inside its commands: those edges must be in the graph
    assert "aggregator.drivers.embedded" in project_graph["fedfraud.cli"]


def test_no_import_cycles(project_graph):
    assert cycles(project_graph) == []


def test_every_import_runs_with_the_layering(project_graph):
    assert layering_breaches(project_graph) == []


def test_a_cycle_hidden_in_a_function_is_found():
    graph = import_graph(FIXTURES / "cycle", packages=("pkg",))
    assert graph["pkg.one"] == {"pkg.two"} and graph["pkg.two"] == {"pkg.one"}
    assert cycles(graph) == [["pkg.one", "pkg.two"]]


def test_a_bank_importing_the_aggregator_is_a_breach():
    graph = import_graph(FIXTURES / "layering", packages=("bank_node", "aggregator"))
    assert layering_breaches(graph) == ["bank_node.node -> aggregator.binning"]
