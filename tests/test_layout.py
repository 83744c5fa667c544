"""The import graph flows one way: entry points -> services -> core, read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "emnist_exp"
BENCHMARKS = PACKAGE.parent / "benchmarks"

ENTRY_POINTS = {"train", "ensemble", "evaluate", "predict", "report", "stores", "distill"}
SERVICES = {"tracking", "study", "objective", "storage", "serving", "search", "config", "console", "members",
            "assembly", "reporting", "ensemble_model", "distillation"}  # ensemble_model: the file MLflow runs to make the ensemble pyfunc (serving's)
# Everything else is core, a module added later included: it has to earn a place above.
CORE_FORBIDDEN = {"optuna", "mlflow", "optuna_integration"}


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module a file imports, at the top or inside functions, as absolute dotted names."""
    package = module_name(path, root).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            # `from emnist_exp import tracking` imports the module emnist_exp.tracking
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def room(module: str) -> str:
    """entry, service or core, by the module's first name below the package (builders/* are core)."""
    short = module.split(".")[1] if module.count(".") else ""
    if short in ENTRY_POINTS:
        return "entry"
    if short in SERVICES:
        return "service"
    return "core"


def project_modules(names: set[str]) -> set[str]:
    """The project's rooms among imported names: emnist_exp.<room> (a name imported from a room counts as it)."""
    return {".".join(n.split(".")[:2]) for n in names if n.startswith("emnist_exp.")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, names in edges.items():
        kind = room(module)
        for target in sorted(project_modules(names)):
            to = room(target)
            if kind == "core" and to != "core":
                found.append(f"core {module} imports {to} {target}")
            elif kind == "service" and to == "entry":
                found.append(f"service {module} imports entry point {target}")
            elif kind == "entry" and to == "entry" and target != module:
                found.append(f"entry point {module} imports entry point {target}")
        if kind == "core":
            found += [f"core {module} imports {n}" for n in sorted(names) if n.split(".")[0] in CORE_FORBIDDEN]
    return found


def test_imports_flow_from_entry_points_to_services_to_core():
    edges = graph()
    assert {"emnist_exp.spec", "emnist_exp.model", "emnist_exp.tracking.runs", "emnist_exp.builders.idx"} <= set(edges)
    assert violations(edges) == []


TRACKING = PACKAGE / "tracking"
TRACKING_MAX_LINES = 300  # a room past this is collecting a second noun


def tracking_rooms() -> dict[str, set[str]]:
    """Each room of the tracking package, with the other rooms of the package it imports."""
    return {p.stem: {n.split(".")[2] for n in imported(p) if n.startswith("emnist_exp.tracking.")} - {p.stem}
            for p in sorted(TRACKING.glob("*.py")) if p.stem != "__init__"}


def cycles(edges: dict[str, set[str]]) -> list[str]:
    """The rooms that can reach themselves through imports (depth-first, one report per room)."""
    found = []
    for start in edges:
        seen, stack = set(), list(edges[start])
        while stack:
            room_ = stack.pop()
            if room_ == start:
                found.append(start)
                break
            if room_ not in seen:
                seen.add(room_)
                stack.extend(edges.get(room_, ()))
    return found


def test_tracking_is_a_package_of_small_rooms_without_cycles():
    """MLflow code lives in emnist_exp/tracking/, one noun per room: callers import the room they need, and the
    package's own __init__ holds no code for them to reach through."""
    assert not (PACKAGE / "tracking.py").exists()
    rooms = tracking_rooms()
    assert {"store", "experiments", "runs", "datasets", "models", "queries"} <= set(rooms)
    assert cycles(rooms) == []
    init = ast.parse((TRACKING / "__init__.py").read_text())
    assert all(isinstance(node, ast.Expr) for node in init.body), "tracking/__init__.py holds only its docstring"
    sizes = {p.name: len(p.read_text().splitlines()) for p in TRACKING.glob("*.py")}
    assert max(sizes.values()) <= TRACKING_MAX_LINES, sizes


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"runs": {"models"}, "models": {"runs"}, "tags": set()}) == ["runs", "models"]
    assert cycles({"runs": {"tags"}, "tags": set()}) == []


def test_benchmarks_import_no_entry_point():
    found = [f"{p.name} imports {n}" for p in sorted(BENCHMARKS.glob("*.py"))
             for n in sorted(project_modules(imported(p))) if room(n) == "entry"]
    assert found == []


def test_the_check_catches_each_kind_of_wrong_import():
    """The rules fire on each wrong edge, and a module nobody classified counts as core."""
    edges = {
        "emnist_exp.voting": {"emnist_exp.tracking"},  # core -> service
        "emnist_exp.model": {"optuna.trial"},  # core -> optuna
        "emnist_exp.tracking": {"emnist_exp.predict"},  # service -> entry point
        "emnist_exp.predict": {"emnist_exp.evaluate", "emnist_exp.predict"},  # entry -> entry (itself is fine)
        "emnist_exp.newcomer": {"mlflow"},  # not listed anywhere: core
    }
    assert violations(edges) == [
        "core emnist_exp.voting imports service emnist_exp.tracking",
        "core emnist_exp.model imports optuna.trial",
        "service emnist_exp.tracking imports entry point emnist_exp.predict",
        "entry point emnist_exp.predict imports entry point emnist_exp.evaluate",
        "core emnist_exp.newcomer imports mlflow",
    ]


def test_imports_inside_functions_and_relative_ones_are_read(tmp_path):
    source = tmp_path / "emnist_exp" / "builders" / "thing.py"
    source.parent.mkdir(parents=True)
    source.write_text("import numpy\n\ndef f():\n    from emnist_exp import tracking\n    import mlflow.pyfunc\n"
                      "    from .. import predict\n    from .idx import x\n")
    assert imported(source, tmp_path) == {"numpy", "emnist_exp", "emnist_exp.tracking", "mlflow.pyfunc",
                                          "emnist_exp.predict", "emnist_exp.builders.idx",
                                          "emnist_exp.builders.idx.x"}
