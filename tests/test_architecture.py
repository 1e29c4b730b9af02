"""The layers the folders show, and dvc.yaml deps that cover every stage's imports.

Imports are read from the source (every `import pipeline...` / `from pipeline... import`,
including the lazy ones inside functions: they run too), so the checks see what would run.
A package whose `__init__` imports its modules by discovery (`pkgutil.iter_modules`, the
method registry and the dataset catalog) counts as importing all of them; except, for the
stages that run one method (RECORDS), the method registry: it imports the one method asked for,
by name, and those stages depend on that method's record instead (the check stage writes the
digests of the method's import closure into it; test_records_cover_each_methods_import_closure).
"""

from __future__ import annotations

import ast
import copy
import re
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


REGISTRY = PKG / "methods" / "__init__.py"
# stages whose method code is a record written by check, not a folder dep (one method per entry)
RECORDS = {"finetune": "data/trials/${item.trial}.json", "evaluate": "data/methods/${item.method}.json"}


def imports_of(path: Path, lazy: bool = False) -> set[str]:
    """The pipeline modules `path` imports (resolved to modules that exist). `lazy`: the method
    registry imports no method by itself (each is its record's)."""
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
    if path.name == "__init__.py" and "pkgutil.iter_modules" in source and not (lazy and path == REGISTRY):
        pkg = module_name(path)
        found |= {module_name(p) for p in path.parent.glob("*.py") if p.name != "__init__.py"}
        found |= {f"{pkg}.{p.parent.name}" for p in path.parent.glob("*/__init__.py")}
    return found


def closure(path: Path, lazy: bool = False) -> set[Path]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in imports_of(p, lazy):
            f = module_file(name)
            if f is not None and f not in seen:
                todo.append(f)
    return {p for p in seen if PKG in p.parents}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def uncovered(stage: dict, entry: Path, lazy: bool = False) -> list[str]:
    """Files in the entry point's import closure that none of the stage's deps covers."""
    deps = [ROOT / d for d in stage.get("deps", [])]
    missing = []
    for f in sorted(closure(entry, lazy) | {entry}):
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
    missing = uncovered(stage, entry_point(stage), lazy=name in RECORDS)
    assert not missing, f"dvc.yaml stage {name!r} imports files its deps do not list: {missing}"
    if name in RECORDS:
        assert RECORDS[name] in stage["deps"], f"{name} runs one method: it depends on the method's record"
        # a module of the closure that walked the registry (METHODS) would import every method
        users = [str(f.relative_to(ROOT)) for f in closure(entry_point(stage), lazy=True)
                 if f != REGISTRY and re.search(r"\bMETHODS\b", f.read_text())]
        assert not users, f"{name} reaches every method through METHODS in {users}; use get_method(name)"


def test_records_cover_each_methods_import_closure():
    """The record of every registered method (what its finetune and evaluate entries depend
    on) holds the digest of every file its module imports, directly or not."""
    from pipeline.methods import METHODS, code_record, module_of

    for name in METHODS:
        record = code_record(name)
        own = closure(module_file(module_of(name)), lazy=True)
        missing = sorted(str(f.relative_to(ROOT)) for f in own if str(f.relative_to(ROOT)) not in record["code"])
        assert not missing, f"{name}'s record lacks {missing}"
        assert f"pipeline/methods/{module_of(name).rsplit('.', 1)[1]}.py" in record["code"]


def test_a_stage_that_runs_one_method_imports_only_that_method():
    """At run time too: the finetune stage's imports plus get_method('dive') load dive's
    closure (dive uses FLYP's loss) and no other method."""
    import subprocess
    import sys

    code = ("import sys, pipeline.stages.finetune, pipeline.stages.evaluate\n"
            "from pipeline.methods import get_method\n"
            "get_method('dive')\n"
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.methods.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert eval(out.stdout.strip().splitlines()[-1]) == [
        "pipeline.methods.base", "pipeline.methods.common", "pipeline.methods.dive", "pipeline.methods.flyp"]


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
            missing = uncovered(cut, entry_point(stage), lazy=name in RECORDS)
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
        if layer_of(path) in ("stages", "cli", "cluster") or path.name == "__main__.py":
            continue
        for name in imports_of(path):
            assert not name.startswith(("pipeline.stages", "pipeline.cli", "pipeline.cluster")), \
                f"{path} imports {name}"
