"""The code a module runs, read from the source: its import closure within the `pipeline` package
(every `import pipeline...` / `from pipeline... import`, the lazy ones inside functions included:
they run too). The check stage digests a method's closure into the record each of its finetune
entries depends on (`pipeline.stages.common.code_record`), so an edit re-runs what runs the code."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the `pipeline` package folder


def module_file(name: str) -> Path | None:
    """The file of the `pipeline` module `name` (None for other modules or none such)."""
    parts = name.split(".")
    if parts[0] != "pipeline":
        return None
    base = ROOT.joinpath(*parts[1:])
    for cand in ((base.with_suffix(".py"),) if len(parts) > 1 else ()) + (base / "__init__.py",):
        if cand.is_file():
            return cand
    return None


def imports_of(path: Path) -> set[Path]:
    """The `pipeline` files `path` imports directly, with every parent package's `__init__`."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] != "pipeline":
                continue
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


def import_closure(path: Path) -> list[Path]:
    """`path` and every `pipeline` file it imports, directly or not, sorted. A registry that
    imports its entries by name at run time (the method registry) brings in only itself: what
    it imports is each entry's own closure."""
    seen: set[Path] = set()
    todo = [Path(path).resolve()]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(f for f in imports_of(p) if f not in seen)
    return sorted(seen)


def digests(files: list[Path]) -> dict[str, str]:
    """{path (relative to the package's parent folder when inside it): SHA-256 of the file}."""
    out = {}
    for f in files:
        f = Path(f).resolve()
        name = f.relative_to(ROOT.parent).as_posix() if ROOT.parent in f.parents else str(f)
        out[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out
