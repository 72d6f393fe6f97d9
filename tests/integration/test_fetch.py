"""Key fetching in enterprise networks (issue 11, item 17): a CA bundle, HTTPS_PROXY/NO_PROXY, and
failure messages that name the real cause. Real parts on 127.0.0.1: an ssl-wrapped http.server
with a CA and leaf made at run time, and a small asyncio CONNECT proxy."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authz import config as config_mod
from authz.identity.fetch import describe_fetch_error, key_fetch_client
from authz.identity.keys import KeyStore
from authz.policy.model import IssuerSpec

pytestmark = pytest.mark.integration

TENANT = "11111111-1111-4111-8111-111111111111"
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Pki:
    ca_pem: Path
    other_ca_pem: Path
    cert: Path
    key: Path


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("test corp CA")
    _, other = _ca("some other CA")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(d / "ca.pem", d / "other.pem", d / "leaf.pem", d / "leaf.key")
    pki.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.other_ca_pem.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


class _Json(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_url(pki: Pki) -> Iterator[str]:
    """A real HTTPS server on 127.0.0.1 with a leaf signed by the run-time CA."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Json)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert, pki.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Proxy:
    url: str
    connects: list[str] = field(default_factory=list)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _proxy(refuse: bool) -> tuple[asyncio.Server, Proxy]:
    proxy = Proxy("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        proxy.connects.append(f"{method} {target}")
        host, port = target.rsplit(":", 1)
        if method != "CONNECT" or refuse or host != "127.0.0.1":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return server, proxy


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    server, p = await _proxy(refuse=False)
    async with server:
        yield p


@pytest.fixture
async def refusing_proxy() -> AsyncIterator[Proxy]:
    server, p = await _proxy(refuse=True)
    async with server:
        yield p


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)


async def refresh_log(
    client: httpx.AsyncClient, instance: str, caplog: pytest.LogCaptureFixture
) -> str:
    """The error line KeyStore logs when it cannot fetch ``instance``'s documents."""
    spec = IssuerSpec(name="contoso", instance=instance, tenant=TENANT, fetch_timeout_s=5.0)
    store = KeyStore((spec,), client)
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh("contoso") == "error"
    await store.close()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    return line


async def test_ca_bundle_config_key_verifies_the_idp(pki: Pki, https_url: str) -> None:
    async with key_fetch_client(str(pki.ca_pem)) as client:
        r = await client.get(f"{https_url}/jwks")
    assert r.status_code == 200
    assert r.json() == {"path": "/jwks"}


async def test_ssl_cert_file_is_the_fallback(
    pki: Pki, https_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    async with key_fetch_client() as client:
        assert (await client.get(https_url)).status_code == 200
    # The config key wins over the environment.
    async with key_fetch_client(str(pki.other_ca_pem)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(https_url)


async def test_unknown_ca_logs_the_tls_reason(
    https_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with key_fetch_client() as client:
        line = await refresh_log(client, https_url, caplog)
    assert f"GET {https_url}/" in line
    assert "TLS error: certificate verify failed: unable to get local issuer certificate" in line


async def test_https_proxy_carries_the_fetch_and_no_proxy_bypasses_it(
    pki: Pki, https_url: str, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with key_fetch_client(str(pki.ca_pem)) as client:
        assert (await client.get(https_url)).status_code == 200
    assert proxy.connects == [f"CONNECT {https_url.removeprefix('https://')}"]

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with key_fetch_client(str(pki.ca_pem)) as client:
        assert (await client.get(https_url)).status_code == 200
    assert len(proxy.connects) == 1


async def test_proxy_refusal_is_named_and_its_credentials_redacted(
    https_url: str,
    refusing_proxy: Proxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with_secret = refusing_proxy.url.replace("http://", "http://alice:s3cret@")
    monkeypatch.setenv("HTTPS_PROXY", with_secret)
    async with key_fetch_client() as client:
        line = await refresh_log(client, https_url, caplog)
        with pytest.raises(httpx.ProxyError) as err:
            await client.get(f"{https_url}/x?code=secret-value")
    assert refusing_proxy.connects, "the fetch went through the proxy"
    assert "proxy refused the connection: 403 Forbidden" in line
    assert "s3cret" not in caplog.text
    message = describe_fetch_error(err.value)
    assert message == "proxy refused the connection: 403 Forbidden"


async def test_dns_failure_names_the_host(caplog: pytest.LogCaptureFixture) -> None:
    async with key_fetch_client() as client:
        line = await refresh_log(client, "https://login.idp.invalid", caplog)
    assert "GET https://login.idp.invalid/" in line
    assert "DNS resolution failed" in line


async def test_connection_refused_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port bound but not listening refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        async with key_fetch_client() as client:
            line = await refresh_log(client, f"http://127.0.0.1:{port}", caplog)
    assert "connection refused" in line


def test_describe_redacts_userinfo_and_query_and_is_bounded() -> None:
    try:
        try:
            raise OSError("via http://bob:hunter2@proxy.corp:3128/?token=abc " + "x" * 1000)
        except OSError as inner:
            raise httpx.ConnectError("boom") from inner
    except httpx.ConnectError as e:
        text = describe_fetch_error(e)
    assert "hunter2" not in text
    assert "token=abc" not in text
    assert "http://***@proxy.corp:3128/" in text
    assert len(text) <= 300


def _config(ca_bundle: str) -> str:
    return f"""
tokens:
  ca_bundle: "{ca_bundle}"
issuers:
  - {{name: contoso, tenant: {TENANT}}}
apis:
  - name: orders
    audiences: [api://orders]
    issuers: [contoso]
    routes:
      - {{name: r, path: /x, require: authenticated}}
"""


def test_ca_bundle_config_key(pki: Pki, tmp_path: Path) -> None:
    assert config_mod.parse(_config(str(pki.ca_pem)), env={}).tokens.ca_bundle == str(pki.ca_pem)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for path, why in [
        (tmp_path / "missing.pem", "cannot read the CA bundle"),
        (garbage, "is not a PEM bundle of CA certificates"),
    ]:
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse(_config(str(path)), env={})
        assert any(p.startswith("tokens.ca_bundle: ") and why in p for p in err.value.problems), (
            err.value.problems
        )


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectTimeout("t"), "connect timeout"),
        (httpx.ReadTimeout("t"), "read timeout"),
        (httpx.PoolTimeout("t"), "timeout (PoolTimeout)"),
        (
            _chained(httpx.ConnectError("x"), ssl.SSLError(1, "[SSL] wrong version number")),
            "TLS error: [SSL] wrong version number",
        ),
        (
            _chained(httpx.ConnectError("x"), OSError("[Errno -2] Name or service not known")),
            "DNS resolution failed: [Errno -2] Name or service not known",
        ),
        (httpx.RemoteProtocolError(""), "RemoteProtocolError"),
    ],
    ids=["connect-timeout", "read-timeout", "pool-timeout", "tls", "dns-text", "bare"],
)
def test_describe_names_each_cause(exc: BaseException, expected: str) -> None:
    assert describe_fetch_error(exc) == expected
