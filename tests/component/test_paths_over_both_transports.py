"""The real engine behind both transports' request conversion: a percent-encoded ``:`` or ``@``
selects the same route as its raw spelling, and method-override headers are removed on allow,
whether the request came as a gRPC ``CheckRequest`` or as an HTTP ext_authz request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.entra import TokenVerifier
from authz.policy.model import Decision, RequestAttrs
from authz.server import convert
from authz.server.http import HttpCheckServer, HttpLimits
from tests.unit.conftest import MemoryKeys

# The exact routes are anonymous, the prefix behind them needs a token: without a token, 200
# means "the exact route matched", 401 "the request fell through to the prefix".
CONFIG = """
issuers:
  - {name: contoso, instance: "http://127.0.0.1:1", tenant: contoso.example}
apis:
  - name: orders
    audiences: ["api://orders"]
    issuers: [contoso]
    match: {path_prefixes: ["/orders", "/users"]}
    routes:
      - {name: export, path: "/orders/export:all", methods: [GET], require: anonymous}
      - {name: alice, path: "/users/alice@contoso.example", methods: [GET], require: anonymous}
      - {name: orders, path_prefix: /orders, require: authenticated}
      - {name: users, path_prefix: /users, require: authenticated}
"""
OVERRIDES = {"x-http-method-override", "x-method-override", "x-http-method"}
CASES = [
    ("/orders/export:all", 200),
    ("/orders/export%3Aall", 200),
    ("/orders/export%3aall", 200),
    ("/users/alice@contoso.example", 200),
    ("/users/alice%40contoso.example", 200),
    ("/orders/export%2Fall", 400),  # an encoded '/' stays rejected: non_canonical_path
    ("/orders/export-all", 401),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def engine() -> Engine:
    settings = authz_config.parse(CONFIG, env={})
    issuers = {spec.name: spec for spec in settings.issuers}
    return Engine(settings, TokenVerifier(settings.tokens, issuers, MemoryKeys()))


@pytest.mark.parametrize(("path", "status"), CASES, ids=IDS)
def test_grpc_conversion(engine: Engine, path: str, status: int) -> None:
    req = convert.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", path, "orders.example"
    http.headers["x-http-method-override"] = "DELETE"
    resp = convert.decision_to_response(engine.check(convert.request_to_attrs(req)))
    if status == 200:
        assert resp.status.code == convert.RPC_OK
        assert set(resp.ok_response.headers_to_remove) >= OVERRIDES
    else:
        assert resp.denied_response.status.code == status


@pytest.fixture
async def http_port(engine: Engine) -> AsyncIterator[int]:
    async def check(attrs: RequestAttrs) -> Decision:
        return engine.check(attrs)

    fn: Callable[[RequestAttrs], Awaitable[Decision]] = check
    srv = HttpCheckServer(fn)
    port = await srv.start("127.0.0.1", 0)
    yield port
    await srv.close(grace_s=1.0)


@pytest.mark.parametrize(("path", "status"), CASES, ids=IDS)
async def test_http_conversion(http_port: int, path: str, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nhost: orders.example\r\n"
            "x-http-method-override: DELETE\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout=5)
    lines = raw.decode("latin-1").split("\r\n")
    assert int(lines[0].split(" ", 2)[1]) == status
    headers = dict(ln.split(": ", 1) for ln in lines[1:] if ln)
    if status == 200:
        assert set(headers["x-envoy-auth-headers-to-remove"].split(",")) >= OVERRIDES


async def test_oversize_token_same_deny_on_both_transports(engine: Engine) -> None:
    token = "e" * (engine.settings.tokens.max_token_bytes + 4000)
    req = convert.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/orders/1", "orders.example"
    http.headers["authorization"] = f"Bearer {token}"
    grpc_resp = convert.decision_to_response(engine.check(convert.request_to_attrs(req)))
    assert grpc_resp.denied_response.status.code == 401

    async def check(attrs: RequestAttrs) -> Decision:
        return engine.check(attrs)

    limits = HttpLimits.for_token(engine.settings.tokens.max_token_bytes)
    srv = HttpCheckServer(check, limits=limits)
    port = await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /orders/1 HTTP/1.1\r\nhost: orders.example\r\n"
            f"authorization: Bearer {token}\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        writer.close()
    finally:
        await srv.close(grace_s=1.0)
    lines = raw.decode("latin-1").split("\r\n")
    headers = dict(ln.split(": ", 1) for ln in lines[1:] if ln)
    assert int(lines[0].split(" ", 2)[1]) == 401
    assert headers["x-authz-code"] == "token_too_large"
