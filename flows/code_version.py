"""The code version of a stage: a hash of its task module's source and every project module it imports,
transitively, so editing a stage's code invalidates that stage (and, through its manifest, what follows it)."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
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


def _imported_modules(path: Path) -> set[str]:
    """Absolute imports of a module (the project uses no relative imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PROJECT_PACKAGES}


@lru_cache(maxsize=None)
def code_version(module: str) -> str:
    """A short hash of ``module``'s source and of the project modules it imports, transitively."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        pending.extend(_imported_modules(path) - seen.keys())
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + seen[name].read_bytes())
    return digest.hexdigest()[:16]
