"""The shape of the router package: no module imports another in a circle, and no file is longer
than MAX_LINES.

Every `router.*` import counts, wherever it is written: at module level, inside a function, or under
`if TYPE_CHECKING:` (a circle a type checker has to break is still a circle a reader has to). Relative
imports and `from router.x import y` (y a module or a name) are resolved to the module they load.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parents[2] / "router"
MAX_LINES = 450

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = ROUTER) -> str:
    """`router/scheduler/queue.py` → `router.scheduler.queue`; a package's `__init__.py` → its name."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (the text of `module`) imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from router.x import y`: y is the module router.x.y when there is one, else a name in router.x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import router.a.b` with only router.a known, ...
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ROUTER) -> Graph:
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imported_modules(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts (`[a, b, a]`), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif child in on_path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                on_path.add(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


# ------------------------------------------------------------------------------ the finder itself


def test_find_cycle_reports_the_cycle_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_find_cycle_accepts_a_dag():
    # A diamond: d is reached twice but is no cycle.
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({}) is None


def test_imports_are_resolved_to_modules():
    known = {"router", "router.events", "router.request", "router.tracing", "router.grammar",
             "router.grammar.native", "router.grammar.validator"}
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import json\n"
        "from router import events\n"  # a module through its package
        "from router.grammar import native\n"
        "from .validator import GrammarValidator\n"  # relative, a name in a module
        "from .. import tracing\n"  # two levels up
        "if TYPE_CHECKING:\n"
        "    from router.request import Entry\n"
        "def late():\n"
        "    import router.grammar.native\n"  # function level counts too
    )
    found = imported_modules(source, "router.grammar.worker", False, known)
    assert found == {"router.events", "router.grammar.native", "router.grammar.validator", "router.tracing",
                     "router.request"}
    # In a package's __init__, `.` is the package itself.
    assert imported_modules("from .native import x\n", "router.grammar", True, known) == {"router.grammar.native"}


def test_a_cycle_in_files_is_found(tmp_path):
    package = tmp_path / "router"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from router.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n")
    assert find_cycle(import_graph(package)) == ["router.a", "router.sub.b", "router.a"]


# ------------------------------------------------------------------------------ the real package


def test_router_imports_no_module_in_a_circle():
    graph = import_graph()
    assert "router.request" in graph and len(graph) > 40  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("path", sorted(ROUTER.rglob("*.py")), ids=lambda p: str(p.relative_to(ROUTER)))
def test_router_files_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROUTER.parent)} has {lines} lines; split it by responsibility"
