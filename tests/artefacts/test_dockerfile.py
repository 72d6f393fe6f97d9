"""Static checks of deploy/Dockerfile (no docker, no registry needed: CI runs them): a
multi-stage build from a digest-pinned base whose builder installs exactly the hashed lock file
(``--no-deps --require-hashes``) and then the project ``--no-deps``; a final stage without pip,
setuptools or wheel that carries its bill of materials and runs ``authz`` as a numeric non-root
user, with a HEALTHCHECK, no build tools, no key material, and root-owned (read-only to the
runtime user) application files. The build context is kept to
an allowlist by /.dockerignore."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev)\b")
SECRET_FILES = re.compile(r"(\.pem|\.key|\.p12|\.pfx|id_rsa|\.env\b|secret)", re.IGNORECASE)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment and blank lines dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continuation is dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


@cache
def _stages() -> list[list[Instruction]]:
    """Instructions per stage: each list starts with its FROM (global ARGs before are dropped)."""
    stages: list[list[Instruction]] = []
    for ins in _instructions(DOCKERFILE.read_text()):
        if ins.keyword == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
    return stages


def _final() -> list[Instruction]:
    return _stages()[-1]


def _only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected exactly one {keyword} in the final stage, got {found}"
    return found[0]


def test_multi_stage_build() -> None:
    stages = _stages()
    assert len(stages) >= 2
    names = [s[0].args.split()[-1] for s in stages[:-1]]
    assert "builder" in names
    # The final stage takes the venv from the builder, nothing from outside the build.
    copies = [i.args for i in _final() if i.keyword in ("COPY", "ADD")]
    assert copies == ["--from=builder /opt/entra-authz /opt/entra-authz"]


def test_final_stage_runs_as_numeric_non_root_user() -> None:
    final = _final()
    user = _only(final, "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user!r}: a name cannot be checked by runAsNonRoot"
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    # The user is created in the same stage with that uid/gid.
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert f"--uid {uid}" in runs
    assert f"--gid {gid}" in runs
    # USER comes before what runs: the healthcheck and the entrypoint.
    keywords = [i.keyword for i in final]
    assert keywords.index("USER") < keywords.index("HEALTHCHECK")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_healthcheck_probes_the_admin_healthz() -> None:
    final = _final()
    check = _only(final, "HEALTHCHECK").args
    assert check != "NONE"
    options, _, command = check.partition(" CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = json.loads(command)  # exec form: no shell needed (the slim image has no curl)
    assert argv[0] == "python"
    assert "/healthz" in argv[-1]
    assert "AUTHZ_ADMIN_LISTEN" in argv[-1]
    exposed = {p for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {"9001", "9002", "9090"} <= exposed


def test_entrypoint_runs_authz() -> None:
    final = _final()
    entrypoint = json.loads(_only(final, "ENTRYPOINT").args)  # exec form: signals reach authz
    assert entrypoint == ["authz"]
    cmd = json.loads(_only(final, "CMD").args)
    assert cmd[0] == "serve"
    assert "--config" in cmd
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["authz"] == "authz.cli:main"
    # The venv holding the script is on PATH.
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "PATH=/opt/entra-authz/bin:" in env


def test_final_stage_installs_no_build_tools() -> None:
    for ins in _final():
        if ins.keyword == "RUN":
            assert not COMPILERS.search(ins.args), ins.args
    # The builder installs wheels only: no sdist is compiled there either.
    builder = " ".join(i.args for s in _stages()[:-1] for i in s if i.keyword == "RUN")
    assert "--only-binary=:all:" in builder


def _builder_commands() -> list[str]:
    """The builder's RUN commands split at ``&&``, whitespace normalised."""
    runs = [i.args for s in _stages()[:-1] for i in s if i.keyword == "RUN"]
    return [" ".join(c.split()) for run in runs for c in run.split("&&")]


def test_dependencies_come_from_the_hashed_lock_file_only() -> None:
    cmds = _builder_commands()
    installs = [c for c in cmds if " install " in f" {c} "]
    (from_lock,) = [c for c in installs if "-r requirements.lock" in c]
    assert "--no-deps" in from_lock
    assert "--require-hashes" in from_lock
    assert "--only-binary=:all:" in from_lock
    # The project after it, without resolving anything: its dependencies are the lock's.
    others = [c for c in installs if c is not from_lock]
    assert others
    assert all("--no-deps" in c for c in others), others
    assert installs.index(from_lock) < installs.index(others[0])
    assert any(
        i.args.split()[0] == "requirements.lock" for i in _stages()[0] if i.keyword == "COPY"
    )


def test_no_pip_setuptools_or_wheel_in_the_runtime_image() -> None:
    cmds = _builder_commands()
    (venv,) = [c for c in cmds if " -m venv " in f" {c} "]
    assert "--without-pip" in venv  # the copied venv never had pip
    final_runs = " ".join(" ".join(i.args.split()) for i in _final() if i.keyword == "RUN")
    assert "pip uninstall -y pip setuptools wheel" in final_runs  # the base image's own
    # and nothing installs anything afterwards
    assert " install " not in final_runs.replace("pip uninstall", "")


def test_the_image_carries_its_bill_of_materials() -> None:
    cmds = " ; ".join(_builder_commands())
    assert "cp requirements.lock /opt/entra-authz/share/entra-authz/requirements.lock" in cmds
    assert "freeze --all > /opt/entra-authz/share/entra-authz/pip-freeze.txt" in cmds


def test_base_image_is_pinned_by_digest_and_overridable() -> None:
    text = DOCKERFILE.read_text()
    (arg,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", arg), arg
    froms = [s[0].args.split()[0] for s in _stages()]
    assert froms == ["${PYTHON_IMAGE}"] * len(froms)  # a mirror replaces every stage's base


LOCK = ROOT / "requirements.lock"


@pytest.mark.skipif(not LOCK.exists(), reason="requirements.lock not there yet (another branch)")
def test_lock_file_pins_every_runtime_dependency_with_hashes() -> None:
    """The file the image is built from: every requirement exact (==) and hashed, and every
    runtime dependency of pyproject.toml in it."""
    text = LOCK.read_text().replace("\\\n", " ")
    reqs = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    names = set()
    for req in reqs:
        spec = req.split(";")[0].split("--hash")[0].strip()
        assert "==" in spec, req
        assert "--hash=sha256:" in req, req
        names.add(re.sub(r"[-_.]+", "-", spec.split("==")[0].split("[")[0]).lower())
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if "sys_platform == 'win32'" in dep and "!=" not in dep:
            continue
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]).lower()
        assert name in names, f"{name} missing from requirements.lock"


def test_no_key_material_is_copied() -> None:
    for stage in _stages():
        for ins in stage:
            if ins.keyword in ("COPY", "ADD"):
                assert not SECRET_FILES.search(ins.args), ins.args
            if ins.keyword == "ADD":
                raise AssertionError(f"ADD fetches or unpacks; use COPY: {ins.args}")


def test_application_files_are_not_owned_by_the_runtime_user() -> None:
    # Root-owned venv: the non-root process cannot rewrite its own code.
    for ins in _final():
        if ins.keyword == "COPY":
            assert "--chown" not in ins.args
            assert "--chmod" not in ins.args


def test_build_context_is_an_allowlist() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "README.md", "authz"}
    # What the builder copies is inside the allowlist.
    sources = set()
    for stage in _stages()[:-1]:
        for ins in stage:
            if ins.keyword == "COPY" and not ins.args.startswith("--from"):
                sources.update(p.rstrip("/") for p in ins.args.split()[:-1])
    assert sources <= allowed
