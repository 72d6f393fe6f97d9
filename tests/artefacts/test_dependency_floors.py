"""pyproject's dependency ranges admit what the generated code needs, and requirements.lock (the
tested set that make, CI and the Dockerfile install) pins, with hashes, versions inside them."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "authz" / "_proto"


def declared() -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [
        *project["dependencies"],
        *(r for x in project["optional-dependencies"].values() for r in x),
    ]
    out: dict[str, SpecifierSet] = {}
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        out[name] = out.get(name, SpecifierSet()) & req.specifier
    return out


def locked() -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) from requirements.lock."""
    text = (ROOT / "requirements.lock").read_text()
    out = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;\\]+)", block)
        if m:
            out[canonicalize_name(m.group(1))] = (
                Version(m.group(2)),
                block.count("--hash=sha256:"),
            )
    return out


def protobuf_needed() -> Version:
    """The highest ValidateProtobufRuntimeVersion(domain, major, minor, patch, ...) generated."""
    found = []
    for path in PROTO.rglob("*_pb2.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "ValidateProtobufRuntimeVersion"
            ):
                major, minor, patch = (ast.literal_eval(a) for a in node.args[1:4])
                found.append(Version(f"{major}.{minor}.{patch}"))
    assert found
    return max(found)


def grpc_needed() -> Version:
    found = [
        Version(m.group(1))
        for path in PROTO.rglob("*_pb2_grpc.py")
        if (m := re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.M))
    ]
    assert found
    return max(found)


def floor(spec: SpecifierSet) -> Version:
    (low,) = [Version(s.version) for s in spec if s.operator in (">=", "==")]
    return low


def test_protobuf_range_admits_only_what_the_generated_code_runs_on() -> None:
    need = protobuf_needed()
    spec = declared()["protobuf"]
    assert floor(spec) >= need
    assert Version(f"{need.major + 1}.0") not in spec  # a new major is refused by the runtime check


@pytest.mark.parametrize(
    "name", ["grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools"]
)
def test_grpc_floors_match_the_generated_code(name: str) -> None:
    assert floor(declared()[name]) >= grpc_needed()


def test_every_locked_version_is_inside_the_declared_ranges() -> None:
    lock = locked()
    for name, spec in declared().items():
        assert name in lock, f"{name} is declared but not locked: run `make lock`"
        version, _ = lock[name]
        assert version in spec, f"{name}=={version} is locked, pyproject wants {spec}"
    assert all(hashes > 0 for _, hashes in lock.values())
    assert "redis" in lock
    assert "hiredis" in lock


def test_installed_versions_are_the_locked_ones() -> None:
    """The floors import: what runs the tests is the locked set (make installs it)."""
    from importlib.metadata import version

    lock = locked()
    for name in ("protobuf", "grpcio", "httpx", "redis", "pyyaml", "pydantic"):
        assert Version(version(name)) == lock[name][0], name
    from authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: F401
