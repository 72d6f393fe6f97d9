"""Parsing ``authz serve`` (and ``check-config``) loads no development tool: checked in a fresh
interpreter, as the process starts in production (the static half of the rule, no arrow from
production code to ``authz.dev`` in the import graph, is tests/unit/test_import_graph.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
from authz import cli
args = cli.build_parser(sys.argv[1:]).parse_args(sys.argv[1:])
import authz.server.lifecycle, authz.server.app, authz.service
dev = sorted(m for m in sys.modules if m == "authz.dev" or m.startswith("authz.dev."))
print(args.command, dev)
"""


def test_parsing_serve_loads_no_dev_tool() -> None:
    def probe(*argv: str) -> str:
        cmd = [sys.executable, "-c", _PROBE, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout

    assert probe("serve", "--config", "x.yaml") == "serve []\n"
    assert probe("check-config", "x.yaml") == "check-config []\n"
    # the dev subcommands do load them (so the probe can see a dev import)
    assert probe("echo", "--port", "0").startswith("echo ['authz.dev'")


_LIFECYCLE_PROBE = """
import sys
import authz.server.lifecycle
heavy = ("grpc", "prometheus_client", "redis", "httpx", "authz.server.app", "authz.service")
print(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)))
"""


def test_importing_the_lifecycle_loads_no_server_or_metrics_code() -> None:
    """Why server/lifecycle.py and server/workers.py import the servers and prometheus_client
    inside the functions that run them (their ``# noqa: PLC0415`` lines)."""
    cmd = [sys.executable, "-c", _LIFECYCLE_PROBE]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out == "[]\n"
