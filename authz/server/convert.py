"""Protobuf <-> our types: ``CheckRequest`` -> ``RequestAttrs``, ``Decision`` -> ``CheckResponse``
(or straight to its wire bytes, ``decision_to_bytes``: what the server sends).

The ONLY module that touches generated ``*_pb2`` messages (``servicer`` touches ``*_pb2_grpc``
alone). Both functions are pure and on the hot path: everything constant (google.rpc statuses,
the ``append=false`` wrapper, the overwrite action) is built once at import time.

Header semantics are security-critical (docs/protos.md, notes/envoy.md): every header we set is
sent with ``append=false`` AND ``append_action=OVERWRITE_IF_EXISTS_OR_ADD``, because which of the
two Envoy reads changed across versions and the proto default of ``append_action`` appends to a
client-supplied value.

Must not import anything from ``authz.engine``/``authz.identity`` or do I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import cast

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from authz._proto.envoy.config.core.v3 import base_pb2
from authz._proto.envoy.service.auth.v3 import external_auth_pb2
from authz._proto.envoy.type.v3 import http_status_pb2
from authz._proto.google.rpc import status_pb2
from authz.policy.model import EMPTY_MAP, Decision, RequestAttrs
from authz.server.clientcert import pem_x5t

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse

# google.rpc.Code values (https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto)
RPC_OK = 0
RPC_INVALID_ARGUMENT = 3
RPC_PERMISSION_DENIED = 7
RPC_RESOURCE_EXHAUSTED = 8
RPC_UNAVAILABLE = 14
RPC_UNAUTHENTICATED = 16

# HTTP status of a denial -> google.rpc code of CheckResponse.status. Envoy only tests != 0; the
# code is for humans reading gRPC logs.
RPC_CODE_BY_HTTP_STATUS: Mapping[int, int] = {
    400: RPC_INVALID_ARGUMENT,
    401: RPC_UNAUTHENTICATED,
    403: RPC_PERMISSION_DENIED,
    429: RPC_RESOURCE_EXHAUSTED,
    503: RPC_UNAVAILABLE,
}

_OK_STATUS = status_pb2.Status(code=RPC_OK)
_DENY_STATUS = {http: status_pb2.Status(code=rpc) for http, rpc in RPC_CODE_BY_HTTP_STATUS.items()}
_DEFAULT_DENY_STATUS = status_pb2.Status(code=RPC_PERMISSION_DENIED)
_APPEND_FALSE = base_pb2.HeaderValueOption(append={"value": False}).append
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def request_to_attrs(req: CheckRequest) -> RequestAttrs:
    """What Envoy told us about the request, as a frozen ``RequestAttrs``.

    Header keys are lower-cased (Envoy already sends them so; we do not rely on it). With
    ``encode_raw_headers`` Envoy sends ``header_map`` instead of ``headers``; repeated entries are
    then comma-joined, matching what the ``headers`` map carries without that option.
    """
    attributes = req.attributes
    http = attributes.request.http
    if http.headers:
        headers = {k.lower(): v for k, v in http.headers.items()}
    else:
        headers = _headers_from_map(http.header_map.headers)
    context = attributes.context_extensions
    # The downstream TLS client's certificate (URL-encoded PEM), present only with
    # include_peer_certificate: true on an mTLS listener. Envoy fills it from the connection, so
    # no client can forge it; an x-forwarded-client-cert header is NOT read over gRPC.
    certificate = attributes.source.certificate
    return RequestAttrs(
        method=http.method,
        path=http.path,
        host=http.host,
        scheme=http.scheme,
        headers=headers,
        context=dict(context) if context else EMPTY_MAP,
        request_id=headers.get("x-request-id", "") or http.id,
        source_address=attributes.source.address.socket_address.address,
        client_cert_x5t=pem_x5t(certificate) if certificate else "",
    )


def _headers_from_map(entries: Iterable[base_pb2.HeaderValue]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for entry in entries:
        key = entry.key.lower()
        # raw_value carries the bytes as received; latin-1 maps every byte to one code point.
        value = entry.value or entry.raw_value.decode("latin-1")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def request_id_of(req: CheckRequest) -> str:
    """The request id for an error response; never raises (used when conversion itself failed)."""
    try:
        http = req.attributes.request.http
        return str(http.headers.get("x-request-id", "") or http.id)
    except Exception:  # the request is whatever broke conversion: give up on the id, not the answer
        return ""


def _add_headers(
    target: RepeatedCompositeFieldContainer[base_pb2.HeaderValueOption],
    pairs: Iterable[tuple[str, str]],
) -> None:
    # ``add`` with a dict for the header measured fastest (about 1 us per header) of extend(),
    # kwargs construction and field-by-field assignment.
    add = target.add
    for key, value in pairs:
        add(header={"key": key, "value": value}, append=_APPEND_FALSE, append_action=_OVERWRITE)


_OK_TEMPLATES_MAX = 4096


@functools.lru_cache(maxsize=_OK_TEMPLATES_MAX)
def _ok_template(upstream: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> CheckResponse:
    """The status and ``ok_response`` of an allow, built once per header set and never mutated.

    The same caller gets the same identity headers on every cached check: copying a built
    message (~1 µs, in C) instead of adding each header (~1 µs per header) saves most of the
    conversion. Bounded (least recently used dropped)."""
    template = CheckResponse()
    template.status.CopyFrom(_OK_STATUS)
    ok = template.ok_response
    ok.SetInParent()  # the oneof must say "ok" even with nothing to add or remove
    if upstream:
        _add_headers(ok.headers, upstream)
    if remove:
        ok.headers_to_remove.extend(remove)
    return template


@functools.lru_cache(maxsize=_OK_TEMPLATES_MAX)
def _ok_wire(upstream: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> bytes:
    """``_ok_template`` serialised, once per header set."""
    return _ok_template(upstream, remove).SerializeToString()


def _metadata_wire(items: Iterable[tuple[str, str]]) -> bytes:
    """A ``CheckResponse`` holding only ``dynamic_metadata`` with these strings, serialised."""
    resp = CheckResponse()
    fields = resp.dynamic_metadata.fields
    for key, value in items:
        fields[key].string_value = value
    return resp.SerializeToString()


_META_WIRE_MAX = 4096
_static_metadata_wire = functools.lru_cache(maxsize=_META_WIRE_MAX)(_metadata_wire)
_ID_KEY = "decision_id"
_ID_LEN = 32  # new_decision_id(): 128 bits, hex
# The wire form of {"decision_id": <32 ASCII chars>} is a fixed prefix then the 32 bytes: the
# prefix (field tags and lengths only) is taken from protobuf's own encoding, once.
_ID_PROBE = "0" * _ID_LEN
_ID_PREFIX = _metadata_wire(((_ID_KEY, _ID_PROBE),)).removesuffix(_ID_PROBE.encode("ascii"))


def decision_to_bytes(d: Decision) -> bytes:
    """``decision_to_response(d).SerializeToString()``, parsed by any protobuf reader as the same
    message, built without a message per check on the common path (an allow).

    Protobuf's wire format merges repeated occurrences of a singular message field (and unions
    map entries): so an allow is the serialised template of its header set, then its metadata
    minus the decision id (serialised once per distinct value set), then the decision id (a fixed
    prefix and the id's 32 bytes). Anything else (a deny, an id of another shape) is built and
    serialised as a message. The equivalence is tested on every shape (tests/component)."""
    if not d.allowed:
        return decision_to_response(d).SerializeToString()
    head = _ok_wire(d.upstream_headers, d.remove_headers)
    meta = d.metadata
    if not meta:
        return head
    decision_id = meta.get(_ID_KEY)
    if decision_id is None or len(decision_id) != _ID_LEN or not decision_id.isascii():
        return head + _metadata_wire(meta.items())
    rest = tuple(item for item in meta.items() if item[0] != _ID_KEY)
    tail = _static_metadata_wire(rest) if rest else b""
    return b"".join((head, tail, _ID_PREFIX, decision_id.encode("ascii")))


def decision_to_response(d: Decision) -> CheckResponse:
    """Render a decision. ``d.allowed`` (dry-run ``would_deny`` included) -> status 0 and
    ``ok_response``; otherwise a non-zero status and ``denied_response`` with the HTTP status,
    headers and body the client gets. ``d.metadata`` -> ``dynamic_metadata`` when non-empty."""
    resp = CheckResponse()
    if d.allowed:
        resp.CopyFrom(_ok_template(d.upstream_headers, d.remove_headers))
    else:
        resp.status.CopyFrom(_DENY_STATUS.get(d.status, _DEFAULT_DENY_STATUS))
        denied = resp.denied_response
        # The enum is open (proto3): any HTTP status number is valid on the wire.
        denied.status.code = cast(http_status_pb2.StatusCode, d.status)
        if d.response_headers:
            _add_headers(denied.headers, d.response_headers)
        if d.body:
            denied.body = d.body.decode("utf-8", "replace")
    if d.metadata:
        fields = resp.dynamic_metadata.fields  # faster than Struct.update() for string values
        for key, value in d.metadata.items():
            fields[key].string_value = value
    return resp
