"""No import cycle among the project's modules (docs/design.md: one-way imports).

Every `import` and `from ... import` of every module of the project's packages is read with
`ast`, at module level and inside functions and classes alike: an import moved into a function
to dodge a cycle is still a cycle (it only fails later, at the first call). Imports under
`if TYPE_CHECKING:` are left out: they never run.

An edge goes from a module to every project module an import statement loads: the module named,
and the packages above it (their `__init__` runs first), except the importer's own packages
(they are loaded already, whatever it imports). `from pkg import name` loads `pkg.name` when
that is a module, else `pkg` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "drivers", "simulator", "cmcs", "bench", "information_model", "siteconfig")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom of the tree, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first import statement that loads it}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own_packages = set(_with_parents(name)) if is_package else set(_with_parents(name)[:-1])
        edges: dict[str, int] = {}
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                for loaded in _with_parents(target):
                    if loaded in modules and loaded not in own_packages and loaded != name:
                        edges.setdefault(loaded, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graph has a few hundred nodes, recursion is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest way back to `start` inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = previous.get(v)
        out.append(path + [start])
    return out


def describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = [f"{a} (line {graph[a][b]} of {modules[a].relative_to(ROOT)})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps) + f" -> {cycle[-1]}"


def component_of(module: str, graph: dict[str, dict[str, int]]) -> list[str]:
    """Every module on some cycle through `module` (reachable from it and reaching it)."""
    def reach(start: str, edges) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges(todo.pop()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    reverse: dict[str, list[str]] = {}
    for a, targets in graph.items():
        for b in targets:
            reverse.setdefault(b, []).append(a)
    return sorted(reach(module, lambda v: graph.get(v, ())) & reach(module, lambda v: reverse.get(v, ())))


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found; one under
    `if TYPE_CHECKING:` is not; an import of a module's own package is not an edge."""
    pkg = tmp_path / "gateway"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from gateway.sub import b\n")
    (pkg / "a.py").write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from gateway import c\n"
                              "def f():\n    from gateway.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("import gateway.sub\nfrom . import d\nfrom gateway.a import x\n")
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "c.py").write_text("import gateway.a\n")
    modules = project_modules(tmp_path)
    graph = import_graph(modules)
    assert set(graph["gateway.a"]) == {"gateway.sub", "gateway.sub.b"}
    assert set(graph["gateway.sub.b"]) == {"gateway.sub.d", "gateway.a"}
    assert cycles(graph) == [["gateway.a", "gateway.sub.b", "gateway.a"]]


def test_no_import_cycle_among_the_project_modules():
    modules = project_modules()
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import cycle(s) among the project's modules:\n" + "\n".join(
        f"{describe(c, graph, modules)}\n    (all of {', '.join(component_of(c[0], graph))} are on a cycle)"
        for c in found)
