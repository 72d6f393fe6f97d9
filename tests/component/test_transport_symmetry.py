"""One suite over both transports: the same requests, decided by the real engine, answered over
gRPC (``AuthorizationServicer.Check`` with real generated messages: ``convert.request_to_attrs``
-> engine -> ``convert.decision_to_response``) and over HTTP (a real ``HttpCheckServer`` on
127.0.0.1: parser -> ``http_convert.request_to_attrs`` -> engine -> ``render_decision``), then
compared: the ``RequestAttrs`` each transport built, the ``Decision`` each got, and the answer
(allow or deny, status, headers, body, metadata) once the documented wire differences are
normalised away.

Each transport has its own engine, built identically (same settings, keys, clock, revocations,
and a deterministic decision-id source), so rate-limit counters and ids advance in step.

Accepted wire differences (what ``grpc_answer``/``http_answer`` normalise, and nothing else):
  D1 Allow/deny: gRPC says allow with ``status.code == 0`` and the ``ok_response`` oneof (no HTTP
     status); HTTP says it with status 200. A gRPC deny also carries a google.rpc code, derived
     from the HTTP status (``convert.RPC_CODE_BY_HTTP_STATUS``): checked, then dropped.
  D2 Header append semantics: every gRPC header is a ``HeaderValueOption`` with ``append=false``
     and ``OVERWRITE_IF_EXISTS_OR_ADD`` (checked on each, then reduced to ``(key, value)``);
     an HTTP answer's headers are plain lines, and Envoy overwrites the upstream request's
     headers with those matching ``allowed_upstream_headers`` (docs/http-transport.md).
  D3 Headers to remove: gRPC lists them in ``ok_response.headers_to_remove``; HTTP joins them
     with commas in one ``x-envoy-auth-headers-to-remove`` header.
  D4 Decision metadata: gRPC puts it in ``dynamic_metadata`` (every key, empty values included);
     HTTP sends each non-empty value as an ``x-authz-<key with dashes>`` header on allow and
     deny alike, for Envoy's ``dynamic_metadata_from_headers``. Compared without empty values.
  D5 Framing: HTTP adds ``content-length`` (checked against the body) and, when closing,
     ``connection: close``; gRPC has neither.
  D6 Body: gRPC's ``denied_response.body`` is a string (UTF-8, invalid bytes replaced); HTTP
     sends the bytes. Every body here is ASCII JSON, compared as text. (HTTP also omits the body
     of a HEAD answer, keeping its length: tests/component/test_http_transport.py.)
  D7 Request side: Envoy's gRPC ``headers`` also carry the pseudo-headers (``:method``,
     ``:path``, ``:authority``) and the HTTP check request carries ``host`` and
     ``content-length: 0``; ``scheme``, ``source_address`` and ``context_extensions`` exist only
     in a ``CheckRequest`` (empty over HTTP). Compared without those.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authz import config as authz_config
from authz.engine import Engine, new_decision_id
from authz.identity.entra import TokenVerifier
from authz.policy.model import Decision, RequestAttrs
from authz.policy.ratelimit import Counters
from authz.policy.revocation import RevocationRule, RevocationSet
from authz.server import convert, http_convert
from authz.server.http import HttpCheckServer
from authz.server.servicer import AuthorizationServicer
from tests.unit.conftest import ISSUERS, KID, MSA_KID, NOW, MemoryKeys, Minter, snapshot_for

CONFIG = """
issuers:
  - name: contoso
    instance: "https://login.example.test"
    tenant: "11111111-1111-4111-8111-111111111111"
    versions: ["1.0", "2.0"]
apis:
  - name: orders
    audiences: ["api://orders"]
    issuers: [contoso]
    match: {path_prefixes: [/orders]}
    routes:
      - {name: admin, path: /orders/admin, require: {scopes_any: [Orders.Admin]}}
      - name: limited
        path: /orders/limited
        require: authenticated
        rate_limits:
          - {name: per-user, key: oid, limit: 1, period: 1h}
      - {name: read, path: "/orders/{id}", require: authenticated}
