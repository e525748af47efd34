"""The package's shape, read from its own imports (docs/architecture.md).

Every import of ``src/estimax`` runs down the layers, no two modules import each other through
any chain, no module is over 600 lines, and an import inside a function is only where the
command's start-up time needs it (with a comment saying so)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "estimax"

#: layer of each top-level part, bottom up (docs/architecture.md)
LAYERS = {"_errors": 0, "runtime": 1, "dsl": 2, "transforms": 3, "objectives": 4, "testing": 4,
          "solvers": 5, "text": 6, "cli": 7, "__init__": 7, "__main__": 7, "tracking": 7}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = ["estimax", *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def imports(name: str, path: Path, known) -> list[tuple[str, ast.AST]]:
    """The estimax modules ``name`` imports, with the import statement (every statement,
    those inside functions too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # the longest module the name names
                t = t.rpartition(".")[0]
            if t and t not in (name, "estimax"):
                found.append((t, node))
    return found


def test_every_import_runs_down_the_layers():
    mods = modules()
    upward = sorted({(a, b) for a, f in mods.items() for b, _ in imports(a, f, mods) if layer(b) > layer(a)})
    assert not upward, "imports that run up the layers:\n" + "\n".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_circles():
    mods = modules()
    graph = {a: {b for b, _ in imports(a, f, mods)} for a, f in mods.items()}
    try:
        order = tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"an import circle: {' -> '.join(e.args[1])}")
    assert set(order) == set(graph)


def test_no_module_over_600_lines():
    sizes = {str(f.relative_to(ROOT)): len(f.read_text(encoding="utf-8").splitlines()) for f in modules().values()}
    long = {p: n for p, n in sizes.items() if n > 600}
    assert not long, f"modules over 600 lines: {long}"


def test_imports_inside_functions_say_why():
    """The command imports JAX and the library lazily so that ``--help`` and usage errors are
    fast, and an optional dependency is imported where it is used; each such import says so
    in a comment on its line or the two above. Any other import inside a function hides an
    arrow: it belongs at the top of the module."""
    hidden = []
    for path in modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    said = " ".join(lines[max(0, inner.lineno - 3): inner.lineno]).lower()
                    if not any(word in said for word in ("start-up", "startup", "optional")):
                        hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not hidden, "imports inside functions (move them to the top of the module):\n" + "\n".join(hidden)
