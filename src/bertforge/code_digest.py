"""A digest of the code that shapes a stage's output: its module and every bertforge module it imports.

A stage's cache key covers this digest, so a change to a stage or to any helper it reaches (the tied
table's quantizer, the int8-auto planner, the corpus loader) changes the key without a hand-bumped
VERSION. Imports are found by reading the source (ast), function-local imports included, so nothing
is executed and the set does not depend on what happens to be imported already.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "bertforge"
PACKAGE_DIR = Path(__file__).resolve().parent


def _source_path(module: str) -> Path | None:
    """The file of a bertforge module, found on disk (importlib's find_spec would import parents)."""
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / relative / "__init__.py", (PACKAGE_DIR / relative).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_level(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes that run when a module is imported: everything but the bodies of its functions."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def _imported(module: str, path: Path, import_time_only: bool = False) -> set[str]:
    """The bertforge modules `module` imports: anywhere in it, or with `import_time_only` only those its
    import itself runs (a package's __init__ reached as the parent of a module, whose functions the
    module does not call: bertforge/__init__'s API functions import the whole package when called)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in (_module_level(tree) if import_time_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from bertforge.optimizers import fusion` names a module, not an attribute
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


@functools.cache
def code_modules(module: str) -> tuple[str, ...]:
    """`module` and every bertforge module its code can run: what it imports (anywhere in it, function-local
    imports too), transitively, and the __init__ of each package above them (which runs on import),
    sorted. A module reached only as a parent contributes only what its import runs."""
    seen: dict[str, bool] = {}  # module -> whether all of its imports were followed (else import-time ones)
    pending = [(module, False)]
    while pending:
        name, as_parent = pending.pop()
        if name in seen and (seen[name] or as_parent):
            continue  # followed in full already, or reached as a parent again
        path = _source_path(name)
        if path is None:
            continue  # an attribute named in a from-import, not a module
        seen[name] = not as_parent
        pending.extend((found, False) for found in _imported(name, path, import_time_only=as_parent))
        parent = name.rpartition(".")[0]
        if parent:
            pending.append((parent, True))  # a package's __init__ runs before its modules
    return tuple(sorted(seen))


@functools.cache
def code_digest(module: str) -> str:
    digest = hashlib.sha256()
    for name in code_modules(module):
        path = _source_path(name)
        assert path is not None
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]
