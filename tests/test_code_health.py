"""The code stays lint-clean, type-checked and layered: ruff and mypy run as part of the
suite (so CI fails on a regression), and the packages import each other in one direction
only (DESIGN.md: server -> services -> engine/storage; engine and storage never import each
other; the native twins import nothing of ours)."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "lollms_fast"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: it is part of the [test] extra")
    return found


def test_ruff_is_clean() -> None:
    run = subprocess.run([_tool("ruff"), "check", "src", "tests", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_is_clean() -> None:
    # the settings (strict, files = src) are in pyproject.toml
    run = subprocess.run([_tool("mypy")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _modules(package: Path = PACKAGE) -> list[tuple[str, Path]]:
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _unit(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Names of the package's modules that `module` imports (type-only imports too)."""
    root = module.split(".")[0]
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {name for name in found if name in known and name != root}


def _layer_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Which layer imports which (edges inside one layer left out)."""
    modules = _modules(package)
    known = {m for m, _ in modules}
    graph: dict[str, set[str]] = {}
    for module, path in modules:
        if module == package.name:
            continue
        src = _unit(module)
        for target in _imported(module, path, known):
            if _unit(target) != src:
                graph.setdefault(src, set()).add(_unit(target))
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_imports() -> None:
    for module, _ in _modules():
        if not module.endswith("__main__"):
            importlib.import_module(module)


def test_no_import_cycle_between_packages() -> None:
    cycle = _find_cycle(_layer_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_layers_point_downward() -> None:
    graph = _layer_graph()
    assert "storage" not in graph.get("engine", set())
    assert "engine" not in graph.get("storage", set())
    assert not graph.get("_native"), graph.get("_native")
    for unit, targets in graph.items():
        if "server" in targets:
            assert unit in ("app", "cli"), f"{unit} imports the server layer"
        if "services" in targets:
            assert unit in ("app", "cli", "server"), f"{unit} imports the services layer"


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    root = tmp_path / "lollms_fast"
    for folder in ("engine", "services"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("", encoding="utf-8")
    (root / "__init__.py").write_text("", encoding="utf-8")
    (root / "engine" / "x.py").write_text("from ..services import chat\ny = 1\n")
    (root / "services" / "chat.py").write_text("from ..engine.x import y\n")
    graph = _layer_graph(root)
    assert graph == {"engine": {"services"}, "services": {"engine"}}
    assert _find_cycle(graph) == ["engine", "services", "engine"]