"""
HOST = "orders.example"
REVOKED_OID = "77777777-7777-4777-8777-777777777777"
LIMITED_OID = "88888888-8888-4888-8888-888888888888"


@dataclass(frozen=True)
class Answer:
    """A transport's answer with the documented wire differences (D1-D6) normalised away."""

    allowed: bool
    status: int
    headers: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    body: str
    metadata: dict[str, str]


# ---------------------------------------------------------------------------------- gRPC side


def grpc_request(method: str, path: str, headers: dict[str, str]) -> convert.CheckRequest:
    """A CheckRequest as Envoy sends it: pseudo-headers in ``headers`` (D7)."""
    req = convert.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, HOST, "https"
    http.headers.update({":method": method, ":path": path, ":authority": HOST, **headers})
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    return req


def grpc_answer(resp: convert.CheckResponse) -> Answer:
    metadata = {k: v.string_value for k, v in resp.dynamic_metadata.fields.items()}
    metadata = {k: v for k, v in metadata.items() if v}  # D4
    if resp.status.code == convert.RPC_OK:  # D1
        assert resp.WhichOneof("http_response") == "ok_response"
        ok = resp.ok_response
        return Answer(True, 200, _pairs(ok.headers), tuple(ok.headers_to_remove), "", metadata)
    denied = resp.denied_response
    assert resp.WhichOneof("http_response") == "denied_response"
    status = int(denied.status.code)
    assert resp.status.code == convert.RPC_CODE_BY_HTTP_STATUS[status]  # D1
    return Answer(False, status, _pairs(denied.headers), (), denied.body, metadata)  # D6


def _pairs(options: object) -> tuple[tuple[str, str], ...]:
    out = []
    for opt in options:  # type: ignore[attr-defined]
        # D2: overwrite, never append, said both ways (docs/protos.md)
        assert opt.HasField("append")
        assert opt.append.value is False
        assert opt.append_action == opt.OVERWRITE_IF_EXISTS_OR_ADD
        out.append((opt.header.key, opt.header.value))
    return tuple(out)


# ---------------------------------------------------------------------------------- HTTP side


def http_request(method: str, path: str, headers: dict[str, str]) -> bytes:
    """Envoy's HTTP check request: the original path, ``host`` and ``content-length: 0`` (D7)."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}", "content-length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def http_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout=5)


def http_answer(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 ")
    status = int(status_line.split(" ", 2)[1])
    headers, remove, metadata = [], (), {}
    for line in lines:
        name, value = line.split(": ", 1)
        if name == "content-length":  # D5
            assert int(value) == len(body)
        elif name == "connection":  # D5
            assert value == "close"
        elif name == "x-envoy-auth-headers-to-remove":  # D3
            remove = tuple(value.split(","))
        elif name.startswith("x-authz-"):  # D4
            metadata[name.removeprefix("x-authz-").replace("-", "_")] = value
        else:
            headers.append((name, value))
    return Answer(status == 200, status, tuple(headers), remove, body.decode("utf-8"), metadata)


# ------------------------------------------------------------------------------------ the pair


def comparable(attrs: RequestAttrs) -> tuple[object, ...]:
    """What both transports must agree on (D7 left out)."""
    headers = {
        k: v
        for k, v in attrs.headers.items()
        if not k.startswith(":") and k not in ("host", "content-length")
    }
    return attrs.method, attrs.path, attrs.host, attrs.request_id, headers


class Side:
    """One transport's engine, built the same way as the other's, and what it was asked."""

    def __init__(self, settings: authz_config.Settings, keys: MemoryKeys) -> None:
        verifier = TokenVerifier(settings.tokens, ISSUERS, keys, clock=lambda: float(NOW))
        ids = itertools.count(1)
        revoked = RevocationSet(
            [RevocationRule(id="r1", reason="test", expires_at=NOW + 3600, oid=REVOKED_OID)]
        )
        self.engine = Engine(
            settings,
            verifier,
            new_id=lambda: f"decision-{next(ids)}",
            counters=Counters(),
            revocations=_Holder(revoked),
            clock=lambda: float(NOW),
        )
        self.seen: list[tuple[RequestAttrs, Decision]] = []

    async def check(self, attrs: RequestAttrs) -> Decision:
        decision = self.engine.check(attrs)
        self.seen.append((attrs, decision))
        return decision


class _Holder:
    """The ``RevocationView`` seam with a fixed snapshot."""

    def __init__(self, current: RevocationSet) -> None:
        self.current = current


@dataclass
class Pair:
    grpc: Side
    http: Side
    servicer: AuthorizationServicer
    port: int

    async def ask(self, method: str, path: str, headers: dict[str, str]) -> tuple[Answer, Answer]:
        # check_wire: the path the gRPC server runs (the answer's bytes), parsed as Envoy would
        wire = await self.servicer.check_wire(grpc_request(method, path, headers), None)
        resp = convert.CheckResponse.FromString(wire)
        raw = await http_exchange(self.port, http_request(method, path, headers))
        return grpc_answer(resp), http_answer(raw)


@pytest.fixture(scope="module")
def signing() -> tuple[MemoryKeys, Minter]:
    """The issuer's keys (as the verifier sees them) and a minter signing with them."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    msa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = MemoryKeys({"contoso": snapshot_for("contoso", rsa_key, msa_key)})
    return keys, Minter({KID: rsa_key, MSA_KID: msa_key})


