"""The code version of a stage: a hash of the syntax trees of its task module and of every project module it
imports, transitively, so editing the code a stage runs invalidates that stage (and, through its manifest, what
follows it), while docstrings, comments, formatting and modules it does not import leave it cached."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("models", "storage", "tasks", "flows")


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # an attribute imported from a module, e.g. models.crf.CrfParams
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _imported_modules(tree: ast.Module) -> set[str]:
    """Absolute imports of a module (the project uses no relative imports)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PROJECT_PACKAGES}


def _without_docstrings(tree: ast.Module) -> ast.Module:
    """``tree`` with the docstrings of the module, its classes and functions removed (comments never reach it)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_tree(path: Path) -> ast.Module:
    """The syntax tree of a module's code, without docstrings."""
    return _without_docstrings(ast.parse(path.read_text(), str(path)))


@cache
def code_version(module: str) -> str:
    """A short hash of the code (syntax trees without docstrings) of ``module`` and of the project modules it
    imports, transitively."""
    trees: dict[str, ast.Module] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in trees:
            continue
        path = _module_file(name)
        if path is None:
            continue
        trees[name] = code_tree(path)
        pending.extend(_imported_modules(trees[name]) - trees.keys())
    digest = hashlib.sha256()
    for name in sorted(trees):
        digest.update(name.encode() + b"\0" + ast.dump(trees[name]).encode() + b"\0")
    return digest.hexdigest()[:16]
