"""The shape the code's own imports show (docs/architecture.md): checked, not promised.

- no import circle inside ``chresilient/``, imports under ``TYPE_CHECKING`` and inside
  functions included;
- the core never imports a service, the pool never imports the core above it;
- no module uses another module's ``_private`` names;
- small modules: ``manager.py`` at most 350 lines, no module over 450 (the test harness in
  ``chresilient/testing`` aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "chresilient"
HARNESS = "chresilient.testing"

# Layers from the bottom up: a module may import its own layer or any layer below.
LAYERS: list[set[str]] = [
    {"errors", "fork", "metrics", "events"},
    {"config", "statement", "config_values"},
    {"server", "breaker", "retry", "state", "connection", "driver_args", "tracing", "handoff"},
    {"pool"},
    {"hosts"},
    {"executor", "startup"},
    {"spool", "health", "observability", "ingest", "schema", "delivery", "prometheus", "reports"}
    | {"progress"},
    {"spool_setup"},
    {"manager"},
    {"client", "sqlalchemy", "checks", "cli", "cli_spool", "contrib", "testing"}
    | {"__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def imported(name: str, path: Path, tree: ast.Module) -> set[tuple[str, str]]:
    """(module, imported name) pairs for every chresilient import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(a.name, "") for a in node.names if a.name.startswith("chresilient")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("chresilient"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if node.module is None or submodule in MODULES:
                    found.add((submodule, ""))
                else:
                    found.add((target, alias.name))
    return found


MODULES = modules()
GRAPH = {
    name: {target for target, _ in imported(name, path, tree) if target in MODULES}
    for name, (path, tree) in MODULES.items()
}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    for index, names in enumerate(LAYERS):
        if top(name) in names:
            return index
    raise AssertionError(f"{name} is in no layer of LAYERS: place it")


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer(name)


def test_no_import_circle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_imports_point_down() -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(name) and not name.startswith(HARNESS)
    ]
    assert not upward, "imports that point up a layer: " + ", ".join(sorted(upward))


def _defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
    for node in ast.walk(tree):  # __slots__ entries (only: other strings define nothing)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                names |= {
                    c.value
                    for c in ast.walk(node.value or ast.Constant(None))
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                }
    return names


# The standard library's own "private" names that are its public API.
STDLIB_PRIVATE = {"_exit", "_at_fork_reinit"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in STDLIB_PRIVATE


def test_no_module_uses_another_modules_private_names() -> None:
    problems = []
    for name, (path, tree) in MODULES.items():
        for target, imported_name in imported(name, path, tree):
            if _is_private(imported_name) or _is_private(target.rpartition(".")[2]):
                problems.append(f"{name} imports {target}.{imported_name}")
        own = _defined_names(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and node.attr not in own
            ):
                problems.append(f"{name}:{node.lineno} uses .{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(HARNESS)))
def test_modules_are_small(name: str) -> None:
    path, _ = MODULES[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    # The facade keeps the public signatures and their docstrings; everything else is wired.
    limit = 350 if name == "chresilient.manager" else 450
    assert lines <= limit, f"{path.name}: {lines} lines (limit {limit}): split it"


def test_no_test_reads_a_private_name_of_the_library() -> None:
    """Tests go through the public API or a seam the architecture provides (a pure
    selector, events, an injected clock): a test on internals breaks on every refactor."""
    problems = []
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = _defined_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chresilient"):
                problems += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                             if _is_private(a.name)]  # fmt: skip
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and node.attr not in own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                problems.append(f"{path.name}:{node.lineno} reads .{node.attr}")
    assert not problems, "\n".join(problems)
