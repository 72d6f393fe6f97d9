"""The documentation tells the truth where a machine can check it:

- every shell block (```sh / ```bash / ```shell) of README.md, docs/ and deploy/ runs as written,
  unless the line before it says why it cannot run here: ``<!-- not-run: reason -->`` (a cluster,
  a Docker engine, Azure, minutes of benchmark). Blocks run with bash ``-euo pipefail`` in a copy
  of the repository (they may write files), with ``.venv/bin`` reachable as in the repository;
- every relative link points at a file that exists, and every ``#anchor`` at a heading there;
- the TLS example of docs/deploy.md, inserted into the rendered ingress with a fresh self-signed
  certificate, passes the real Envoy's ``--mode validate``;
- the demo's "mint your own" hint names an ``authz`` that runs from the repository as printed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from authz.dev import stack as devstack
from authz.dev.certs import DevCA
from authz.dev.demo import authz_command
from authz.envoyconf import defaults, render

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z0-9_-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```",
    re.S | re.M,
)
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
SHELL = {"sh", "bash", "shell"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    marker: str | None  # the not-run reason, if any

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    return sorted(
        [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deploy").rglob("*.md")]
    )


@cache
def blocks() -> tuple[Block, ...]:
    out = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
            marker = NOT_RUN.match(before[-1]) if before else None
            indent = m.group("indent")
            body = "\n".join(ln.removeprefix(indent) for ln in m.group("body").splitlines())
            reason = marker.group("reason").strip() if marker else None
            out.append(Block(path, line, m.group("lang"), body, reason))
    return tuple(out)


def shell_blocks(*, runnable: bool) -> list[Block]:
    return [b for b in blocks() if b.lang in SHELL and (b.marker is None) == runnable]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository without .git/.venv/caches, and .venv linked to this interpreter's venv."""
    dest = tmp_path_factory.mktemp("repo") / "entra-authz"
    ignore = shutil.ignore_patterns(".git", ".venv", "*cache*", "__pycache__", ".coverage*")
    shutil.copytree(ROOT, dest, ignore=ignore)
    (dest / ".venv").symlink_to(VENV_BIN.parent)
    return dest


def test_the_docs_have_runnable_and_marked_blocks() -> None:
    assert len(shell_blocks(runnable=True)) >= 3
    for block in shell_blocks(runnable=False):
        assert block.marker, f"{block.id}: say why it cannot run: <!-- not-run: reason -->"


@pytest.mark.parametrize("block", shell_blocks(runnable=True), ids=lambda b: b.id)
def test_shell_block_runs_as_written(block: Block, repo_copy: Path) -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.body],
        cwd=repo_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"{block.id} failed ({result.returncode}); mark it <!-- not-run: reason --> if it "
        f"cannot run here.\n{block.body}\n--- stdout\n{result.stdout[-2000:]}\n"
        f"--- stderr\n{result.stderr[-2000:]}"
    )


def _slug(heading: str) -> str:
    """GitHub's heading anchor."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = FENCE.sub("", text)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_relative_links_resolve() -> None:
    broken = []
    for path in markdown_files():
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:: not checked offline
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _tls_example() -> dict[str, object]:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    (m,) = re.finditer(r"<!-- tls-example -->\n```yaml\n(.*?)^```", text, re.S | re.M)
    doc: dict[str, object] = yaml.safe_load(m.group(1))
    return doc


def test_tls_example_is_a_working_ingress_config(tmp_path: Path) -> None:
    example = _tls_example()
    crt, key = DevCA().issue("orders.example.com", server=True).write(tmp_path, "tls")
    socket = yaml.safe_dump(example).replace("/etc/envoy/tls/tls.crt", str(crt))
    socket = socket.replace("/etc/envoy/tls/tls.key", str(key))
    template = (ROOT / "envoy" / "ingress-http.yaml").read_text(encoding="utf-8")
    values = {
        **defaults(template),
        "AUTHZ_HOST": "localhost",
        "ORDERS_HOST": "localhost",
        "INVENTORY_HOST": "localhost",
    }
    cfg = yaml.safe_load(render(template, values))
    (listener,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "ingress"]
    (chain,) = listener["filter_chains"]
    chain.update(yaml.safe_load(socket))
    path = tmp_path / "envoy-tls.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = subprocess.run(
        [devstack.envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", "40400"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # and a broken certificate path is refused, so validate really loads the files
    path.write_text(yaml.safe_dump(cfg).replace(str(crt), str(tmp_path / "missing.crt")))
    broken = subprocess.run(
        [devstack.envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", "40401"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert broken.returncode != 0


def test_demo_mint_hint_runs_as_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` runs .venv/bin/authz; the hint must name a command the user's shell (in the
    repository, venv not activated) can run: a bare `authz` is not on that PATH."""
    monkeypatch.chdir(ROOT)
    command = shlex.split(authz_command())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if Path(p).resolve() != VENV_BIN.resolve()
    )
    result = subprocess.run(
        [*command, "dev-idp", "mint", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--scp" in result.stdout
