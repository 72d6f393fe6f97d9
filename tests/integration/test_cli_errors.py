"""Every malformed input to ``authz check-config`` / ``authz serve`` ends in a clear, bounded
message and exit 2, never a traceback: the real CLI, run as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from authz import config as config_mod
from authz.dev.stack import free_port

pytestmark = pytest.mark.integration

GOOD = """
server: {grpc_listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0", workers: 1}
issuers:
  - {name: contoso, tenant: 11111111-1111-4111-8111-111111111111}
apis:
  - name: orders
    audiences: [api://orders]
    issuers: [contoso]
    routes:
      - name: r
        path: /x
        require: authenticated
        methods: [GET]
"""

# 522 bytes that PyYAML would expand to 9**9 strings (the repr printed 136 MB before the fix)
BOMB = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(
            f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "issuers: *i\n",
    ]
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "authz", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        check=False,
    )


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr) < 20_000, len(r.stderr)


def json_lines(stderr: str) -> list[dict[str, object]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON, or this raises


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "authz.yaml"


def test_duplicate_key_fails_closed(cfg: Path) -> None:
    """``require`` set twice: PyYAML keeps the last (anonymous): a silent fail-open."""
    text = GOOD.replace(
        "        require: authenticated\n",
        "        require: authenticated\n        require: anonymous\n",
    )
    cfg.write_text(text)
    r = run("check-config", str(cfg))
    no_traceback(r)
    assert (
        "apis[0].routes[0].require: duplicate key 'require' on line 13 (first set on line 12)"
        in r.stderr
    ), r.stderr


def test_every_problem_of_a_file_in_one_pass(cfg: Path) -> None:
    text = GOOD.replace("issuers: [contoso]", "issuers: [contoso]\n    issuers: [contoso]").replace(
        "methods: [GET]", "methods: GET"
    )
    cfg.write_text(text)
    r = run("check-config", str(cfg))
    no_traceback(r)
    assert "apis[0].issuers: duplicate key 'issuers' on line 9" in r.stderr, r.stderr
    assert "apis[0].routes[0].methods: expected a list of strings" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('server: "x"\n' + GOOD.split("\n", 2)[2], "server: expected a mapping (got 'x')"),
        ("issuers: " + "[" * 50_000 + "]" * 50_000, "nested deeper than 32 levels"),
        ("issuers:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 100)), "nested deeper"),
        (BOMB, "expands to more than 200000 nodes"),
        ("issuers: &a [*a]\n", "an alias refers to itself"),
        ("issuers: [\napis: 'x\n", "line 3, column 1: found unexpected end of stream"),
        ("apis: [" + "'" + "x" * 100_000 + "'", "line 1, column 100010: expected ',' or ']'"),
        ("issuers: " + repr("x" * 100_000) + "\napis: []\n", "issuers: expected a list (got 'xxx"),
    ],
    ids=[
        "server-not-a-mapping",
        "deep-flow",
        "deep-block",
        "alias-bomb",
        "recursive-alias",
        "syntax-line",
        "syntax-huge",
        "huge-value",
    ],
)
def test_malformed_files(cfg: Path, text: str, expected: str) -> None:
    cfg.write_text(text)
    r = run("check-config", str(cfg))
    no_traceback(r)
    assert expected in r.stderr, r.stderr[:2000]
    assert len(r.stderr) < 2 * config_mod.MAX_PROBLEMS * config_mod.MAX_PROBLEM_CHARS


def test_many_problems_are_capped(cfg: Path) -> None:
    routes = "".join(f"      - {{name: r{i}, path: /x{i}, require: 7}}\n" for i in range(500))
    cfg.write_text(GOOD.split("    routes:\n")[0] + "    routes:\n" + routes)
    r = run("check-config", str(cfg))
    no_traceback(r)
    assert f"... and {500 - config_mod.MAX_PROBLEMS} more problem(s)" in r.stderr


@pytest.mark.parametrize("workers", ["²", "٣", "-1", "one"])
def test_unicode_digits_in_authz_workers(cfg: Path, workers: str) -> None:
    cfg.write_text(GOOD)
    r = run("check-config", str(cfg), env={"AUTHZ_WORKERS": workers})
    no_traceback(r)
    assert "AUTHZ_WORKERS (environment): expected a number of workers" in r.stderr, r.stderr


def test_serve_reports_a_bad_config_as_one_json_line(cfg: Path) -> None:
    cfg.write_text(GOOD)
    r = run("serve", "--config", str(cfg), env={"AUTHZ_WORKERS": "²"})
    no_traceback(r)
    (line,) = json_lines(r.stderr)
    assert line["level"] == "error"
    assert "AUTHZ_WORKERS (environment)" in str(line["msg"])


@pytest.mark.parametrize("key", ["grpc_listen", "admin_listen"])
def test_serve_port_in_use(cfg: Path, key: str) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg.write_text(GOOD.replace(f'{key}: "127.0.0.1:0"', f'{key}: "127.0.0.1:{port}"'))
        r = run("serve", "--config", str(cfg))
    no_traceback(r)
    (line,) = json_lines(r.stderr)
    assert line["msg"] == (
        f"cannot start: cannot listen on 127.0.0.1:{port} (server.{key}): Address already in use"
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--log-level", "loud"], {}), ([], {"AUTHZ_LOG_LEVEL": "verbose"})],
    ids=["flag", "env"],
)
def test_serve_bad_log_level(cfg: Path, args: list[str], env: dict[str, str]) -> None:
    cfg.write_text(GOOD)
    r = run("serve", "--config", str(cfg), *args, env=env)
    no_traceback(r)
    assert "argument --log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in (
        r.stderr
    )
