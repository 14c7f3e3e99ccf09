"""No import cycle among the modules of mlo/, applications/ and benchmarks/.

Every ``import`` statement counts, also one inside a function (a cycle there only
moves the failure from import time to call time). An import names the module it
imports: ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
else to ``pkg``; the parent packages Python imports on the way are not edges (every
submodule would otherwise form a cycle with its package's ``__init__``).
"""
from __future__ import annotations

import ast
import os

from tests.subproc import ROOT

PACKAGES = ("mlo", "applications", "benchmarks")


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` for every .py file under the packages."""
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    found[".".join(rel)] = os.path.join(folder, name)
    return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """``{module: the project modules it imports}`` (every import statement, at any depth)."""
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = module if is_package else module.rpartition(".")[0]
        edges = set()
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules and "." in target:   # `import a.b.c` of a non-module name
                    target = target.rpartition(".")[0]
                if target in modules and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: two modules that import each other, one of them inside a function, are a cycle;
    a package's ``__init__`` importing its submodule is not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from . import a\n")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\nfrom pkg.b import f\n")
    modules = {m: str(tmp_path / "pkg" / f) for m, f in
               (("pkg", "__init__.py"), ("pkg.a", "a.py"), ("pkg.b", "b.py"), ("pkg.c", "c.py"))}
    graph = import_graph(modules)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a", "pkg.b"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_among_the_project_modules():
    modules = _modules()
    assert "mlo.step" in modules and "applications.lease.data" in modules
    found = cycles(import_graph(modules))
    assert not found, "import cycles (each line: modules that import each other, directly or in a loop):\n" + \
        "\n".join(" <-> ".join(c) for c in found)
