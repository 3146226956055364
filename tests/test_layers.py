"""The layers hold: every import between netloupe's packages points down, and no modules
import each other (directly or round a loop).

    contract (errors, the job spec)   <- anyone
    storage                           <- contract
    workers                           <- storage, contract
    dashboards                        <- storage, contract (runs are read through storage)
    pipeline (driver, CLI)            <- all of the above
    netloupe (the Python API)         <- all of the above

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FOLDERS = {"contract": "contract", "storage": "storage", "workers": "workers", "dashboards": "dashboards",
           "pipeline": "pipeline", "netloupe": ""}
"""Repository folder → the package it installs as (``netloupe.<name>``; the API is ``netloupe``)."""

ALLOWED = {
    "contract": {"contract"},
    "storage": {"contract", "storage"},
    "workers": {"contract", "storage", "workers"},
    "dashboards": {"contract", "storage", "dashboards"},
    "pipeline": {"contract", "storage", "workers", "dashboards", "pipeline"},
    "netloupe": {"contract", "storage", "workers", "dashboards", "pipeline", "netloupe"},
}
"""Layer → the layers its modules may import."""


def module_files(root: Path) -> dict[str, Path]:
    """Installed module name → its file, for every module of every layer under ``root``."""
    modules = {}
    for folder, package in FOLDERS.items():
        base = ["netloupe"] + ([package] if package else [])
        for path in sorted((root / folder).glob("*.py")):
            name = base if path.stem == "__init__" else base + [path.stem]
            modules[".".join(name)] = path
    return modules


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "netloupe"


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The netloupe modules ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from netloupe.storage import schema` imports the submodule schema.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "netloupe" or (name == "netloupe" and isinstance(node, ast.Import)):
                found.add(name)
    return found


def old_top_level_imports(path: Path) -> list[str]:
    """Imports of the pre-package names (``pipeline.x``, ``storage.x``...), which no longer exist."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        bad += [n for n in names if n.split(".")[0] in ("pipeline", "workers", "storage", "dashboards", "contract")]
    return bad


def layer_violations(root: Path) -> list[str]:
    """Every import that points up or sideways, and every import cycle, as readable lines."""
    modules = module_files(root)
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    problems = []
    for name, path in modules.items():
        for bad in old_top_level_imports(path):
            problems.append(f"{name} imports {bad!r}: netloupe's packages are netloupe.<layer>")
        for target in sorted(graph[name]):
            if layer_of(target) not in ALLOWED[layer_of(name)]:
                problems.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)}): "
                                f"{layer_of(name)} may import only {sorted(ALLOWED[layer_of(name)])}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in import_cycles(graph)]
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_layers_hold():
    assert layer_violations(ROOT) == []


@pytest.mark.parametrize("planted, expected", [
    ("storage/planted.py", "netloupe.storage.planted (storage) imports netloupe.pipeline.driver (pipeline)"),
    ("dashboards/planted.py", "netloupe.dashboards.planted (dashboards) imports netloupe.pipeline.driver"),
])
def test_a_planted_upward_import_is_found(tmp_path, planted, expected):
    tree = _copy_of_the_layers(tmp_path)
    (tree / planted).write_text("def late():\n    from netloupe.pipeline.driver import run_job\n")
    assert any(line.startswith(expected) for line in layer_violations(tree))


def test_a_planted_cycle_and_an_old_name_are_found(tmp_path):
    tree = _copy_of_the_layers(tmp_path)
    (tree / "storage" / "first.py").write_text("from netloupe.storage import second\n")
    (tree / "storage" / "second.py").write_text("import netloupe.storage.first\nfrom storage import schema\n")
    problems = layer_violations(tree)
    assert "import cycle: netloupe.storage.first -> netloupe.storage.second -> netloupe.storage.first" in problems
    assert "netloupe.storage.second imports 'storage': netloupe's packages are netloupe.<layer>" in problems


def _copy_of_the_layers(tmp_path: Path) -> Path:
    import shutil

    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "sql"))
    return tmp_path
