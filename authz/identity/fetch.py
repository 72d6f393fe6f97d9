"""The HTTP client that fetches OIDC discovery documents and JWKS, and the wording of its failures.

Enterprise networks put an HTTPS proxy and a TLS-inspecting CA between the service and the IdP, so
the client honours ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY`` and a CA bundle
(``tokens.ca_bundle``, else ``SSL_CERT_FILE``, else certifi's bundle).

It is built with ``trust_env=False`` and reads *only* the proxy variables (through httpx's own
parser, so ``NO_PROXY`` means what it means to httpx and curl): ``trust_env=True`` would also read
``~/.netrc`` and send any credentials found there for the IdP's host as Basic auth, which nobody
wants sent to an identity provider. See docs/validation.md, "Enterprise networks".
"""

from __future__ import annotations

import os
import re
import socket
import ssl

import httpx
from httpx._utils import get_environment_proxies  # httpx's NO_PROXY semantics (pinned httpx)

__all__ = ["ca_bundle_path", "describe_fetch_error", "key_fetch_client", "proxy_mounts"]

FETCH_TIMEOUT_S = 10.0
MAX_DESCRIPTION = 300

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"[?#][^\s'\"]*")


def ca_bundle_path(configured: str | None) -> str | None:
    """The CA bundle to verify the IdP against: the config key, else ``SSL_CERT_FILE``, else
    ``None`` (certifi's bundle, httpx's default)."""
    return configured or os.environ.get("SSL_CERT_FILE") or None


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    if ca_bundle is None:
        return httpx.create_ssl_context()
    return ssl.create_default_context(cafile=ca_bundle)


def proxy_mounts(ctx: ssl.SSLContext) -> dict[str, httpx.AsyncBaseTransport | None]:
    """``{url pattern: transport}`` from the proxy variables; ``None`` (a ``NO_PROXY`` entry)
    means the direct transport."""
    return {
        pattern: None if url is None else httpx.AsyncHTTPTransport(verify=ctx, proxy=url)
        for pattern, url in get_environment_proxies().items()
    }


def key_fetch_client(ca_bundle: str | None = None) -> httpx.AsyncClient:
    """The discovery/JWKS client: proxies from the environment, the CA bundle, no redirects,
    no ``.netrc``."""
    ctx = _ssl_context(ca_bundle_path(ca_bundle))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(FETCH_TIMEOUT_S),
        follow_redirects=False,
        trust_env=False,
        transport=httpx.AsyncHTTPTransport(verify=ctx),
        mounts=proxy_mounts(ctx),
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _clean(text: str) -> str:
    """No userinfo (a proxy URL may carry ``user:password@``), no query string, bounded."""
    text = _QUERY.sub("", _USERINFO.sub(r"\1***@", text))
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def _describe(chain: list[BaseException]) -> str:
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
            return f"TLS error: certificate verify failed: {why}"
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {getattr(e, 'reason', None) or e.strerror or type(e).__name__}"
    for e in chain:
        if isinstance(e, httpx.ProxyError):
            return f"proxy refused the connection: {e}"
    for e in chain:
        if isinstance(e, socket.gaierror):
            return f"DNS resolution failed: {e.strerror or e}"
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
    for e in chain:
        if isinstance(e, httpx.ConnectTimeout):
            return "connect timeout"
        if isinstance(e, httpx.ReadTimeout):
            return "read timeout"
        if isinstance(e, httpx.TimeoutException | TimeoutError):
            return f"timeout ({type(e).__name__})"
    for e in chain:
        text = str(e)
        if "Name or service not known" in text or "nodename nor servname" in text:
            return f"DNS resolution failed: {text}"
    first = chain[0]
    root = next((e for e in reversed(chain) if str(e)), None)  # the innermost with a message
    if root is None:
        return type(first).__name__
    if root is first:
        return f"{type(first).__name__}: {first}"
    return f"{type(first).__name__}: {type(root).__name__}: {root}"


def describe_fetch_error(exc: BaseException) -> str:
    """The real cause of a failed fetch, from the whole ``__cause__``/``__context__`` chain: TLS
    verification (with the ssl reason), proxy refusal (with the proxy's status), DNS, connection
    refused, connect/read timeout; else the exception class and message. Bounded, redacted."""
    return _clean(_describe(_chain(exc)))
