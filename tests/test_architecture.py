"""The layers the folders show, and dvc.yaml deps that cover every stage's imports.

Imports are read from the source (every `import pipeline...` / `from pipeline... import`,
including the lazy ones inside functions: they run too), so the checks see what would run.
A package whose `__init__` imports its modules by discovery (`pkgutil.iter_modules`, the
method registry and the dataset catalog) counts as importing all of them.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"

# Which top-level parts of the library may import which (besides themselves). Bottom first.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "methods": {"core", "data", "models"},
    "training": {"core", "data", "models", "methods"},
    "evaluation": {"core", "data", "models", "methods"},
    "artifacts": {"core", "data", "models"},
    "report": {"core", "data", "models", "methods", "evaluation", "artifacts"},
    "config": {"core"},
    "stages": {"core", "data", "models", "methods", "training", "evaluation", "report", "artifacts", "config"},
    # orchestration around DVC, beside the CLI: it knows stages by their DVC names and commands,
    # never imports one, and nothing below the CLI imports it
    "cluster": {"core"},
    "cli": {"core", "data", "models", "methods", "training", "evaluation", "report", "artifacts", "config",
            "stages", "cluster"},
}


def module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The pipeline modules `path` imports (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "pipeline" or n.startswith("pipeline."):
                # every parent package's __init__ runs too
                parts = n.split(".")
                for i in range(1, len(parts) + 1):
                    if module_file(".".join(parts[:i])):
                        found.add(".".join(parts[:i]))
    source = path.read_text()
    if path.name == "__init__.py" and "pkgutil.iter_modules" in source:
        pkg = module_name(path)
        found |= {module_name(p) for p in path.parent.glob("*.py") if p.name != "__init__.py"}
        found |= {f"{pkg}.{p.parent.name}" for p in path.parent.glob("*/__init__.py")}
    return found


def closure(path: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in imports_of(p):
            f = module_file(name)
            if f is not None and f not in seen:
                todo.append(f)
    return {p for p in seen if PKG in p.parents}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def uncovered(stage: dict, entry: Path) -> list[str]:
    """Files in the entry point's import closure that none of the stage's deps covers."""
    deps = [ROOT / d for d in stage.get("deps", [])]
    missing = []
    for f in sorted(closure(entry) | {entry}):
        if not any(f == d or d in f.parents for d in deps):
            missing.append(str(f.relative_to(ROOT)))
    return missing


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def entry_point(stage: dict) -> Path:
    script = stage["cmd"].split()[1]
    return ROOT / script


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_dvc_deps_cover_the_stage_import_closure(name):
    stage = dvc_stages()[name]
    missing = uncovered(stage, entry_point(stage))
    assert not missing, f"dvc.yaml stage {name!r} imports files its deps do not list: {missing}"


def test_a_removed_dep_is_caught():
    """The check above can fail: drop any pipeline dep of a stage and it names what is missing."""
    stages = dvc_stages()
    tried = 0
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if not dep.startswith("pipeline/"):
                continue
            cut = copy.deepcopy(stage)
            cut["deps"].remove(dep)
            missing = uncovered(cut, entry_point(stage))
            assert missing and all(m.startswith(dep) for m in missing), (name, dep, missing)
            tried += 1
    assert tried > 10


def test_report_edits_retrain_nothing():
    """Folder-level deps stay precise: the report package is in no training stage's deps."""
    stages = dvc_stages()
    for name in ("check", "prepare", "pretrained", "embed", "sample", "finetune", "evaluate"):
        assert not any(d.startswith("pipeline/report") for d in stages[name]["deps"]), name


def test_each_stage_entry_imports_only_its_stage():
    for name, stage in dvc_stages().items():
        entry = entry_point(stage)
        assert imports_of(entry) == {"pipeline", "pipeline.stages", f"pipeline.stages.{name}"}, name


def test_no_stage_imports_another_stage():
    stage_modules = {p.stem for p in (PKG / "stages").glob("*.py")} - {"__init__", "common"}
    assert stage_modules == set(dvc_stages()), "one module per DVC stage in pipeline/stages/"
    for path in (PKG / "stages").glob("*.py"):
        for name in imports_of(path):
            parts = name.split(".")
            if len(parts) == 3 and parts[:2] == ["pipeline", "stages"] and parts[2] in stage_modules:
                assert parts[2] == path.stem, f"{path.name} imports the stage {name}"


def test_library_layers():
    """Every module imports only its own part and the parts below it (LAYERS)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "__init__.py" or path == PKG / "__main__.py":
            continue
        layer = layer_of(path)
        assert layer in LAYERS, f"{path}: part {layer!r} is not in LAYERS"
        for name in imports_of(path):
            parts = name.split(".")
            if len(parts) < 2:
                continue
            other = parts[1]
            if other != layer and other not in LAYERS[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_a_stage_or_the_cli():
    for path in PKG.rglob("*.py"):
        if layer_of(path) in ("stages", "cli") or path.name == "__main__.py":
            continue
        for name in imports_of(path):
            assert not name.startswith(("pipeline.stages", "pipeline.cli")), f"{path} imports {name}"
