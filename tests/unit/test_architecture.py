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


# ------------------------------------------------------- tests/unit holds the pure core only
# A unit test starts no process, opens no socket and runs no server: those are tests/integration
# (our servers on 127.0.0.1), tests/artefacts (shipped files checked with real tools) and
# tests/e2e. Enforced on what a unit test file imports (async tests on pytest's loop are fine: it
# is the servers, sockets and processes that are not).
UNIT = ROOT / "tests" / "unit"
FORBIDDEN_IN_UNIT = (
    "subprocess",
    "multiprocessing",
    "socket",
    "socketserver",
    "asyncio",
    "http.server",
    "http.client",
    "urllib.request",
    "grpc",
    "httpx",
    "redis",
    "authz.server.app",
    "authz.server.http",
    "authz.server.servicer",
    "authz.server.workers",
    "authz.dev",
)
# The dev IdP's token and key builders are pure (the attack suite's tokens come from them).
ALLOWED_IN_UNIT = ("authz.dev.idp.keys", "authz.dev.idp.tokens")


def imported_names(path: Path) -> set[str]:
    """Every import, anywhere in the file, as a dotted name (``from authz.dev import stack`` is
    ``authz.dev.stack``, ``from socket import socket`` is ``socket.socket``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def unit_offences(path: Path) -> list[str]:
    names = {
        n
        for n in imported_names(path)
        if not any(n == a or n.startswith(a + ".") for a in ALLOWED_IN_UNIT)
    }
    return _hits(names, FORBIDDEN_IN_UNIT)


@pytest.mark.parametrize("path", sorted(UNIT.glob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_unit_tests_start_no_process_socket_or_server(path: Path) -> None:
    assert unit_offences(path) == []


UNIT_RULE_CASES = [
    ("module", "import subprocess", ["subprocess"]),
    ("from-import", "from socket import socket", ["socket.socket"]),
    ("dev-stack", "from authz.dev import stack", ["authz.dev.stack"]),
    ("lazy", "def f():\n    from authz.dev.stack import free_port", ["authz.dev.stack.free_port"]),
    ("submodule", "import asyncio.subprocess", ["asyncio.subprocess"]),
    ("dev-idp-package", "import authz.dev.idp", ["authz.dev.idp"]),
    ("dev-idp-server", "from authz.dev.idp import DevIdP", ["authz.dev.idp.DevIdP"]),
    ("pure-dev-idp-module", "from authz.dev.idp import keys", []),
    ("pure-dev-idp-name", "from authz.dev.idp.tokens import mint", []),
    ("pure-server-helper", "from authz.server.ports import plan_listens", []),
]


@pytest.mark.parametrize(
    ("source", "offences"), [c[1:] for c in UNIT_RULE_CASES], ids=[c[0] for c in UNIT_RULE_CASES]
)
def test_the_unit_rule_sees_every_kind_of_import(
    source: str, offences: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "test_x.py"
    path.write_text(source + "\n")
    assert unit_offences(path) == offences
