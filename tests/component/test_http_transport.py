"""The HTTP ext_authz transport (authz.server.http) over real sockets, and behind the real Envoy.

The decision core is replaced by a small async ``check`` that answers canned decisions chosen by
path (injected, not monkeypatched); everything else is the real server on 127.0.0.1:0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest

from authz.dev.stack import free_port
from authz.policy.model import Decision, RequestAttrs
from authz.server import http_convert
from authz.server.http import HttpCheckServer, HttpLimits, UnsafeHeaderError, render_decision

ALLOW = Decision(
    allowed=True,
    status=200,
    code="ok",
    reason="allowed",
    decision_id="d-allow",
    api="orders",
    route="list-orders",
    upstream_headers=(("x-user-id", "u-123"), ("x-tenant-id", "t-1"), ("x-roles", "Orders.Read")),
    remove_headers=("authorization", "x-client-id"),
    metadata=MappingProxyType(
        {"decision_id": "d-allow", "code": "ok", "api": "orders", "route": "list-orders"}
    ),
)
DENY_BODY = b'{"error":"invalid_token","code":"token_expired"}'
DENY = Decision(
    allowed=False,
    status=401,
    code="token_expired",
    reason="token expired",
    decision_id="d-deny",
    api="orders",
    response_headers=(
        ("www-authenticate", 'Bearer realm="orders", error="invalid_token"'),
        ("content-type", "application/json"),
    ),
    body=DENY_BODY,
    metadata=MappingProxyType({"decision_id": "d-deny", "code": "token_expired", "api": "orders"}),
)


class FakeCore:
    """Canned decisions by path; records what it was asked."""

    def __init__(self) -> None:
        self.seen: list[RequestAttrs] = []
        self.release = asyncio.Event()

    async def check(self, attrs: RequestAttrs) -> Decision:
        self.seen.append(attrs)
        path = attrs.path.split("?", 1)[0]
        if path.startswith("/slow/"):
            await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
            return _tagged(path)
        if path == "/wait":
            await self.release.wait()
            return _tagged(path)
        if path == "/raise":
            raise RuntimeError("engine bug")
        if path == "/deny":
            return DENY
        if path == "/bad-header":
            return _tagged("a\r\nx-injected: 1")
        if path == "/deny-200":
            return Decision(
                allowed=False, status=200, code="missing_role", reason="", decision_id="x"
            )
        if path.startswith("/tag/"):
            return _tagged(path)
        return ALLOW


def _tagged(tag: str) -> Decision:
    return Decision(
        allowed=True,
        status=200,
        code="ok",
        reason="allowed",
        decision_id="d-" + tag,
        upstream_headers=(("x-tag", tag),),
    )


@pytest.fixture
def core() -> FakeCore:
    return FakeCore()


_PORTS: dict[int, int] = {}
TEST_LIMITS = HttpLimits(max_header_bytes=4096, max_url_bytes=1024, max_message_bytes=13312)


@pytest.fixture
async def server(core: FakeCore) -> AsyncIterator[HttpCheckServer]:
    srv = HttpCheckServer(core.check, limits=TEST_LIMITS)
    _PORTS[id(srv)] = await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close(grace_s=1.0)
    del _PORTS[id(srv)]


def _port(srv: HttpCheckServer) -> int:
    return _PORTS[id(srv)]


# --------------------------------------------------------------------------------- raw HTTP I/O


async def _read_response(
    reader: asyncio.StreamReader, *, head: bool = False
) -> tuple[int, list[tuple[str, str]], bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.lower(), v) for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)]
    length = int(dict(headers).get("content-length", "0"))
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), timeout=5)
    return status, headers, body


async def _open(srv: HttpCheckServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", _port(srv))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout=5)


async def _assert_eof(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""


# ------------------------------------------------------------------------------------ rendering


def test_render_allow_exact() -> None:
    assert render_decision(ALLOW) == (
        b"HTTP/1.1 200 OK\r\n"
        b"x-user-id: u-123\r\n"
        b"x-tenant-id: t-1\r\n"
        b"x-roles: Orders.Read\r\n"
        b"x-envoy-auth-headers-to-remove: authorization,x-client-id\r\n"
        b"x-authz-decision-id: d-allow\r\n"
        b"x-authz-code: ok\r\n"
        b"x-authz-api: orders\r\n"
        b"x-authz-route: list-orders\r\n"
        b"content-length: 0\r\n"
        b"\r\n"
    )


def test_render_deny_head_keeps_length_drops_body() -> None:
    full = render_decision(DENY, close=True)
    head = render_decision(DENY, head=True, close=True)
    assert full == head + DENY_BODY
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert f"content-length: {len(DENY_BODY)}\r\nconnection: close\r\n\r\n".encode() in head


def test_render_extra_metadata_keys() -> None:
    meta = {"decision_id": "i", "code": "ok", "dry_run": "would_deny", "Bad Key": "x"}
    out = render_decision(dataclasses.replace(_tagged("t"), metadata=meta))
    assert b"x-authz-decision-id: i\r\nx-authz-code: ok\r\nx-authz-dry-run: would_deny\r\n" in out
    assert b"Bad Key" not in out


@pytest.mark.parametrize(
    "decision",
    [
        _tagged("a\nb"),
        _tagged("a\rb"),
        _tagged("a\x00b"),
        Decision(allowed=False, status=200, code="c", reason="", decision_id="x"),
        Decision(allowed=False, status=101, code="c", reason="", decision_id="x"),
    ],
    ids=["lf", "cr", "nul", "deny-200", "deny-101"],
)
def test_render_refuses_unsafe(decision: Decision) -> None:
    with pytest.raises(ValueError):
        render_decision(decision)


def _with_id(d: Decision, decision_id: str, **meta: str) -> Decision:
    merged = {**d.metadata, "decision_id": decision_id, **meta}
    return dataclasses.replace(d, decision_id=decision_id, metadata=MappingProxyType(merged))


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
@pytest.mark.parametrize(
    "decision",
    [
        _with_id(ALLOW, "0123abcd" * 4),
        _with_id(ALLOW, "fedc" * 8, oid="o-1", rate_limit="per-user"),
        _with_id(_tagged("t"), "A1"),
        dataclasses.replace(_tagged("t"), decision_id="NoMetaId7"),
    ],
    ids=["allow", "extra-metadata", "short-id", "id-from-field"],
)
def test_render_allow_with_a_plain_id_is_the_full_rendering(
    decision: Decision, close: bool
) -> None:
    # The per-identity answer (rendered once, the decision id spliced in) is byte for byte the
    # full rendering, on the first check and on repeats.
    expected = http_convert._render(decision, False, close)
    assert render_decision(decision, close=close) == expected
    assert render_decision(decision, close=close, head=True) == expected


def test_render_allow_answers_keep_each_caller_and_id_apart() -> None:
    alice = _with_id(ALLOW, "a" * 32, oid="alice")
    bob = dataclasses.replace(
        _with_id(ALLOW, "b" * 32, oid="bob"), upstream_headers=(("x-user-id", "bob"),)
    )
    for d, again in ((alice, "c" * 32), (bob, "d" * 32), (alice, "e" * 32)):
        out = render_decision(_with_id(d, again))
        assert out == http_convert._render(_with_id(d, again), False, False)
        assert f"x-authz-decision-id: {again}\r\n".encode() in out
        assert out.count(b"x-authz-decision-id") == 1
        assert f"x-authz-oid: {d.metadata['oid']}\r\n".encode() in out


def test_render_allow_answers_are_bounded_and_drop_the_oldest() -> None:
    cache = http_convert._ALLOW_ANSWERS
    cache.clear()
    limit = http_convert._ALLOW_ANSWERS_MAX
    for i in range(limit + 5):
        d = _with_id(ALLOW, "a" * 32, oid=f"user-{i}")
        assert render_decision(d) == http_convert._render(d, False, False)
    # full: one entry goes per new one (a clear() of all would free thousands at once)
    assert len(cache) == limit
    oids = {dict(key[-1]).get("oid") for key in cache}
    assert "user-0" not in oids
    assert f"user-{limit + 4}" in oids
    cache.clear()


def test_render_allow_with_a_plain_id_still_refuses_unsafe_headers() -> None:
    with pytest.raises(ValueError):
        render_decision(dataclasses.replace(_tagged("a\nb"), decision_id="plain1"))


# ---------------------------------------------------------------------------------- over sockets


async def test_allow_over_httpx(server: HttpCheckServer, core: FakeCore) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{_port(server)}") as client:
        r = await client.get(
            "/orders/7?x=1&y=2", headers={"host": "api.example.com", "x-request-id": "rid-1"}
        )
    assert r.status_code == 200
    assert r.headers["x-user-id"] == "u-123"
    assert r.headers["x-envoy-auth-headers-to-remove"] == "authorization,x-client-id"
    assert r.headers["x-authz-code"] == "ok"
    assert r.headers["x-authz-decision-id"] == "d-allow"
    assert r.headers["x-authz-api"] == "orders"
    assert r.headers["x-authz-route"] == "list-orders"
    assert r.content == b""
    attrs = core.seen[-1]
    assert (attrs.method, attrs.path, attrs.host, attrs.request_id) == (
        "GET",
        "/orders/7?x=1&y=2",
        "api.example.com",
        "rid-1",
    )
    assert attrs.context == {}
    assert all(k == k.lower() for k in attrs.headers)


async def test_deny_rendering(server: HttpCheckServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{_port(server)}") as client:
        r = await client.post("/deny", headers={"authorization": "Bearer x"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-authz-code"] == "token_expired"
    assert r.headers["x-authz-decision-id"] == "d-deny"
    assert "x-authz-route" not in r.headers
    assert r.content == DENY_BODY


async def test_head_deny_has_no_body_and_connection_survives(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"HEAD /deny HTTP/1.1\r\nhost: a\r\n\r\nGET /tag/next HTTP/1.1\r\nhost: a\r\n\r\n")
    status, headers, _ = await _read_response(reader, head=True)
    assert status == 401
    assert ("content-length", str(len(DENY_BODY))) in headers
    status, headers, _ = await _read_response(reader)
    assert (status, dict(headers)["x-tag"]) == (200, "/tag/next")
    await _close(writer)


async def test_repeated_headers_are_comma_joined(server: HttpCheckServer, core: FakeCore) -> None:
    reader, writer = await _open(server)
    writer.write(
        b"GET /tag/a HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer a\r\n"
        b"X-Multi: 1\r\nauthorization: Bearer b\r\n\r\n"
    )
    status, _, _ = await _read_response(reader)
    assert status == 200
    assert core.seen[-1].headers["authorization"] == "Bearer a, Bearer b"
    assert core.seen[-1].headers["x-multi"] == "1"
    await _close(writer)


async def test_path_prefix_is_stripped_and_enforced(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check, path_prefix="/authz")
    port = await srv.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            ok = await client.get("/authz/tag/x?q=1")
            assert ok.status_code == 200
            assert core.seen[-1].path == "/tag/x?q=1"
            n = len(core.seen)
            for outside in ("/tag/x", "/authzfoo", "/authz"):
                bad = await client.get(outside)
                assert bad.status_code == 400, outside
                assert bad.headers["x-authz-code"] == "invalid_request"
            assert len(core.seen) == n  # never reached the check
            assert (await client.get("/authz/tag/y")).status_code == 200  # connection kept
    finally:
        await srv.close(1.0)


async def test_keep_alive_many_requests_one_connection(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    for i in range(5):
        writer.write(f"GET /tag/{i} HTTP/1.1\r\nhost: a\r\n\r\n".encode())
        status, headers, _ = await _read_response(reader)
        assert (status, dict(headers)["x-tag"]) == (200, f"/tag/{i}")
        assert "connection" not in dict(headers)
    assert server.connection_count == 1
    await _close(writer)


async def test_connection_close_and_http10(server: HttpCheckServer) -> None:
    for request in (
        b"GET /tag/a HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        b"GET /tag/ignored HTTP/1.1\r\n\r\n",
        b"GET /tag/a HTTP/1.0\r\nhost: a\r\n\r\n",
    ):
        reader, writer = await _open(server)
        writer.write(request)
        status, headers, _ = await _read_response(reader)
        assert (status, dict(headers)["connection"]) == (200, "close")
        await _assert_eof(reader)
        await _close(writer)


async def test_pipelined_answers_keep_request_order(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(
        b"GET /slow/300 HTTP/1.1\r\nhost: a\r\n\r\n"
        b"GET /slow/10 HTTP/1.1\r\nhost: a\r\n\r\n"
        b"GET /tag/fast HTTP/1.1\r\nhost: a\r\n\r\n"
    )
    tags = [dict((await _read_response(reader))[1])["x-tag"] for _ in range(3)]
    assert tags == ["/slow/300", "/slow/10", "/tag/fast"]
    await _close(writer)


async def test_deep_pipeline_pauses_and_resumes_reading(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"".join(b"GET /tag/%d HTTP/1.1\r\nhost: a\r\n\r\n" % i for i in range(40)))
    tags = [dict((await _read_response(reader))[1])["x-tag"] for _ in range(40)]
    assert tags == [f"/tag/{i}" for i in range(40)]
    await _close(writer)


async def test_half_close_still_gets_answers(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /slow/50 HTTP/1.1\r\nhost: a\r\n\r\nGET /tag/b HTTP/1.1\r\nhost: a\r\n\r\n")
    writer.write_eof()
    assert [(await _read_response(reader))[0] for _ in range(2)] == [200, 200]
    await _assert_eof(reader)
    await _close(writer)


async def test_malformed_request_400_closes_only_that_connection(server: HttpCheckServer) -> None:
    good_r, good_w = await _open(server)
    bad_r, bad_w = await _open(server)
    bad_w.write(b"GET /tag/a HTTP/1.1\r\nho st: a\r\n\r\n")
    status, headers, body = await _read_response(bad_r)
    assert (status, dict(headers)["connection"]) == (400, "close")
    assert json.loads(body)["code"] == "invalid_request"
    await _assert_eof(bad_r)
    good_w.write(b"GET /tag/ok HTTP/1.1\r\nhost: a\r\n\r\n")
    assert (await _read_response(good_r))[0] == 200
    await _close(good_w)
    await _close(bad_w)


async def test_answers_before_a_malformed_request_are_kept(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /slow/50 HTTP/1.1\r\nhost: a\r\n\r\nBLAH\x01 / HTTP/1.1\r\n\r\n")
    assert (await _read_response(reader))[0] == 200
    assert (await _read_response(reader))[0] == 400
    await _assert_eof(reader)
    await _close(writer)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /tag/a HTTP/1.1\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (
            b"GET /tag/a HTTP/1.1\r\n"
            + b"".join(b"x-h%d: 1\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"POST /tag/a HTTP/1.1\r\ncontent-length: 2000000\r\n\r\n", 413),
    ],
    ids=["header-bytes", "header-count", "url", "body"],
)
async def test_limits(server: HttpCheckServer, request_bytes: bytes, status: int) -> None:
    reader, writer = await _open(server)
    writer.write(request_bytes)
    got, headers, _ = await _read_response(reader)
    assert (got, dict(headers)["connection"]) == (status, "close")
    await _assert_eof(reader)
    await _close(writer)


async def test_header_dribble_is_bounded(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /tag/a HTTP/1.1\r\nx-long: ")
    # One never-ending header value, in pieces: httptools buffers it until it ends, so the
    # transport must count what a head feeds it. The limit here is 4096 + 1024 + 8192 bytes; stop
    # right after crossing it (writing on after the server closed would get us a reset instead).
    for _ in range(14):
        await asyncio.sleep(0.02)
        writer.write(b"a" * 1024)
        await writer.drain()
    status, _, _ = await _read_response(reader)
    assert status == 431
    await _close(writer)


@pytest.mark.parametrize(
    "head",
    [
        b"POST /tag/b HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
        b"POST /tag/c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
async def test_body_or_transfer_encoding_is_denied(
    server: HttpCheckServer, core: FakeCore, head: bytes
) -> None:
    reader, writer = await _open(server)
    writer.write(head)
    status, _headers, body = await _read_response(reader)
    assert status == 413
    doc = json.loads(body)
    assert doc["code"] == "invalid_request"
    assert "request_id" in doc
    await _assert_eof(reader)
    await _close(writer)
    assert core.seen == []


async def test_chunked_trailer_without_crlf_is_bounded(
    server: HttpCheckServer, core: FakeCore
) -> None:
    # The attack: a chunked request whose trailer never ends (the old code buffered 200 MiB of
    # it). It is denied at its head, nothing after it is read, and another client is answered.
    reader, writer = await _open(server)
    writer.write(b"POST /tag/a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: ")
    status, _headers, body = await _read_response(reader)
    assert status == 413
    assert json.loads(body)["code"] == "invalid_request"
    sent = 0
    limit = TEST_LIMITS.max_message_bytes
    with contextlib.suppress(ConnectionError):
        while sent < 4 * limit and not reader.at_eof():
            writer.write(b"a" * 1024)
            sent += 1024
            await writer.drain()
            await asyncio.sleep(0)
    other_r, other_w = await _open(server)
    other_w.write(b"GET /tag/z HTTP/1.1\r\nhost: x\r\n\r\n")
    status, _, _ = await _read_response(other_r)
    assert status == 200
    await _close(other_w)
    with contextlib.suppress(ConnectionError):
        await _assert_eof(reader)
    for _ in range(500):  # the server sees both closes on its next loop turns (bounded wait)
        if server.connection_count == 0:
            break
        await asyncio.sleep(0.01)
    assert server.connection_count == 0
    assert [a.path for a in core.seen] == ["/tag/z"]
    await _close(writer)


async def test_every_byte_counts_and_bare_crlfs_do_not_keep_alive(
    server: HttpCheckServer,
) -> None:
    reader, writer = await _open(server)
    before = server.oversize_messages
    limit = TEST_LIMITS.max_message_bytes
    with contextlib.suppress(ConnectionError):
        for _ in range(limit // 1024 + 2):
            writer.write(b"\r\n" * 512)
            await writer.drain()
    with contextlib.suppress(ConnectionError):
        data = await asyncio.wait_for(reader.read(), timeout=5)
        assert data.startswith(b"HTTP/1.1 431 ")
    assert server.oversize_messages == before + 1
    await _close(writer)


async def test_bare_crlfs_do_not_reset_idle_timeout(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check, limits=HttpLimits(idle_timeout_s=0.2, header_timeout_s=5))
    port = await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = False
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # 200 x 20 ms = 4 s >> the 0.2 s idle timeout
                writer.write(b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
                if reader.at_eof() or srv.connection_count == 0:
                    closed = True
                    break
        assert closed or srv.connection_count == 0
        writer.close()
    finally:
        await srv.close(grace_s=1.0)


async def test_connection_cap(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check, limits=HttpLimits(max_connections=2))
    port = await srv.start("127.0.0.1", 0)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for r, w in conns:
            w.write(b"GET /tag/a HTTP/1.1\r\n\r\n")
            assert (await _read_response(r))[0] == 200
        third_r, third_w = await asyncio.open_connection("127.0.0.1", port)
        await _assert_eof(third_r)
        assert srv.rejected_connections == 1
        assert srv.connection_count == 2
        for _, w in [*conns, (third_r, third_w)]:
            w.close()
    finally:
        await srv.close(grace_s=1.0)


async def test_early_rejection_has_deny_shape(server: HttpCheckServer) -> None:
    reader, writer = await _open(server)
    writer.write(
        b"GET /tag/a HTTP/1.1\r\nx-request-id: rq-9\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n"
    )
    status, headers, body = await _read_response(reader)
    assert status == 431
    doc = json.loads(body)
    assert doc == {"error": "invalid_request", "code": "invalid_request", "request_id": "rq-9"}
    h = dict(headers)
    assert h["x-authz-decision-id"]
    assert h["x-authz-code"] == "invalid_request"
    assert h["www-authenticate"].startswith("Bearer realm=")
    await _close(writer)


def test_limits_leave_room_for_a_max_size_token() -> None:
    limits = HttpLimits.for_token(262144)
    assert limits.max_header_bytes > 262144 + len("Bearer ")
    assert limits.max_message_bytes > limits.max_header_bytes


async def test_check_raising_is_internal_error(core: FakeCore) -> None:
    errors: list[BaseException] = []
    srv = HttpCheckServer(core.check, on_error=errors.append)
    port = await srv.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/raise", headers={"x-request-id": "rid-9"})
            assert r.status_code == 503
            assert r.headers["x-authz-code"] == "internal_error"
            assert r.json()["request_id"] == "rid-9"
            for path in ("/bad-header", "/deny-200"):  # unrenderable decisions fail closed too
                r = await client.get(path)
                assert (r.status_code, r.headers["x-authz-code"]) == (503, "internal_error")
                assert "x-injected" not in r.headers
        assert [type(e) for e in errors] == [RuntimeError, UnsafeHeaderError, ValueError]
    finally:
        await srv.close(1.0)


class FastCore(FakeCore):
    """A synchronous ``check_now`` that decides /fast/* at once, defers /slow/* (None: needs
    I/O, so ``check`` runs in a Task) and raises on /fast-raise."""

    def __init__(self) -> None:
        super().__init__()
        self.fast: list[str] = []

    def check_now(self, attrs: RequestAttrs) -> Decision | None:
        if attrs.path == "/fast-raise":
            raise RuntimeError("engine bug")
        if attrs.path.startswith("/fast/"):
            self.fast.append(attrs.path)
            return _tagged(attrs.path)
        return None


async def test_check_now_answers_without_a_task_and_keeps_pipeline_order() -> None:
    core = FastCore()
    errors: list[BaseException] = []
    srv = HttpCheckServer(core.check, check_now=core.check_now, on_error=errors.append)
    port = await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # a deferred (slow) request first, then a fast one: answers must keep request order
        writer.write(
            b"GET /slow/50 HTTP/1.1\r\nhost: a\r\n\r\n"
            b"GET /fast/1 HTTP/1.1\r\nhost: a\r\n\r\n"
            b"GET /fast-raise HTTP/1.1\r\nhost: a\r\n\r\n"
        )
        tags = []
        for _ in range(3):
            status, headers, _ = await _read_response(reader)
            tags.append((status, dict(headers).get("x-tag", dict(headers).get("x-authz-code"))))
        assert tags == [(200, "/slow/50"), (200, "/fast/1"), (503, "internal_error")]
        assert core.fast == ["/fast/1"]
        assert [a.path for a in core.seen] == ["/slow/50"]  # only the deferred one hit check()
        assert [type(e) for e in errors] == [RuntimeError]
        await _close(writer)
    finally:
        await srv.close(1.0)


async def test_graceful_close_finishes_in_flight(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check)
    port = await srv.start("127.0.0.1", 0)
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    busy_w.write(b"GET /wait HTTP/1.1\r\nhost: a\r\n\r\n")
    for _ in range(200):
        if srv.in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert srv.in_flight == 1
    closing = asyncio.create_task(srv.close(grace_s=5.0))
    await _assert_eof(idle_r)  # idle keep-alive connection closed at once
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=2)
    assert not closing.done()
    core.release.set()
    status, headers, _ = await _read_response(busy_r)
    assert (status, dict(headers)["connection"]) == (200, "close")
    await _assert_eof(busy_r)
    await asyncio.wait_for(closing, timeout=5)
    assert srv.in_flight == 0
    assert srv.connection_count == 0
    await _close(busy_w)
    await _close(idle_w)


async def test_close_cancels_after_grace(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check)
    port = await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /wait HTTP/1.1\r\nhost: a\r\n\r\n")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(srv.close(grace_s=0.1), timeout=5)
    assert srv.in_flight == 0
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    await _close(writer)


async def test_idle_and_header_timeouts(core: FakeCore) -> None:
    srv = HttpCheckServer(core.check, limits=HttpLimits(idle_timeout_s=0.2, header_timeout_s=0.2))
    port = await srv.start("127.0.0.1", 0)
    try:
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
        slow_w.write(b"GET /tag/a HTTP/1.1\r\nx-a: ")
        started = time.monotonic()
        await _assert_eof(idle_r)
        await _assert_eof(slow_r)
        assert time.monotonic() - started < 3
        await _close(idle_w)
        await _close(slow_w)
    finally:
        await srv.close(1.0)


async def test_reuse_port_lets_two_servers_share_a_port(core: FakeCore) -> None:
    first = HttpCheckServer(core.check)
    port = await first.start("127.0.0.1", 0, reuse_port=True)
    second = HttpCheckServer(core.check)
    try:
        assert await second.start("127.0.0.1", port, reuse_port=True) == port
    finally:
        await first.close(1.0)
        await second.close(1.0)


_SCENARIOS = [
    test_allow_over_httpx,
    test_deny_rendering,
    test_head_deny_has_no_body_and_connection_survives,
    test_keep_alive_many_requests_one_connection,
    test_connection_close_and_http10,
    test_pipelined_answers_keep_request_order,
    test_deep_pipeline_pauses_and_resumes_reading,
    test_half_close_still_gets_answers,
    test_malformed_request_400_closes_only_that_connection,
    test_header_dribble_is_bounded,
    test_check_raising_is_internal_error,
    test_graceful_close_finishes_in_flight,
    test_idle_and_header_timeouts,
]


@pytest.mark.parametrize("scenario", _SCENARIOS, ids=[f.__name__[5:] for f in _SCENARIOS])
def test_same_on_uvloop(scenario: Callable[..., Awaitable[None]]) -> None:
    """The transport must work on both loops; the application picks one."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        core = FakeCore()
        params = inspect.signature(scenario).parameters
        if "server" not in params:
            await scenario(core=core)
            return
        srv = HttpCheckServer(core.check, limits=TEST_LIMITS)
        _PORTS[id(srv)] = await srv.start("127.0.0.1", 0)
        try:
            assert "uvloop" in type(asyncio.get_running_loop()).__module__
            await scenario(**{k: v for k, v in (("server", srv), ("core", core)) if k in params})
        finally:
            await srv.close(1.0)
            del _PORTS[id(srv)]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


# ------------------------------------------------------------------------------ the real Envoy

ENVOY = Path(sys.executable).parent / "envoy"
ENVOY_BIN = str(ENVOY) if ENVOY.exists() else shutil.which("envoy")

ENVOY_CONFIG = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm_type}
          stat_prefix: ingress
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {access_log}
              log_format:
                text_format_source:
                  inline_string: "{log_format}\\n"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: {{code: ServiceUnavailable}}
              allowed_headers:
                patterns: [{{exact: authorization}}, {{exact: x-request-id}}]
              http_service:
                server_uri: {{uri: "http://127.0.0.1:{authz}", cluster: authz, timeout: 2s}}
                path_prefix: /authz
                authorization_response:
                  allowed_upstream_headers:
                    patterns: [{{exact: x-user-id}}, {{exact: x-tenant-id}}, {{exact: x-roles}}]
                  allowed_client_headers:
                    patterns:
                    - {{exact: www-authenticate}}
                    - {{exact: content-type}}
                    - {{exact: x-authz-decision-id}}
                    - {{exact: x-authz-code}}
                  dynamic_metadata_from_headers:
                    patterns: [{{prefix: x-authz-}}]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: authz
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: authz
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {authz}}}}}}}
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}
"""


HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
# The decision metadata headers, read back from the ext_authz dynamic-metadata namespace.
LOG_FORMAT = (
    "%REQ(:PATH)% %RESPONSE_CODE%"
    " code=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-authz-code)%"
    " id=%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-authz-decision-id)%"
)


class _Echo(BaseHTTPRequestHandler):
    """The backend: answers every request with the headers it received, as JSON."""

    def _echo(self) -> None:
        body = json.dumps(
            {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo_backend() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


async def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {proc.returncode}")
            try:
                # Any answer means the listener and its filter chain are up.
                await client.get(f"http://127.0.0.1:{port}/__ready")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise TimeoutError("envoy did not become ready")


@pytest.mark.e2e
@pytest.mark.skipif(ENVOY_BIN is None, reason="envoy binary not installed")
async def test_real_envoy_http_service(core: FakeCore, echo_backend: int) -> None:
    srv = HttpCheckServer(core.check, path_prefix="/authz")
    authz_port = await srv.start("127.0.0.1", 0)
    listen = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        access_log = Path(tmp) / "access.log"
        config = Path(tmp) / "envoy.yaml"
        config.write_text(
            ENVOY_CONFIG.format(
                listen=listen,
                authz=authz_port,
                backend=echo_backend,
                access_log=access_log,
                hcm_type=HCM_TYPE,
                log_format=LOG_FORMAT,
            )
        )
        assert ENVOY_BIN is not None
        proc = subprocess.Popen(
            [
                ENVOY_BIN,
                "-c",
                str(config),
                "--base-id",
                str(random.randint(10_000, 2_000_000)),
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "50",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "ENVOY_UID": str(os.getuid())},
        )
        try:
            await _wait_ready(proc, listen)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen}", timeout=5) as c:
                # (a) allow: upstream headers overwrite a forged x-user-id; (b) removals happen
                r = await c.get(
                    "/orders/1?x=1",
                    headers={
                        "authorization": "Bearer t",
                        "x-user-id": "forged",
                        "x-roles": "Admin",
                        "x-request-id": "rid-e2e",
                    },
                )
                assert r.status_code == 200, r.text
                got = r.json()
                received = dict(got["headers"])
                assert got["path"] == "/orders/1?x=1"
                assert [v for k, v in got["headers"] if k == "x-user-id"] == ["u-123"]
                assert [v for k, v in got["headers"] if k == "x-roles"] == ["Orders.Read"]
                assert received["x-tenant-id"] == "t-1"
                assert "authorization" not in received
                assert not any(k.startswith("x-authz-") for k in received)
                assert core.seen[-1].path == "/orders/1?x=1"
                assert core.seen[-1].headers["authorization"] == "Bearer t"
                assert core.seen[-1].request_id == "rid-e2e"

                # (c) deny: our status, body and challenge reach the client
                r = await c.get("/deny", headers={"authorization": "Bearer t"})
                assert r.status_code == 401
                assert r.content == DENY_BODY
                assert r.headers["www-authenticate"] == (
                    'Bearer realm="orders", error="invalid_token"'
                )
                assert r.headers["x-authz-code"] == "token_expired"

                # A failing check answers 503 internal_error. Envoy reads any 5xx from an HTTP
                # authorization service as "the service failed": the client gets status_on_error
                # (503 here) without our headers, and failure_mode_allow would let it through.
                r = await c.get("/raise")
                assert r.status_code == 503
                assert "x-authz-code" not in r.headers

            # (d) x-authz-* became dynamic metadata (access log is flushed asynchronously)
            deadline = time.monotonic() + 10
            lines: list[str] = []
            while time.monotonic() < deadline:
                lines = access_log.read_text().splitlines() if access_log.exists() else []
                if sum(1 for ln in lines if not ln.startswith("/__ready")) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert "/orders/1?x=1 200 code=ok id=d-allow" in lines
            assert "/deny 401 code=token_expired id=d-deny" in lines
            assert "/raise 503 code=- id=-" in lines
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=10)
            await srv.close(1.0)
        if proc.returncode not in (0, -15):
            pytest.fail(f"envoy exited with {proc.returncode}: {err.decode()[-2000:]}")
