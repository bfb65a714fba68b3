"""The package's shape: no module imports one that imports it back, no module grows too long.

Imports are read with `ast`, at every level (a function-local import closes a cycle as
surely as a top-level one, it only hides it until that function runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "normbench"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def internal_imports(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The normbench modules that module `name` (whose text is `source`) imports, at any
    level. `from normbench.x import y` names normbench.x.y when that is a module, else
    normbench.x."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")  # the deepest normbench module the dotted name reaches
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): internal_imports(p.read_text(), module_name(p),
                                             p.name == "__init__.py", modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walker_sees_imports_inside_functions_and_finds_a_cycle():
    modules = {"normbench", "normbench.engine.train", "normbench.data", "normbench.data.images",
               "normbench.engine.evaluation"}
    source = ("import os\nfrom normbench.data import images\nfrom . import train\n"
              "def f():\n    from normbench.engine.train import evaluate\n"
              "    import normbench.data\n")
    assert internal_imports(source, "normbench.engine.evaluation", False, modules) == {
        "normbench.data.images", "normbench.engine.train", "normbench.data"}
    graph = {"normbench.a": {"normbench.b"}, "normbench.b": {"normbench.c"},
             "normbench.c": {"normbench.a"}, "normbench.d": set()}
    assert find_cycle(graph) == ["normbench.a", "normbench.b", "normbench.c", "normbench.a"]
    assert find_cycle({"normbench.a": {"normbench.b"}, "normbench.b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "normbench.engine.train" in graph and graph["normbench.engine.train"], "the walk found nothing"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_is_over_the_length_limit():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_the_cli_and_the_config_package_import_hydra():
    # What normbench/cli.py's docstring says: everything else gets plain dicts.
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("hydra", "hydra_plugins") for n in names):
                found.add(module_name(path))
    assert "normbench.cli" in found, "the walk found nothing"
    assert {m for m in found if m != "normbench.cli" and not m.startswith("normbench.config.")} \
        == set()
