"""Static checks of deploy/Dockerfile (no docker needed): a multi-stage build whose final stage
runs ``authz`` as a numeric non-root user, with a HEALTHCHECK, no build tools, no key material,
and root-owned (read-only to the runtime user) application files. The build context is kept to
an allowlist by /.dockerignore."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

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
    # pip itself does not ship in the runtime venv.
    assert "pip uninstall -y pip" in builder


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
    assert allowed == {"pyproject.toml", "README.md", "authz"}
    # What the builder copies is inside the allowlist.
    sources = set()
    for stage in _stages()[:-1]:
        for ins in stage:
            if ins.keyword == "COPY" and not ins.args.startswith("--from"):
                sources.update(p.rstrip("/") for p in ins.args.split()[:-1])
    assert sources <= allowed
