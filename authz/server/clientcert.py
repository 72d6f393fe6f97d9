"""The client certificate Envoy saw -> its RFC 8705 thumbprint (``RequestAttrs.client_cert_x5t``).

Used by the two transport converters: ``convert`` reads the gRPC ``attributes.source.certificate``
(URL-encoded PEM, sent when the ext_authz filter sets ``include_peer_certificate: true``),
``http_convert`` the ``x-forwarded-client-cert`` header Envoy sets (``Hash=`` hex SHA-256 of the
DER, or ``Cert=`` URL-encoded PEM). The thumbprint is base64url(SHA-256(DER)) without padding,
the form of a token's ``cnf["x5t#S256"]``. Anything we cannot read becomes ``UNREADABLE_CERT``:
a certificate was there, and it matches no token (fail closed).

Pure: cryptography for parsing, no I/O; must not import grpc, asyncio or ``authz._proto``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authz.policy.model import UNREADABLE_CERT

__all__ = ["digest_x5t", "pem_x5t", "xfcc_x5t"]

_MAX_PEM = 16384  # a client certificate is 1-3 KB; Envoy's headers are capped anyway


def digest_x5t(digest: bytes) -> str:
    """The RFC 8705 thumbprint form of a SHA-256 digest."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=256)  # one entry per client certificate: repeat callers cost nothing
def pem_x5t(urlencoded_pem: str) -> str:
    """The thumbprint of the (first) certificate in URL-encoded PEM text, as Envoy sends it;
    ``UNREADABLE_CERT`` when the text is not a PEM certificate."""
    if len(urlencoded_pem) > _MAX_PEM * 3:
        return UNREADABLE_CERT
    try:
        cert = x509.load_pem_x509_certificate(unquote(urlencoded_pem, errors="strict").encode())
    except (ValueError, UnicodeError):
        return UNREADABLE_CERT
    return digest_x5t(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest())


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC values quote ',', ';' and '=')."""
    if '"' not in text:
        return text.split(sep)  # nothing quoted: the common Hash=...;URI=... value
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


@functools.lru_cache(maxsize=256)  # a client sends the same value on every request
def xfcc_x5t(value: str) -> str:
    """The thumbprint in an ``x-forwarded-client-cert`` value ("" when the header is absent).

    Exactly one element is accepted: Envoy's ``SANITIZE_SET`` replaces whatever the client sent
    with one element for the current connection, so several elements mean a proxy forwarded
    client-supplied ones (APPEND_FORWARD, FORWARD_ONLY), which nobody can vouch for. Of that
    element ``Hash`` (64 hex digits) is used, else ``Cert``; anything else is unreadable."""
    if not value:
        return ""
    elements = _split(value, ",")
    if len(elements) != 1:
        return UNREADABLE_CERT
    fields: dict[str, str] = {}
    for pair in _split(elements[0], ";"):
        key, eq, raw = pair.strip().partition("=")
        if not eq:
            return UNREADABLE_CERT
        key = key.lower()
        if key in fields and key in ("hash", "cert"):
            return UNREADABLE_CERT  # two of them: which one is Envoy's?
        fields[key] = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    digest = fields.get("hash")
    if digest is not None:
        try:
            raw_digest = bytes.fromhex(digest)
        except ValueError:
            return UNREADABLE_CERT
        return digest_x5t(raw_digest) if len(raw_digest) == 32 else UNREADABLE_CERT
    cert = fields.get("cert")
    return pem_x5t(cert) if cert else UNREADABLE_CERT
