"""convert.py with real generated messages: whole CheckResponses compared against responses built
explicitly here, and request_to_attrs on fully populated CheckRequests."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from authz._proto.envoy.config.core.v3 import address_pb2, base_pb2
from authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from authz._proto.envoy.type.v3 import http_status_pb2
from authz._proto.google.rpc import status_pb2
from authz.policy.decisions import internal_error
from authz.policy.model import EMPTY_MAP, Decision, RequestAttrs
from authz.server import convert
from authz.server.convert import decision_to_response, request_id_of, request_to_attrs

HVO = base_pb2.HeaderValueOption
AC = attribute_context_pb2.AttributeContext


def overwrite(key: str, value: str) -> base_pb2.HeaderValueOption:
    """The only header option we ever send: append=false AND OVERWRITE_IF_EXISTS_OR_ADD."""
    opt = HVO(header=base_pb2.HeaderValue(key=key, value=value))
    opt.append.value = False  # present, false: touching the field sets it
    opt.append_action = HVO.OVERWRITE_IF_EXISTS_OR_ADD
    return opt


def metadata(resp: external_auth_pb2.CheckResponse, **values: str) -> None:
    for key, value in values.items():
        resp.dynamic_metadata.fields[key].string_value = value


def allow(**kw: object) -> Decision:
    return Decision(allowed=True, status=200, code="ok", reason="allowed", decision_id="d1", **kw)  # type: ignore[arg-type]


def deny(status: int, code: str, **kw: object) -> Decision:
    return Decision(allowed=False, status=status, code=code, reason="r", decision_id="d1", **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ allow


def test_allow_sets_headers_with_overwrite_and_removes_headers() -> None:
    d = allow(
        upstream_headers=(("x-user-id", "oid-1"), ("x-roles", "Orders.Read,Orders.Write")),
        remove_headers=("authorization", "x-scopes", "x-client-id"),
        metadata=MappingProxyType({"decision_id": "d1", "code": "ok", "api": "orders"}),
    )
    expected = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                overwrite("x-user-id", "oid-1"),
                overwrite("x-roles", "Orders.Read,Orders.Write"),
            ],
            headers_to_remove=["authorization", "x-scopes", "x-client-id"],
        ),
    )
    metadata(expected, decision_id="d1", code="ok", api="orders")

    got = decision_to_response(d)

    assert got == expected
    for opt in got.ok_response.headers:  # explicit, not defaults: the security-critical bit
        assert opt.HasField("append")
        assert opt.append.value is False
        assert opt.append_action == HVO.OVERWRITE_IF_EXISTS_OR_ADD
    assert b"\x12\x00" in got.ok_response.headers[0].SerializeToString()  # append present on wire


def test_allow_with_nothing_to_do_still_selects_ok_response() -> None:
    got = decision_to_response(allow())
    expected = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))
    expected.ok_response.SetInParent()
    assert got == expected
    assert got.WhichOneof("http_response") == "ok_response"
    assert got.HasField("status")
    assert not got.HasField("dynamic_metadata")


def test_dry_run_would_deny_is_an_allow_that_carries_the_real_code() -> None:
    d = Decision(
        allowed=True,
        status=403,
        code="missing_role",
        reason="r",
        decision_id="d2",
        would_deny=True,
        upstream_headers=(("x-user-id", "oid-1"),),
        remove_headers=("authorization",),
        metadata=MappingProxyType({"code": "missing_role", "would_deny": "true"}),
    )
    expected = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[overwrite("x-user-id", "oid-1")], headers_to_remove=["authorization"]
        ),
    )
    metadata(expected, code="missing_role", would_deny="true")
    assert decision_to_response(d) == expected


# ------------------------------------------------------------------------------------- deny


def denied(
    rpc: int, http: int, headers: list[tuple[str, str]], body: str
) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=rpc),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http),  # type: ignore[arg-type]
            headers=[overwrite(k, v) for k, v in headers],
            body=body,
        ),
    )


CHALLENGE = 'Bearer realm="orders", error="invalid_token"'


@pytest.mark.parametrize(
    ("status", "code", "headers", "body", "rpc"),
    [
        (401, "token_expired", [("www-authenticate", CHALLENGE)], '{"error":"invalid_token"}', 16),
        (401, "missing_token", [("www-authenticate", 'Bearer realm="orders"')], "", 16),
        (403, "missing_role", [("content-type", "application/json")], '{"error":"forbidden"}', 7),
        (400, "invalid_request", [("content-type", "application/json")], '{"e":"bad"}', 3),
        (429, "rate_limited", [("retry-after", "1")], "", 8),
        (503, "keys_unavailable", [("retry-after", "5")], "{}", 14),
        (500, "odd", [], "", 7),
        (404, "odd", [], "", 7),
    ],
    ids=["401-expired", "401-missing", "403", "400", "429", "503", "500-other", "404-other"],
)
def test_deny(status: int, code: str, headers: list[tuple[str, str]], body: str, rpc: int) -> None:
    d = deny(
        status,
        code,
        response_headers=tuple(headers),
        body=body.encode(),
        metadata=MappingProxyType({"decision_id": "d1", "code": code}),
    )
    expected = denied(rpc, status, headers, body)
    metadata(expected, decision_id="d1", code=code)
    assert decision_to_response(d) == expected


def test_deny_body_that_is_not_utf8_is_replaced_not_raised() -> None:
    got = decision_to_response(deny(403, "missing_role", body=b"ok\xff"))
    assert got == denied(7, 403, [], "ok\ufffd")


def test_internal_error_decision_renders_as_503_unavailable() -> None:
    got = decision_to_response(internal_error("d9", "req-9"))
    expected = denied(
        14,
        503,
        [("content-type", "application/json")],
        '{"error":"temporarily_unavailable","code":"internal_error","request_id":"req-9"}',
    )
    metadata(expected, decision_id="d9", code="internal_error")
    assert got == expected


def test_response_is_not_shared_between_calls() -> None:
    """Precomputed parts are copied in, never aliased: mutating one answer leaves others intact."""
    first = decision_to_response(deny(401, "missing_token"))
    first.status.code = 0
    assert decision_to_response(deny(401, "missing_token")).status.code == 16


def test_allows_with_the_same_headers_share_a_template_but_never_metadata() -> None:
    """The allow template is copied per answer: mutating one answer, or a second decision with
    the same headers and other metadata, leaves every other answer exactly as built."""
    headers = (("x-user-id", "u1"), ("x-roles", "Reader"))
    first = decision_to_response(
        allow(upstream_headers=headers, remove_headers=("authorization",), metadata={"a": "1"})
    )
    first.ok_response.headers[0].header.value = "forged"
    first.ok_response.headers_to_remove.append("x-extra")
    second = decision_to_response(
        allow(upstream_headers=headers, remove_headers=("authorization",), metadata={"b": "2"})
    )
    expected = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[overwrite("x-user-id", "u1"), overwrite("x-roles", "Reader")],
            headers_to_remove=["authorization"],
        ),
    )
    metadata(expected, b="2")
    assert second == expected


def test_allow_templates_are_bounded() -> None:
    for i in range(convert._OK_TEMPLATES_MAX + 10):
        decision_to_response(allow(upstream_headers=(("x-user-id", f"u{i}"),)))
        assert convert._ok_template.cache_info().currsize <= convert._OK_TEMPLATES_MAX


# ---------------------------------------------------------------------------------- request


def full_request() -> external_auth_pb2.CheckRequest:
    http = AC.HttpRequest(
        id="envoy-id-1",
        method="POST",
        headers={
            "authorization": "Bearer abc",
            "x-request-id": "xrid-1",
            "content-type": "application/json",
        },
        path="/v1/orders/42?expand=items",
        host="api.example.com",
        scheme="https",
        query="expand=items",
        size=17,
        protocol="HTTP/2",
        body='{"a":1}',
    )
    source = AC.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="10.1.2.3", port_value=55000)
        ),
        principal="spiffe://cluster.local/ns/a/sa/b",
    )
    destination = AC.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="10.9.9.9", port_value=8443)
        )
    )
    return external_auth_pb2.CheckRequest(
        attributes=AC(
            source=source,
            destination=destination,
            request=AC.Request(http=http),
            context_extensions={"api": "orders", "rules": "v2"},
            tls_session=AC.TLSSession(sni="api.example.com"),
        )
    )


def test_request_to_attrs_on_a_fully_populated_request() -> None:
    assert request_to_attrs(full_request()) == RequestAttrs(
        method="POST",
        path="/v1/orders/42?expand=items",
        host="api.example.com",
        scheme="https",
        headers={
            "authorization": "Bearer abc",
            "x-request-id": "xrid-1",
            "content-type": "application/json",
        },
        context={"api": "orders", "rules": "v2"},
        request_id="xrid-1",  # x-request-id first: the id Envoy forwards (HTTP transport too)
        source_address="10.1.2.3",
    )


def test_request_id_falls_back_to_envoy_stream_id_and_keys_are_lowercased() -> None:
    req = full_request()
    del req.attributes.request.http.headers["x-request-id"]
    req.attributes.request.http.headers["X-Odd-Case"] = "v"
    attrs = request_to_attrs(req)
    assert attrs.request_id == "envoy-id-1"
    assert attrs.headers["x-odd-case"] == "v"
    assert request_id_of(req) == "envoy-id-1"


def test_header_map_is_used_when_headers_is_empty_and_repeats_are_joined() -> None:
    """Envoy's encode_raw_headers: entries in header_map, repeats separate; we join them the way
    the headers map would, so two Authorization headers still look like two."""
    http = AC.HttpRequest(
        method="GET",
        path="/",
        header_map=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key="Authorization", raw_value=b"Bearer a"),
                base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer b"),
                base_pb2.HeaderValue(key="x-latin", raw_value=b"caf\xe9"),
                base_pb2.HeaderValue(key="x-text", value="t"),
            ]
        ),
    )
    req = external_auth_pb2.CheckRequest(attributes=AC(request=AC.Request(http=http)))
    assert request_to_attrs(req) == RequestAttrs(
        method="GET",
        path="/",
        headers={"authorization": "Bearer a, Bearer b", "x-latin": "caf\xe9", "x-text": "t"},
    )


def test_empty_request_converts_to_empty_attrs() -> None:
    attrs = request_to_attrs(external_auth_pb2.CheckRequest())
    assert attrs == RequestAttrs(method="", path="")
    assert attrs.context is EMPTY_MAP


def test_request_id_of_never_raises() -> None:
    assert request_id_of(None) == ""  # type: ignore[arg-type]


# ----------------------------------------------------------------------- decision_to_bytes

HEX_ID = "0123456789abcdef0123456789abcdef"
META = {"decision_id": HEX_ID, "api": "orders", "route": "read", "code": "ok", "oid": "o-1"}


@pytest.mark.parametrize(
    "decision",
    [
        allow(
            upstream_headers=(("x-user-id", "oid-1"), ("x-roles", "A,B")),
            remove_headers=("authorization",),
            metadata=MappingProxyType(META),
        ),
        allow(metadata=MappingProxyType({**META, "decision_id": "fedcba9876543210" * 2})),
        allow(metadata=MappingProxyType({**META, "rate_limit": "per-user", "code": "x"})),
        allow(metadata=MappingProxyType({"decision_id": HEX_ID})),
        allow(metadata=MappingProxyType({**META, "decision_id": "short"})),
        allow(metadata=MappingProxyType({**META, "decision_id": "é" * 32})),
        allow(metadata=MappingProxyType({"api": "orders"})),
        allow(),
        dataclasses.replace(
            allow(would_deny=True, metadata=MappingProxyType(META)), code="missing_role"
        ),
        deny(403, "missing_role", body=b"{}", metadata=MappingProxyType(META)),
        internal_error(HEX_ID, "req-1"),
    ],
    ids=[
        "allow",
        "other-id",
        "extra-key",
        "only-id",
        "id-not-32",
        "id-not-ascii",
        "no-id",
        "no-metadata",
        "dry-run",
        "deny",
        "internal-error",
    ],
)
def test_decision_to_bytes_parses_as_decision_to_response(decision: Decision) -> None:
    wire = convert.decision_to_bytes(decision)
    assert external_auth_pb2.CheckResponse.FromString(wire) == decision_to_response(decision)


def test_decision_to_bytes_never_mixes_two_callers_metadata() -> None:
    a = allow(metadata=MappingProxyType({**META, "oid": "alice"}))
    b = allow(metadata=MappingProxyType({**META, "oid": "bob", "decision_id": "f" * 32}))
    for d in (a, b, a):
        got = external_auth_pb2.CheckResponse.FromString(convert.decision_to_bytes(d))
        assert dict(got.dynamic_metadata.fields.items()) == dict(
            decision_to_response(d).dynamic_metadata.fields.items()
        )
        assert got.dynamic_metadata.fields["oid"].string_value == d.metadata["oid"]
