"""The shape rules of STYLE.md, enforced: the pure core imports no transport, metrics or network
code; only server/ touches generated protobuf code; production never imports the dev IdP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "authz"

PURE = [
    *sorted((PKG / "policy").glob("*.py")),
    PKG / "identity" / "bearer.py",
    PKG / "identity" / "entra.py",
    PKG / "identity" / "cache.py",
    PKG / "engine.py",
    PKG / "config.py",
]
FORBIDDEN_IN_PURE = (
    "grpc",
    "prometheus_client",
    "asyncio",
    "httpx",
    "socket",
    "urllib.request",
    "http.client",
    "aiohttp",
    "redis",
    "authz.state",
    "authz._proto",
    "authz.server",
    "authz.dev",
)
PRODUCTION = [
    p
    for p in PKG.rglob("*.py")
    if "_proto" not in p.parts and "dev" not in p.relative_to(PKG).parts and p.name != "cli.py"
]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _hits(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_has_no_io_imports(path: Path) -> None:
    assert path.exists(), path
    assert _hits(imports_of(path), FORBIDDEN_IN_PURE) == []


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(ROOT)))
def test_production_never_imports_the_dev_idp(path: Path) -> None:
    assert _hits(imports_of(path), ("authz.dev.idp", "authz.dev.stack", "authz.dev.demo")) == []


def test_only_server_touches_generated_protobuf() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if "_proto" not in p.parts
        and p.parent.name != "server"
        and p.name != "_protogen.py"
        and _hits(imports_of(p), ("authz._proto",))
    ]
    assert offenders == []


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if "_proto" not in p.parts and ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert missing == []
