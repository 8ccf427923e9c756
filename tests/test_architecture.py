"""docs/ARCHITECTURE.md's map against the code: every module has a row; every import between rows
(but into the last two, which everything may use) is named in the importing row's last column, and
one that runs up the map is named after "up:"; a name there is imported by the row. The imports are
read from the source (ast), function-level ones too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "bertforge"


def module_names() -> set[str]:
    """Every module and package of bertforge as a dotted name under it ('cli', 'optimizers.int8_auto')."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts))
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bertforge":
            base = node.module.removeprefix("bertforge").lstrip(".")
            for alias in node.names:  # `from bertforge.optimizers import fusion` names a module
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in modules else base or "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("bertforge.") for a in node.names if a.name.startswith("bertforge."))
    return found


def rows() -> list[tuple[list[str], str]]:
    """(the entries of the first column, the last column) of each row of the map, top to bottom."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text("utf-8")
    table = text[text.index("## The map, top to bottom"):text.index("## The rules it keeps")]
    found = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("where", "---"):
            continue
        named = re.findall(r"`([^`]+)`", cells[0])  # files and folders; a folder's other file (web/top1.mjs)
        entries = [(name if name.endswith((".py", "/")) else name.rpartition("/")[0]).removesuffix(".py")
                   .removesuffix("/").replace("/", ".") for name in named if name.endswith((".py", "/")) or "/" in name]
        found.append((entries, cells[2]))
    return found


def row_of(module: str, table: list[tuple[list[str], str]]) -> int | None:
    """The row whose entry is the longest prefix of the module (optimizers.int8_auto.search: int8_auto's)."""
    best, length = None, -1
    for index, (entries, _) in enumerate(table):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > length:
                best, length = index, len(entry)
    return best


def covers(name: str, module: str) -> bool:
    return module == name or module.startswith(name + ".")


def test_the_architecture_map_holds_every_module_and_names_the_imports_between_its_rows():
    modules = module_names()
    table = rows()
    assert len(table) > 15
    bottom = len(table) - 1
    foundation = {bottom - 1, bottom}  # files, manifests and the cache; the machine's facts: left out
    placed = {module: row_of(module, table) for module in modules}
    assert not [m for m, row in placed.items() if row is None], "modules without a row in the map"
    problems = []
    imported_by_row: dict[int, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        row = placed[module]
        _, column = table[row]
        below, _, above = column.partition("up:")
        names = re.findall(r"`([\w.]+)`", column)
        for target in imports_of(path, modules):
            target_row = placed.get(target)
            if target_row is None:
                problems.append(f"{module} imports {target}, which is no module")
                continue
            imported_by_row.setdefault(row, set()).add(target)
            if target_row == row or (target_row in foundation and target_row >= row):
                continue
            if row in foundation:
                problems.append(f"{module} imports {target}, which is above the foundation")
            elif not any(covers(name, target) for name in names) and "the modules a command reads" not in column:
                problems.append(f"{module} imports {target}: not in its row's imports")
            elif target_row < row and not any(covers(n, target) for n in re.findall(r"`([\w.]+)`", above)):
                problems.append(f"{module} imports {target}, a row above, not named after 'up:'")
    for row, (entries, column) in enumerate(table):
        for name in re.findall(r"`([\w.]+)`", column):
            if name in modules and not any(covers(name, t) for t in imported_by_row.get(row, ())):
                problems.append(f"the row of {entries} names `{name}`, which none of its modules imports")
    assert not problems, "\n".join(problems)