@pytest.fixture
async def pair(signing: tuple[MemoryKeys, Minter]) -> AsyncIterator[Pair]:
    keys = signing[0]
    settings = authz_config.parse(CONFIG, env={})
    grpc_side, http_side = Side(settings, keys), Side(settings, keys)
    server = HttpCheckServer(http_side.check)
    port = await server.start("127.0.0.1", 0)
    try:
        yield Pair(grpc_side, http_side, AuthorizationServicer(grpc_side.check), port)
    finally:
        await server.close(grace_s=1.0)


# ------------------------------------------------------------------------------------ the cases

Headers = Callable[[Minter], dict[str, str]]


def bearer(**claims: object) -> Headers:
    return lambda m: {"authorization": f"Bearer {m.token(aud='api://orders', **claims)}"}


# (id, path, request headers, how many times the same request is asked first, expected status,
# code, header names the answer must carry)
CASES: list[tuple[str, str, Headers, int, int, str, tuple[str, ...]]] = [
    ("allow-identity-headers", "/orders/7", bearer(), 0, 200, "ok", ("x-user-id", "x-scopes")),
    (
        "401-missing-token",
        "/orders/7",
        lambda m: {},
        0,
        401,
        "missing_token",
        ("www-authenticate",),
    ),
    (
        "401-bad-token",
        "/orders/7",
        lambda m: {"authorization": "Bearer not.a.jwt"},
        0,
        401,
        "malformed_token",
        ("www-authenticate",),
    ),
    (
        "403-insufficient-scope",
        "/orders/admin",
        bearer(),
        0,
        403,
        "missing_scope",
        ("www-authenticate",),
    ),
    (
        "429-rate-limited",
        "/orders/limited",
        bearer(oid=LIMITED_OID),
        1,
        429,
        "rate_limited",
        ("retry-after", "ratelimit-policy", "ratelimit"),
    ),
    (
        "401-token-revoked",
        "/orders/7",
        bearer(oid=REVOKED_OID),
        0,
        401,
        "token_revoked",
        ("www-authenticate",),
    ),
]


