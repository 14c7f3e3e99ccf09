"""Applications and benchmarks use mlo's public API only.

Scans every module under ``applications/`` and ``benchmarks/`` for

- imports of a private name or module: ``from mlo.x import _y``, ``import mlo._x``;
- attribute access through the package: ``mlo.x._y``;
- a private attribute that mlo's own classes define, read off any object other
  than ``self`` (``runner._saved_at``, ``graph._validate``): the names come from
  mlo's source, so a new private name there is covered without editing this test
  (also through ``getattr(obj, "_x")``).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources(*folders: str):
    for folder in folders:
        for root, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as fh:
                        yield os.path.relpath(path, ROOT), ast.parse(fh.read(), path)


def _mlo_private_attributes() -> set[str]:
    """Private attributes and methods that mlo's classes define (``self._x = ...``, ``def _x``)."""
    names = set()
    for _, tree in _sources("mlo"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                        names.add(item.name)
                    if (isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store)
                            and isinstance(item.value, ast.Name) and item.value.id == "self" and _private(item.attr)):
                        names.add(item.attr)
    return names


def _chain(node: ast.AST) -> list[str] | None:
    """``mlo.a.b`` -> ["mlo", "a", "b"]; None for anything not rooted at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def violations(tree: ast.AST, mlo_private: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlo":
            if any(_private(p) for p in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "mlo" and any(_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _chain(node)
            if chain and chain[0] == "mlo":
                found.append(f"line {node.lineno}: {'.'.join(chain)}")
            elif node.attr in mlo_private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: .{node.attr} (private in mlo)")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in mlo_private):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r}) (private in mlo)")
    return found


def test_the_scanner_catches_each_kind():
    code = ("from mlo.run import _x\nimport mlo._impl\nfrom mlo._impl import y\nmlo.distributed._env()\n"
            "runner._saved_at\nself._saved_at\nmlo.__version__\nother._mine\ngetattr(runner, '_saved_at', -1)\n")
    found = violations(ast.parse(code), {"_saved_at"})
    assert sorted(f.split(":")[0] for f in found) == ["line 1", "line 2", "line 3", "line 4", "line 5", "line 9"], found


@pytest.mark.parametrize("folder", ["applications", "benchmarks"])
def test_no_private_mlo_names(folder):
    mlo_private = _mlo_private_attributes()
    assert mlo_private, "found no private names in mlo: the scan of mlo/ is broken"
    bad = {path: v for path, tree in _sources(folder) if (v := violations(tree, mlo_private))}
    assert not bad, "private mlo names used:\n" + "\n".join(f"{p}: {', '.join(v)}" for p, v in bad.items())


def test_used_submodules_are_exported():
    """Every mlo submodule the applications and benchmarks name (``mlo.distributed``, ...) is exported."""
    import mlo
    used = {chain[1] for folder in ("applications", "benchmarks") for _, tree in _sources(folder)
            for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            if (chain := _chain(node)) and chain[0] == "mlo" and len(chain) > 2}
    assert used, "found no use of an mlo submodule: the scan is broken"
    assert all(hasattr(mlo, name) for name in used), sorted(n for n in used if not hasattr(mlo, n))
