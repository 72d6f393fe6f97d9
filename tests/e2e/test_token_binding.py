"""Issue 15, through the real Envoy with downstream mTLS (envoy/sidecar-mtls.yaml and
envoy/sidecar-http-mtls.yaml): certificate-bound access tokens (RFC 8705) on both transports.
The CA, Envoy's server certificate and the client certificates are generated at run time.

The API requires bound tokens (``require_bound_tokens: always``): a bound token with its
certificate passes; another certificate, no certificate, and an unbound token are 401s; and an
``x-forwarded-client-cert`` a client writes itself proves nothing (Envoy's SANITIZE_SET)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from authz.dev.certs import Issued
from authz.dev.stack import Stack, stack_config
from tests.e2e.conftest import TRANSPORTS, running

# The stack's configuration ({instance}: filled in by Stack), the orders API requiring binding.
CONFIG = stack_config("{instance}").replace(
    "    realm: orders\n", "    realm: orders\n    require_bound_tokens: always\n", 1
)


@pytest.fixture(scope="module", params=TRANSPORTS)
def mtls(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    transport: str = request.param
    workdir = tmp_path_factory.mktemp(f"mtls-{transport}")
    yield from running(Stack(workdir, transport=transport, config_text=CONFIG, mtls=True))


@pytest.fixture(scope="module")
def certs(mtls: Stack) -> tuple[Issued, Issued]:
    return mtls.client_cert("client-a"), mtls.client_cert("client-b")


def code(reply: Any) -> str:
    return str(json.loads(reply.body)["code"])


def test_bound_token_with_its_certificate_passes(mtls: Stack, certs: tuple[Issued, Issued]) -> None:
    mine, _ = certs
    token = mtls.mint(cnf_x5t=mine.x5t)
    reply = mtls.request("GET", "/orders/1", token=token, cert=mine)
    assert reply.status == 200, reply.body
    seen = reply.backend_headers
    assert seen["x-user-id"]
    assert seen["x-actor-kind"] == "human"
    # the backend learns the verified certificate too (Envoy's own XFCC)
    assert f"Hash={mine.sha256_hex}" in seen["x-forwarded-client-cert"]


def test_another_certificate_is_a_mismatch(mtls: Stack, certs: tuple[Issued, Issued]) -> None:
    mine, other = certs
    reply = mtls.request("GET", "/orders/1", token=mtls.mint(cnf_x5t=mine.x5t), cert=other)
    assert reply.status == 401
    assert code(reply) == "token_binding_mismatch"
    www = reply.headers["www-authenticate"]
    assert 'error="invalid_token"' in www


def test_no_certificate_is_missing(mtls: Stack, certs: tuple[Issued, Issued]) -> None:
    mine, _ = certs
    reply = mtls.request("GET", "/orders/1", token=mtls.mint(cnf_x5t=mine.x5t))
    assert (reply.status, code(reply)) == (401, "token_binding_missing")
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]


def test_an_unbound_token_is_refused_when_the_api_requires_binding(
    mtls: Stack, certs: tuple[Issued, Issued]
) -> None:
    mine, _ = certs
    reply = mtls.request("GET", "/orders/1", token=mtls.mint(), cert=mine)
    assert (reply.status, code(reply)) == (401, "token_not_bound")


def test_a_client_written_xfcc_proves_nothing(mtls: Stack, certs: tuple[Issued, Issued]) -> None:
    """The thumbprint is in the token for anyone to read: a thief writes it into its own
    x-forwarded-client-cert. Envoy's SANITIZE_SET drops that header (no certificate on the
    connection) or replaces it (another one), on both transports."""
    mine, other = certs
    token = mtls.mint(cnf_x5t=mine.x5t)
    pem = mine.cert_pem.decode().replace("\n", "%0A").replace(" ", "%20")
    forged = {"x-forwarded-client-cert": f'Hash={mine.sha256_hex};Cert="{pem}"'}
    reply = mtls.request("GET", "/orders/1", token=token, headers=forged)
    assert (reply.status, code(reply)) == (401, "token_binding_missing")
    reply = mtls.request("GET", "/orders/1", token=token, headers=forged, cert=other)
    assert (reply.status, code(reply)) == (401, "token_binding_mismatch")


def test_the_denial_is_audited_with_its_code(mtls: Stack, certs: tuple[Issued, Issued]) -> None:
    mine, other = certs
    mtls.request("GET", "/orders/1", token=mtls.mint(cnf_x5t=mine.x5t), cert=other)
    metrics = mtls.metrics_text()
    assert 'code="token_binding_mismatch"' in metrics