@pytest.mark.parametrize(
    ("path", "headers_of", "before", "status", "code", "must_have"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_the_same_decision_reads_the_same_over_both_transports(
    pair: Pair,
    signing: tuple[MemoryKeys, Minter],
    path: str,
    headers_of: Headers,
    before: int,
    status: int,
    code: str,
    must_have: tuple[str, ...],
) -> None:
    headers = {"x-request-id": "req-1", **headers_of(signing[1])}
    for _ in range(before):
        await pair.ask("GET", path, headers)

    grpc_answer_, http_answer_ = await pair.ask("GET", path, headers)

    # The same request: each transport built the same RequestAttrs (D7 aside) ...
    (grpc_attrs, grpc_decision), (http_attrs, http_decision) = (
        pair.grpc.seen[-1],
        pair.http.seen[-1],
    )
    assert comparable(grpc_attrs) == comparable(http_attrs)
    assert (http_attrs.scheme, http_attrs.source_address, dict(http_attrs.context)) == ("", "", {})
    # ... and got the same decision from its engine ...
    assert grpc_decision == http_decision
    assert (grpc_decision.status, grpc_decision.code) == (status, code)
    # ... which reads the same on both wires.
    assert grpc_answer_ == http_answer_
    assert grpc_answer_.status == status
    assert grpc_answer_.metadata["code"] == code
    assert grpc_answer_.metadata["decision_id"] == grpc_decision.decision_id
    names = {name for name, _ in grpc_answer_.headers}
    assert set(must_have) <= names
    if status == 200:
        assert "authorization" in grpc_answer_.remove
        assert grpc_answer_.body == ""
    else:
        assert f'"code":"{code}"' in grpc_answer_.body
        assert '"request_id":"req-1"' in grpc_answer_.body


async def test_internal_error_reads_the_same_over_both_transports() -> None:
    """A check that raises: each transport's own fail-closed path (servicer / HTTP server), with
    the decision id from the injected source (the engine's ``new_decision_id`` by default)."""

    async def broken(attrs: RequestAttrs) -> Decision:
        raise RuntimeError("boom")

    errors: list[BaseException] = []
    check: Callable[[RequestAttrs], Awaitable[Decision]] = broken
    servicer = AuthorizationServicer(check, errors.append, new_id=lambda: "decision-503")
    server = HttpCheckServer(check, on_error=errors.append, new_id=lambda: "decision-503")
    port = await server.start("127.0.0.1", 0)
    try:
        headers = {"x-request-id": "req-9"}
        grpc_answer_ = grpc_answer(
            await servicer.Check(grpc_request("GET", "/orders/7", headers), None)
        )
        http_answer_ = http_answer(
            await http_exchange(port, http_request("GET", "/orders/7", headers))
        )
    finally:
        await server.close(grace_s=1.0)

    assert grpc_answer_ == http_answer_
    assert grpc_answer_ == Answer(
        allowed=False,
        status=503,
        headers=(("content-type", "application/json"),),
        remove=(),
        body='{"error":"temporarily_unavailable","code":"internal_error","request_id":"req-9"}',
        metadata={"decision_id": "decision-503", "code": "internal_error"},
    )
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError]


async def test_both_transports_take_decision_ids_from_the_engines_source() -> None:
    """One decision-id source: the answers a transport makes without the engine (internal error,
    rejections) draw from ``authz.engine.new_decision_id``, as the engine does."""

    async def check(attrs: RequestAttrs) -> Decision:
        raise AssertionError("not called")

    assert HttpCheckServer(check).new_id is new_decision_id
    assert AuthorizationServicer(check)._new_id is new_decision_id
    # And the HTTP server uses it for a transport rejection too (a malformed request: 400).
    ids = iter(["decision-400"])
    server = HttpCheckServer(check, new_id=lambda: next(ids))
    port = await server.start("127.0.0.1", 0)
    try:
        raw = await http_exchange(port, b"GET /orders/7 HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n")
    finally:
        await server.close(grace_s=1.0)
    answer = http_answer(raw)
    assert (answer.status, answer.metadata) == (
        400,
        {"decision_id": "decision-400", "code": "invalid_request"},
    )


def test_a_full_allow_block_cache_drops_its_oldest_block_not_all() -> None:
    # One eviction per new header set, never a clear() of all (docs/performance.md, "Many users
    # and the GC").
    http_convert._ALLOW_BLOCKS.clear()
    sets = [
        ((("x-user-id", f"u-{i}"),), ("x-roles",))
        for i in range(http_convert._ALLOW_BLOCKS_MAX + 1)
    ]
    first = [http_convert._allow_block(*s) for s in sets]
    assert len(http_convert._ALLOW_BLOCKS) == http_convert._ALLOW_BLOCKS_MAX
    assert http_convert._allow_block(*sets[1]) is first[1]  # still cached
    again = http_convert._allow_block(*sets[0])  # the oldest went when the last came
    assert again == first[0]
    assert again is not first[0]
