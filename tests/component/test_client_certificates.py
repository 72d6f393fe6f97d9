"""Issue 15: the client certificate Envoy saw, as each transport converter reads it, becomes the
RFC 8705 thumbprint the engine compares with a token's ``cnf["x5t#S256"]``: gRPC from
``attributes.source.certificate`` (URL-encoded PEM), HTTP from ``x-forwarded-client-cert``.
Certificates are generated here, at run time."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from authz._proto.envoy.service.auth.v3 import external_auth_pb2
from authz.dev.certs import DevCA, Issued
from authz.policy.model import UNREADABLE_CERT
from authz.server import convert, http_convert
from authz.server.clientcert import pem_x5t, xfcc_x5t


@pytest.fixture(scope="module")
def client() -> Issued:
    return DevCA().issue("client-a")


@pytest.fixture(scope="module")
def other() -> Issued:
    return DevCA().issue("client-b")


def grpc_attrs(certificate: str) -> str:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = "/orders/1"
    if certificate:
        req.attributes.source.certificate = certificate
    return convert.request_to_attrs(req).client_cert_x5t


def http_attrs(headers: dict[str, str]) -> str:
    attrs = http_convert.request_to_attrs("GET", b"/orders/1", headers)
    assert attrs is not None
    return attrs.client_cert_x5t


def test_grpc_reads_the_url_encoded_pem(client: Issued, other: Issued) -> None:
    assert grpc_attrs(quote(client.cert_pem.decode(), safe="")) == client.x5t
    assert grpc_attrs(quote(other.cert_pem.decode())) == other.x5t
    assert client.x5t != other.x5t
    assert len(client.x5t) == 43  # base64url of 32 bytes, unpadded


def test_grpc_without_a_certificate_is_empty_and_garbage_is_unreadable(client: Issued) -> None:
    assert grpc_attrs("") == ""
    assert grpc_attrs("-----BEGIN%20CERTIFICATE-----%0Anope%0A-----END%20CERTIFICATE-----") == (
        UNREADABLE_CERT
    )
    assert grpc_attrs(quote(client.key_pem.decode())) == UNREADABLE_CERT  # a key, not a cert
    assert grpc_attrs("%ff%fe") == UNREADABLE_CERT  # not UTF-8 once decoded
    assert pem_x5t("A" * 50_000) == UNREADABLE_CERT


def test_grpc_ignores_a_client_sent_xfcc_header(client: Issued) -> None:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.headers["x-forwarded-client-cert"] = f"Hash={client.sha256_hex}"
    assert convert.request_to_attrs(req).client_cert_x5t == ""


def test_http_reads_hash_from_envoys_xfcc(client: Issued) -> None:
    pem = quote(client.cert_pem.decode(), safe="")
    xfcc = (
        f'By=spiffe://cluster.local/ns/a/sa/b;Hash={client.sha256_hex};Cert="{pem}";Subject="CN=client-a,O=x;y";'
        "URI=spiffe://client"
    )
    assert http_attrs({"x-forwarded-client-cert": xfcc}) == client.x5t
    assert http_attrs({"x-forwarded-client-cert": f"Hash={client.sha256_hex.upper()}"}) == (
        client.x5t
    )


def test_http_falls_back_to_cert(client: Issued) -> None:
    pem = quote(client.cert_pem.decode(), safe="")
    assert http_attrs({"x-forwarded-client-cert": f'Cert="{pem}";Subject="CN=a"'}) == client.x5t
    assert http_attrs({"x-forwarded-client-cert": f"Cert={pem}"}) == client.x5t


@pytest.mark.parametrize(
    "xfcc",
    [
        "Hash={h},Hash={h}",  # two elements: a forwarded, client-supplied one among them
        "By=spiffe://x;Hash={h}, Hash={h}",
        "Hash={h};Hash={h}",  # which one is Envoy's?
        "Hash=abc",  # not a SHA-256
        "Hash=zz" + "0" * 62,  # not hex
        'Subject="CN=a"',  # neither Hash nor Cert
        "Hash",  # no '='
        'Cert="not-a-pem"',
    ],
)
def test_http_refuses_what_envoy_would_not_send(client: Issued, xfcc: str) -> None:
    assert http_attrs({"x-forwarded-client-cert": xfcc.format(h=client.sha256_hex)}) == (
        UNREADABLE_CERT
    )


def test_http_without_xfcc_is_empty() -> None:
    assert http_attrs({}) == ""
    assert xfcc_x5t("") == ""


def test_quoted_separators_do_not_split(client: Issued) -> None:
    value = f'Subject="CN=a\\",b;c,d";Hash={client.sha256_hex}'
    assert xfcc_x5t(value) == client.x5t
