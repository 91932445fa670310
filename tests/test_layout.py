"""The package's shape, checked from its source: arrows one way, collectives named in one place, short
functions. (What a reader relies on when they open a module.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tiltlm"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter",
               "all_to_all", "gather", "scatter", "reduce"}


def modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_collectives_are_called_only_from_collectives_py():
    """Every rank must reach each collective in the same order; they live in one module and are called by
    name, never as a side effect of another helper (torch.distributed's own calls appear nowhere else)."""
    found = []
    for path, tree in modules():
        if path.name == "collectives.py":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("dist", "distributed")):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not found, found


def test_the_library_never_imports_a_command_module():
    imports = []
    for path, tree in modules():
        if "commands" in path.parts or path.name == "cli.py":
            continue
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            imports += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in names
                        if name.startswith("tiltlm.commands") or name == "tiltlm.cli"]
    assert not imports, imports
