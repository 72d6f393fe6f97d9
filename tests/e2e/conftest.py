"""End-to-end fixtures: the real Envoy binary in front of the real authz server process, the dev
IdP serving discovery/JWKS over HTTP, and the echo backend reporting what it received.

One stack per transport per session (starting Envoy and the server costs ~2 s); tests that kill
or reconfigure the server build their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.dev.stack import Stack

TRANSPORTS = ("grpc", "http")


@pytest.fixture(scope="session", params=TRANSPORTS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    transport: str = request.param
    yield from running(Stack(tmp_path_factory.mktemp(f"stack-{transport}"), transport=transport))


def running(s: Stack) -> Iterator[Stack]:
    """Start ``s`` (its logs printed if that fails), yield it, stop it: a fixture's body."""
    try:
        s.start()
    except Exception:
        print(s.logs() if hasattr(s, "idp") else "")
        s.stop()
        raise
    yield s
    s.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
