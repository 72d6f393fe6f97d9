"""The import graph of the ``authz`` package, built statically (ast over ``authz/**/*.py``; an
import anywhere counts: module level, inside a function, under ``if TYPE_CHECKING``): it has no
circle, and no arrow from production code to the development tools. ``authz.cli`` may name the
dev tools only inside the functions that run their subcommands (that parsing ``serve`` loads none
of them is checked in a fresh interpreter: tests/integration/test_cli_imports.py)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "authz"

# The development tools: one package, authz/dev/ (dev IdP, echo backend, devstack, demo).
DEV = ("authz.dev",)
DEV_PATHS = ("dev/__init__.py", "dev/idp/__init__.py", "dev/echo.py", "dev/stack.py", "dev/demo.py")
# authz.cli's functions that may import a dev tool (lazily, for the dev subcommands only).
CLI_DEV_FUNCTIONS = frozenset({"build_parser", "cmd_demo"})


def module_name(path: Path, pkg: Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(
    tree: ast.AST, name: str, is_pkg: bool, modules: set[str]
) -> Iterator[tuple[str, ast.AST]]:
    """(imported authz module, the import node) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub if sub in modules else mod), node


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the ``authz`` modules it imports."""
    paths = {module_name(p, pkg): p for p in pkg.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {t for t, _ in _imports(tree, name, path.name == "__init__.py", modules)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_dev(module: str) -> bool:
    return any(module == d or module.startswith(d + ".") for d in DEV)


def test_the_dev_tools_listed_exist() -> None:
    assert [p for p in DEV_PATHS if not (PKG / p).is_file()] == []


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert "authz.server.lifecycle" in graph["authz.cli"]  # the graph sees lazy imports
    assert cycles(graph) == []


def test_cycles_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_production_imports_no_dev_tool() -> None:
    graph = import_graph()
    arrows = sorted(
        f"{src} -> {dst}"
        for src, dsts in graph.items()
        if not is_dev(src) and src != "authz.cli"
        for dst in dsts
        if is_dev(dst)
    )
    assert arrows == []


def test_cli_imports_dev_tools_only_inside_their_subcommands() -> None:
    path = PKG / "cli.py"
    tree = ast.parse(path.read_text())
    modules = set(import_graph())
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in CLI_DEV_FUNCTIONS:
            allowed |= {id(n) for n in ast.walk(node)}
    dev_imports = [(t, n) for t, n in _imports(tree, "authz.cli", False, modules) if is_dev(t)]
    assert dev_imports  # the demo and dev-idp commands are still there
    assert [(t, getattr(n, "lineno", 0)) for t, n in dev_imports if id(n) not in allowed] == []


# -- module size --------------------------------------------------------------------------------

MAX_LINES = 450
# Over the limit without a reason yet: being reshaped by the transport work of issue 14 (this
# branch must not edit it). Remove the entry when it is split or gains its "Size:" line.
SIZE_PENDING = frozenset({"authz/server/http.py"})


def test_every_big_module_says_why_at_its_top() -> None:
    """A module over ~450 lines carries a one-line ``Size:`` reason in its docstring."""
    unexplained = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        if "_proto" in path.parts or rel in SIZE_PENDING or text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Size: ") for line in doc.splitlines()):
            unexplained.append(rel)
    assert unexplained == []
