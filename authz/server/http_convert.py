"""Envoy's HTTP ext_authz wire <-> our types: request -> ``RequestAttrs``, ``Decision`` -> bytes.

The HTTP counterpart of ``authz.server.convert`` (gRPC): ``request_to_attrs`` turns what the
parser read (method, request target, headers) into the frozen ``RequestAttrs`` the engine checks,
and ``render_decision`` turns the engine's ``Decision`` into the complete HTTP/1.1 answer. Both are
pure and on the hot path: everything constant (status lines, transport rejections) is rendered
once at import time, and the identity-header block of an allow once per header set.

Header semantics (docs/http-transport.md, notes/envoy.md): on allow, Envoy *overwrites* the
upstream request's headers with ours that match ``allowed_upstream_headers`` (the same
"overwrite, never append" that ``convert`` asks for with ``append=false`` +
``OVERWRITE_IF_EXISTS_OR_ADD``) and removes those named in ``x-envoy-auth-headers-to-remove``;
on deny, the status, body and headers matching ``allowed_client_headers`` go to the client.
Decision metadata travels as ``x-authz-*`` headers (``dynamic_metadata_from_headers``) on both.
What differs from gRPC on the wire is listed in tests/component/test_transport_symmetry.py.

Must not import grpc, prometheus, asyncio, anything from ``authz._proto`` or do I/O.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from http import HTTPStatus
from types import MappingProxyType

from authz.policy.decisions import deny, internal_error
from authz.policy.errors import BadRequest, Code
from authz.policy.model import Decision, RequestAttrs
from authz.server.clientcert import xfcc_x5t

__all__ = [
    "UnsafeHeaderError",
    "render_decision",
    "render_internal_error",
    "render_outside_prefix",
    "render_rejection",
    "request_to_attrs",
]

# ------------------------------------------------------------------------------------- requests


def request_to_attrs(
    method: str, target: bytes, headers: dict[str, str], path_prefix: str = ""
) -> RequestAttrs | None:
    """What Envoy's HTTP check request told us, as a frozen ``RequestAttrs``; ``None`` when the
    request target is not under ``path_prefix`` (or is not an absolute path): not a check.

    ``target`` is the raw request target (``path_prefix`` + the original path and query);
    ``headers`` are as the parser collected them: names lower-cased, repeated headers
    comma-joined, as ``convert.request_to_attrs`` sees them over gRPC. The dict is wrapped, not
    copied: the caller hands it over and never touches it again. HTTP carries no scheme, source
    address nor context extensions: those fields stay empty. The client certificate comes from
    ``x-forwarded-client-cert``, which the shipped mTLS configs let only Envoy set
    (``forward_client_cert_details: SANITIZE_SET``; docs/token-kinds.md).
    """
    path = target.decode("latin-1")
    if path_prefix:
        if not path.startswith(path_prefix):
            return None
        path = path[len(path_prefix) :]
    if not path.startswith("/"):
        return None
    return RequestAttrs(
        method=method,
        path=path,
        host=headers.get("host", ""),
        headers=MappingProxyType(headers),
        request_id=headers.get("x-request-id", ""),
        client_cert_x5t=xfcc_x5t(headers.get("x-forwarded-client-cert", "")),
    )


# ------------------------------------------------------------------------------------ constants


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


# Precomputed once: status lines for every valid status, and the constant tails.
_STATUS_LINES: dict[int, bytes] = {s: _status_line(s) for s in range(100, 600)}
_ALLOW_STATUS = _STATUS_LINES[200]
_CLOSE = b"connection: close\r\n"
_REMOVE = "x-envoy-auth-headers-to-remove"

# Decision metadata travels as response headers: Envoy's dynamic_metadata_from_headers maps them
# into the ext_authz namespace. The well-known keys come first and fall back to the Decision's own
# fields, so decision id and code are always there; further metadata keys follow as
# ``x-authz-<key with dashes>``.
_META_HEADERS: tuple[tuple[str, str], ...] = (
    ("decision_id", "x-authz-decision-id"),
    ("code", "x-authz-code"),
    ("api", "x-authz-api"),
    ("route", "x-authz-route"),
)
_META_KNOWN = frozenset(k for k, _ in _META_HEADERS)
_META_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


@functools.lru_cache(maxsize=256)  # metadata keys are a handful of constants from code
def _meta_header(key: str) -> str | None:
    if not key or not set(key) <= _META_KEY_CHARS:
        return None
    return "x-authz-" + key.replace("_", "-")


def _bad_request_bytes(status: int, code: str) -> bytes:
    """A transport-level rejection (never reaches the engine), rendered once at import."""
    body = f'{{"error":"invalid_request","code":"{code}"}}'.encode("ascii")
    return b"".join(
        (
            _STATUS_LINES[status],
            b"content-type: application/json\r\n",
            f"x-authz-code: {code}\r\n".encode("ascii"),
            f"content-length: {len(body)}\r\n".encode("ascii"),
            _CLOSE,
            b"\r\n",
            body,
        )
    )


_REJECT_BYTES: dict[int, bytes] = {
    400: _bad_request_bytes(400, "invalid_request"),
    413: _bad_request_bytes(413, "invalid_request"),
    414: _bad_request_bytes(414, "invalid_request"),
    431: _bad_request_bytes(431, "invalid_request"),
    503: _bad_request_bytes(503, "internal_error"),
}
# A well-formed request whose path is not under path_prefix: answered, connection kept.
_OUTSIDE_PREFIX = _REJECT_BYTES[400].replace(_CLOSE, b"")
_OUTSIDE_PREFIX_HEAD = _OUTSIDE_PREFIX[: _OUTSIDE_PREFIX.index(b"\r\n\r\n") + 4]
_REJECT_400_HEAD = _REJECT_BYTES[400][: _REJECT_BYTES[400].index(b"\r\n\r\n") + 4]


class UnsafeHeaderError(ValueError):
    """A decision carried header text that would break HTTP framing (CR, LF or NUL)."""


# ------------------------------------------------------------------------------------- rendering


def render_decision(d: Decision, *, head: bool = False, close: bool = False) -> bytes:
    """The complete HTTP/1.1 answer to Envoy for one decision.

    Allow -> 200 with ``upstream_headers``, ``x-envoy-auth-headers-to-remove`` and the metadata
    headers, empty body. Deny -> ``d.status`` with ``response_headers``, the metadata headers and
    ``d.body`` (omitted, with its length kept, when answering a HEAD request, as HTTP demands).
    Raises ``UnsafeHeaderError`` (or ``ValueError``) when the decision cannot be rendered safely; a
    deny whose status Envoy would read as an allow (200) or that is not a final error/redirect
    status counts as unsafe: the caller then renders ``internal_error`` instead.
    """
    if d.allowed:
        decision_id = d.metadata.get("decision_id") or d.decision_id
        if decision_id.isascii() and decision_id.isalnum():
            return _allow_answer(d, decision_id, close)
    return _render(d, head, close)


def _render(d: Decision, head: bool, close: bool) -> bytes:
    if d.allowed:
        status_line = _ALLOW_STATUS
        fixed = _allow_block(d.upstream_headers, d.remove_headers)
        body = b""
    else:
        if not 300 <= d.status <= 599:
            raise ValueError(f"deny with status {d.status} would not read as a deny")
        status_line = _STATUS_LINES[d.status]
        fixed = _header_block([f"{n}: {v}" for n, v in d.response_headers])
        body = d.body
    meta = d.metadata
    parts = [
        f"x-authz-decision-id: {meta.get('decision_id') or d.decision_id}",
        f"x-authz-code: {meta.get('code') or d.code}",
    ]
    api = meta.get("api") or d.api
    if api:
        parts.append(f"x-authz-api: {api}")
    route = meta.get("route") or d.route
    if route:
        parts.append(f"x-authz-route: {route}")
    if len(meta) > 2:
        for key, value in meta.items():
            if key not in _META_KNOWN and value and (name := _meta_header(key)):
                parts.append(f"{name}: {value}")
    parts.append(f"content-length: {len(body)}")
    if close:
        parts.append("connection: close")
    head_bytes = status_line + fixed + _header_block(parts) + b"\r\n"
    if head or not body:
        return head_bytes
    return head_bytes + body


_ID_LINE = b"x-authz-decision-id: "
_ALLOW_ANSWERS: dict[tuple[object, ...], tuple[bytes, bytes]] = {}
_ALLOW_ANSWERS_MAX = 4096


def _allow_answer(d: Decision, decision_id: str, close: bool) -> bytes:
    """An allow whose decision id is plain ASCII letters and digits (``new_decision_id``'s).

    Everything but the id depends only on the identity headers, the metadata and ``close``: the
    same for every check of one caller on one route. That answer is rendered once by
    ``_render`` and kept split around the id (bounded); a check only splices its own id in. The
    key holds every input of the answer but the id, so it is never another caller's."""
    meta = d.metadata
    key = (
        d.upstream_headers,
        d.remove_headers,
        d.code,
        d.api,
        d.route,
        close,
        tuple(item for item in meta.items() if item[0] != "decision_id"),
    )
    parts = _ALLOW_ANSWERS.get(key)
    if parts is None:
        whole = _render(d, False, close)
        head = _ALLOW_STATUS + _allow_block(d.upstream_headers, d.remove_headers) + _ID_LINE
        tail = whole[len(head) + len(decision_id) :]
        if whole != head + decision_id.encode("ascii") + tail:  # pragma: no cover - a bug
            raise ValueError("allow answer does not start with its decision id")
        if len(_ALLOW_ANSWERS) >= _ALLOW_ANSWERS_MAX:  # the oldest goes, not all (GC: perf doc)
            del _ALLOW_ANSWERS[next(iter(_ALLOW_ANSWERS))]
        parts = _ALLOW_ANSWERS[key] = (head, tail)
    return b"".join((parts[0], decision_id.encode("ascii"), parts[1]))


def _header_block(parts: list[str]) -> bytes:
    """``name: value\\r\\n`` lines; raises UnsafeHeaderError when any text would break framing."""
    if not parts:
        return b""
    block = "\r\n".join(parts)
    # One scan each instead of per-value checks: every line break must be one of ours.
    lines = len(parts) - 1
    if block.count("\n") != lines or block.count("\r") != lines or "\x00" in block:
        raise UnsafeHeaderError("header text contains CR, LF or NUL")
    return block.encode("utf-8") + b"\r\n"


# Full: the oldest block goes, one per new one, never a clear() of all (with more users than
# blocks a clear freed thousands of objects at once, which the GC's young-generation count does
# not see: docs/performance.md, "Many users and the GC").
_ALLOW_BLOCKS: OrderedDict[tuple[tuple[tuple[str, str], ...], tuple[str, ...]], bytes] = (
    OrderedDict()
)
_ALLOW_BLOCKS_MAX = 4096


def _allow_block(upstream: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> bytes:
    """The identity-header lines of an allow. The same caller gets the same headers on every
    cached check, so they are rendered (and checked) once; the cache is bounded."""
    key = (upstream, remove)
    block = _ALLOW_BLOCKS.get(key)
    if block is None:
        parts = [f"{n}: {v}" for n, v in upstream]
        if remove:
            parts.append(f"{_REMOVE}: {','.join(remove)}")
        block = _header_block(parts)
        if len(_ALLOW_BLOCKS) >= _ALLOW_BLOCKS_MAX:
            _ALLOW_BLOCKS.popitem(last=False)
        _ALLOW_BLOCKS[key] = block
    return block


def render_internal_error(
    decision_id: str, request_id: str, *, head: bool = False, close: bool = False
) -> bytes:
    """The explicit fail-closed answer for a check that raised: 503 ``internal_error``."""
    return render_decision(internal_error(decision_id, request_id), head=head, close=close)


def render_rejection(status: int, decision_id: str, request_id: str) -> bytes:
    """An early transport rejection (400/413/414/431/503) in the same shape as an engine deny:
    JSON body with code and request_id, decision metadata, the 400 challenge; then close."""
    if status == 503:
        return render_internal_error(decision_id, request_id, close=True)
    base = deny(
        BadRequest(Code.INVALID_REQUEST),
        decision_id=decision_id,
        request_id=request_id[:200],
        api=None,
        route=None,
    )
    try:
        return render_decision(dataclasses.replace(base, status=status), close=True)
    except ValueError:  # a request id that cannot be echoed safely is dropped
        return _REJECT_BYTES[status]


def render_outside_prefix(*, head: bool, close: bool) -> bytes:
    """The 400 ``invalid_request`` for a well-formed request whose target is outside
    ``path_prefix`` (``request_to_attrs`` returned None): no check ran, so no decision id."""
    if close:
        return _REJECT_400_HEAD if head else _REJECT_BYTES[400]
    return _OUTSIDE_PREFIX_HEAD if head else _OUTSIDE_PREFIX
