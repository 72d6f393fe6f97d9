"""The dev issuer and echo backend over real HTTP on 127.0.0.1 (httpx clients)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from authz.dev.echo import EchoServer
from authz.dev.idp import CONTOSO, FABRIKAM, MSA_TENANT, DevIdP
from authz.dev.idp import cli as devidp_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "contoso.onmicrosoft.com"
JWK_FIELDS = {"kty", "use", "kid", "x5t", "n", "e", "x5c"}


@pytest.fixture
def idp() -> Iterator[DevIdP]:
    """A fresh issuer, for tests that change its state."""
    with DevIdP(tenants=(CONTOSO, FABRIKAM), domains={DOMAIN: CONTOSO}) as running:
        yield running


@pytest.fixture(scope="module")
def shared_idp() -> Iterator[DevIdP]:
    """One issuer for the read-only tests (key generation costs ~0.1 s per key)."""
    with DevIdP(tenants=(CONTOSO, FABRIKAM), domains={DOMAIN: CONTOSO}) as running:
        yield running


@pytest.fixture
def client(idp: DevIdP) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idp.base_url, timeout=5) as c:
        yield c


@pytest.fixture
def shared_client(shared_idp: DevIdP) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_idp.base_url, timeout=5) as c:
        yield c


def get_json(client: httpx.Client, path: str) -> Any:
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def verify(client: httpx.Client, token: str, jwks_path: str, **kwargs: Any) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    [jwk] = [k for k in get_json(client, jwks_path)["keys"] if k["kid"] == kid]
    return jwt.decode(token, jwt.PyJWK(jwk, algorithm="RS256"), algorithms=["RS256"], **kwargs)


# -- discovery documents ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "url_tenant", "iss_tenant"),
    [
        (CONTOSO, CONTOSO, CONTOSO),
        (FABRIKAM, FABRIKAM, FABRIKAM),
        (CONTOSO.upper(), CONTOSO, CONTOSO),
        (DOMAIN, CONTOSO, CONTOSO),
        ("common", "common", "{tenantid}"),
        ("organizations", "organizations", "{tenantid}"),
        ("consumers", "consumers", MSA_TENANT),
    ],
    ids=["contoso", "fabrikam", "upper-guid", "domain", "common", "organizations", "consumers"],
)
def test_metadata(
    shared_idp: DevIdP, shared_client: httpx.Client, segment: str, url_tenant: str, iss_tenant: str
) -> None:
    base = shared_idp.base_url
    v2 = get_json(shared_client, f"/{segment}/v2.0/.well-known/openid-configuration")
    assert v2["issuer"] == f"{base}/{iss_tenant}/v2.0"
    assert v2["issuer"] == shared_idp.issuer(iss_tenant)
    assert v2["jwks_uri"] == f"{base}/{url_tenant}/discovery/v2.0/keys"
    assert v2["authorization_endpoint"] == f"{base}/{url_tenant}/oauth2/v2.0/authorize"
    assert v2["token_endpoint"] == f"{base}/{url_tenant}/oauth2/v2.0/token"
    assert v2["id_token_signing_alg_values_supported"] == ["RS256"]
    v1 = get_json(shared_client, f"/{segment}/.well-known/openid-configuration")
    assert v1["issuer"] == f"{base}/sts/{iss_tenant}/"
    assert v1["issuer"] == shared_idp.issuer(iss_tenant, "1.0")
    assert v1["jwks_uri"] == f"{base}/{url_tenant}/discovery/keys"
    assert v1["token_endpoint"] == f"{base}/{url_tenant}/oauth2/token"


@pytest.mark.parametrize(
    "path",
    [
        "/nope/v2.0/.well-known/openid-configuration",
        f"/{MSA_TENANT[:-1]}0/.well-known/openid-configuration",
        "/fabrikam.onmicrosoft.com/discovery/v2.0/keys",
        "/33333333-3333-4333-8333-333333333333/discovery/keys",
    ],
    ids=["word", "other-guid", "unknown-domain", "unconfigured-guid"],
)
def test_unknown_tenant_is_400_like_entra(shared_client: httpx.Client, path: str) -> None:
    r = shared_client.get(path)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "invalid_tenant"
    assert body["error_codes"] == [90002]
    assert body["error_description"].startswith("AADSTS90002: Tenant '")


@pytest.mark.parametrize(
    "path", ["/", "/favicon.ico", f"/{CONTOSO}/discovery/v3.0/keys", "/_dev/nothing"]
)
def test_unknown_route_is_404(shared_client: httpx.Client, path: str) -> None:
    assert shared_client.get(path).status_code == 404


# -- JWKS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "key_issuer"),
    [
        (CONTOSO, CONTOSO),
        (DOMAIN, CONTOSO),
        ("common", "{tenantid}"),
        ("organizations", "{tenantid}"),
        ("consumers", MSA_TENANT),
    ],
    ids=["tenant", "domain", "common", "organizations", "consumers"],
)
def test_v2_jwks_shape(
    shared_idp: DevIdP, shared_client: httpx.Client, segment: str, key_issuer: str
) -> None:
    keys = get_json(shared_client, f"/{segment}/discovery/v2.0/keys")["keys"]
    assert [k["kid"] for k in keys] == list(shared_idp.kids)
    assert len(keys) == 2
    for k in keys:
        assert set(k) == JWK_FIELDS | {"issuer"}
        assert (k["kty"], k["use"], k["e"]) == ("RSA", "sig", "AQAB")
        assert k["x5t"] == k["kid"]
        assert "alg" not in k
        expected = MSA_TENANT if k["kid"] == shared_idp.msa_kid else key_issuer
        assert k["issuer"] == f"{shared_idp.base_url}/{expected}/v2.0"


@pytest.mark.parametrize("segment", [CONTOSO, DOMAIN, "common", "organizations", "consumers"])
def test_v1_jwks_has_no_issuer(
    shared_idp: DevIdP, shared_client: httpx.Client, segment: str
) -> None:
    keys = get_json(shared_client, f"/{segment}/discovery/keys")["keys"]
    assert [k["kid"] for k in keys] == list(shared_idp.kids)
    for k in keys:
        assert set(k) == JWK_FIELDS
    assert keys[0] == shared_idp.public_jwk(shared_idp.active_kid)
    assert keys[1] == shared_idp.public_jwk(shared_idp.msa_kid)


@pytest.mark.parametrize("version", ["2.0", "1.0"])
@pytest.mark.parametrize("kind", ["user", "app"])
def test_minted_tokens_verify_against_published_keys(
    shared_idp: DevIdP, shared_client: httpx.Client, version: str, kind: str
) -> None:
    meta_path = (
        f"/{CONTOSO}/v2.0/.well-known/openid-configuration"
        if version == "2.0"
        else f"/{CONTOSO}/.well-known/openid-configuration"
    )
    meta = get_json(shared_client, meta_path)
    token = shared_idp.mint(version=version, kind=kind)
    claims = verify(
        shared_client,
        token,
        meta["jwks_uri"].removeprefix(shared_idp.base_url),
        audience="api://orders",
        issuer=meta["issuer"],
    )
    assert claims["ver"] == version
    assert claims["tid"] == CONTOSO
    if kind == "app":
        assert claims["roles"] == ["Orders.Read.All"]
        assert claims["idtyp"] == "app"
    else:
        assert claims["scp"] == "Orders.Read"


def test_msa_key_has_concrete_foreign_issuer(
    shared_idp: DevIdP, shared_client: httpx.Client
) -> None:
    token = shared_idp.mint(tid=CONTOSO, kid=shared_idp.msa_kid)
    assert jwt.get_unverified_header(token)["kid"] == shared_idp.msa_kid
    keys = get_json(shared_client, "/common/discovery/v2.0/keys")["keys"]
    [msa] = [k for k in keys if k["kid"] == shared_idp.msa_kid]
    # The signature is fine; only the key-issuer rule can reject this token.
    claims = verify(shared_client, token, "/common/discovery/v2.0/keys", audience="api://orders")
    assert msa["issuer"] != claims["iss"]
    assert msa["issuer"] == shared_idp.issuer(MSA_TENANT)
    # An MSA-tenant token defaults to the MSA key.
    msa_token = shared_idp.mint(tid=MSA_TENANT)
    assert jwt.get_unverified_header(msa_token)["kid"] == shared_idp.msa_kid


# -- rotation ---------------------------------------------------------------------------------


def test_rotate_and_retire(idp: DevIdP, client: httpx.Client) -> None:
    old = idp.active_kid
    old_token = idp.mint()
    new = idp.rotate()
    assert new != old
    assert idp.active_kid == new
    assert idp.kids == (old, new, idp.msa_kid)
    published = [k["kid"] for k in get_json(client, f"/{CONTOSO}/discovery/v2.0/keys")["keys"]]
    assert set(published) == {old, new, idp.msa_kid}
    new_token = idp.mint()
    assert jwt.get_unverified_header(new_token)["kid"] == new
    verify(client, old_token, f"/{CONTOSO}/discovery/v2.0/keys", audience="api://orders")

    idp.retire(old)
    assert idp.kids == (new, idp.msa_kid)
    published = [k["kid"] for k in get_json(client, f"/{CONTOSO}/discovery/keys")["keys"]]
    assert old not in published
    # The retired key can still sign (for "token signed by a retired key" tests).
    assert jwt.get_unverified_header(idp.mint(kid=old))["kid"] == old
    assert idp.private_key(old) is not idp.private_key()
    with pytest.raises(KeyError):
        idp.retire(old)
    with pytest.raises(KeyError):
        idp.retire(idp.msa_kid)
    with pytest.raises(KeyError):
        idp.mint(kid="no-such-kid")


def test_sign_raw(shared_idp: DevIdP, shared_client: httpx.Client) -> None:
    payload = b'{"aud":"api://orders","tid":"%s","tid":"%s"}' % (
        CONTOSO.encode(),
        FABRIKAM.encode(),
    )
    token = shared_idp.sign({"alg": "RS256", "kid": shared_idp.active_kid}, payload)
    claims = verify(
        shared_client, token, f"/{CONTOSO}/discovery/v2.0/keys", audience="api://orders"
    )
    assert claims["tid"] == FABRIKAM
    hdr = jwt.get_unverified_header(
        shared_idp.mint(header_extra={"kid": "bogus"}, header_remove=("typ",))
    )
    assert hdr == {"alg": "RS256", "kid": "bogus"}


# -- failure switches and counters ------------------------------------------------------------

DOC_PATHS = [
    f"/{CONTOSO}/v2.0/.well-known/openid-configuration",
    f"/{CONTOSO}/.well-known/openid-configuration",
    f"/{CONTOSO}/discovery/v2.0/keys",
    f"/{CONTOSO}/discovery/keys",
    "/common/discovery/v2.0/keys",
]


def test_outage(idp: DevIdP, client: httpx.Client) -> None:
    idp.set_outage(True)
    for path in DOC_PATHS:
        assert client.get(path).status_code == 503
    assert client.get("/_dev/stats").json()["outage"] is True
    assert client.post("/_dev/token", json={}).status_code == 200
    idp.set_outage(False)
    for path in DOC_PATHS:
        assert client.get(path).status_code == 200


def test_garbled(idp: DevIdP, client: httpx.Client) -> None:
    idp.set_garbled(True)
    for path in DOC_PATHS[2:]:
        r = client.get(path)
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            r.json()
    assert get_json(client, DOC_PATHS[0])["issuer"] == idp.issuer(CONTOSO)
    idp.set_garbled(True, body=b'{"keys": "not a list"}')
    assert client.get(DOC_PATHS[2]).json() == {"keys": "not a list"}
    idp.set_garbled(False)
    assert len(get_json(client, DOC_PATHS[2])["keys"]) == 2


def test_request_counts(idp: DevIdP, client: httpx.Client) -> None:
    assert idp.request_count() == 0
    for _ in range(3):
        client.get(f"/{CONTOSO}/discovery/v2.0/keys")
    client.get(f"/{CONTOSO}/v2.0/.well-known/openid-configuration?x=1")
    client.get("/nope/discovery/keys")
    assert idp.request_count("/discovery/v2.0/keys") == 3
    assert idp.request_count("keys") == 4
    assert idp.request_count("openid-configuration") == 1
    assert idp.request_count(CONTOSO) == 4
    assert idp.request_count() == 5
    stats = client.get("/_dev/stats").json()
    assert stats["counts"][f"/{CONTOSO}/discovery/v2.0/keys"] == 3
    assert stats["active_kid"] == idp.active_kid
    assert stats["kids"] == list(idp.kids)
    idp.reset_counts()
    assert idp.request_count() == 0
    client.post("/_dev/reset")
    assert idp.request_count() == 0


# -- dev endpoints ----------------------------------------------------------------------------


def test_dev_token_endpoint(idp: DevIdP, client: httpx.Client) -> None:
    r = client.post(
        "/_dev/token",
        json={
            "tid": FABRIKAM,
            "version": "1.0",
            "kind": "app",
            "aud": "api://inventory",
            "roles": ["Inventory.Write"],
            "lifetime": 120,
            "extra": {"xms_cc": ["cp1"]},
            "remove": ["rh"],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    claims = verify(
        client,
        body["access_token"],
        f"/{FABRIKAM}/discovery/keys",
        audience="api://inventory",
        issuer=idp.issuer(FABRIKAM, "1.0"),
    )
    assert claims["roles"] == ["Inventory.Write"]
    assert claims["xms_cc"] == ["cp1"]
    assert claims["exp"] - claims["iat"] == 120
    assert "rh" not in claims
    # Explicit null omits a claim that would otherwise default.
    tok = client.post("/_dev/token", json={"scp": None}).json()["access_token"]
    assert "scp" not in jwt.decode(tok, options={"verify_signature": False})


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"bogus": 1}',
        b'{"roles": "a"}',
        b'{"lifetime": "60"}',
        b'{"kind": "robot"}',
        b'{"kid": "nope"}',
        b'{"extra": []}',
    ],
    ids=["not-json", "array", "unknown", "roles-str", "lifetime-str", "kind", "kid", "extra"],
)
def test_dev_token_rejects_bad_bodies(shared_client: httpx.Client, body: bytes) -> None:
    r = shared_client.post("/_dev/token", content=body)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"


def test_dev_control_endpoints(idp: DevIdP, client: httpx.Client) -> None:
    old = idp.active_kid
    new = client.post("/_dev/rotate").json()["kid"]
    assert idp.active_kid == new
    r = client.post("/_dev/retire", json={"kid": old})
    assert r.json() == {"retired": old, "kids": [new, idp.msa_kid]}
    assert client.post("/_dev/retire", json={"kid": old}).status_code == 400
    assert client.post("/_dev/retire", json={}).status_code == 400
    assert client.post("/_dev/outage", json={"on": True}).json() == {"outage": True}
    assert client.get(DOC_PATHS[0]).status_code == 503
    assert client.post("/_dev/outage", json={"on": False}).json() == {"outage": False}
    assert client.post("/_dev/outage", json={"on": "yes"}).status_code == 400
    assert client.post("/_dev/garbled").json() == {"garbled": True}
    assert client.get(DOC_PATHS[2]).status_code == 200
    assert client.get("/_dev/stats").json()["garbled"] is True
    assert client.post("/_dev/garbled", json={"on": False}).json() == {"garbled": False}
    assert client.post("/_dev/unknown").status_code == 404


# -- lifecycle and concurrency ----------------------------------------------------------------


def test_lifecycle() -> None:
    idp = DevIdP(tenants=(CONTOSO,))
    with pytest.raises(RuntimeError):
        _ = idp.base_url
    assert idp.start() is idp
    assert idp.base_url.startswith("http://127.0.0.1:")
    with httpx.Client() as c:
        c.get(f"{idp.base_url}/{CONTOSO}/discovery/keys")
    idp.stop()
    idp.stop()
    with pytest.raises(ValueError, match="GUID"):
        DevIdP(tenants=("contoso",))
    with pytest.raises(ValueError, match="unconfigured"):
        DevIdP(tenants=(CONTOSO,), domains={"x.example": FABRIKAM})


def test_concurrent_fetches_while_rotating(idp: DevIdP) -> None:
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            with httpx.Client(base_url=idp.base_url, timeout=5) as c:
                for _ in range(10):
                    assert c.get(f"/{CONTOSO}/discovery/v2.0/keys").status_code == 200
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(3):
        idp.rotate()
    for t in threads:
        t.join()
    assert errors == []
    assert idp.request_count("keys") == 80
    assert len(idp.kids) == 5


# -- echo backend -----------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def test_echo_reports_repeated_headers(echo: EchoServer) -> None:
    with httpx.Client(base_url=echo.url, timeout=5) as c:
        r = c.get(
            "/orders/1?a=b",
            headers=[("X-User-Id", "forged"), ("x-user-id", "real"), ("X-One", "1")],
        )
        assert r.status_code == 200
        doc = r.json()
        assert doc["method"] == "GET"
        assert doc["path"] == "/orders/1?a=b"
        assert doc["headers"]["x-user-id"] == ["forged", "real"]
        assert doc["headers"]["x-one"] == "1"
        assert "X-One" not in doc["headers"]
        assert r.http_version == "HTTP/1.1"


def test_echo_any_method_and_body_over_keep_alive(echo: EchoServer) -> None:
    assert echo.url == f"http://127.0.0.1:{echo.port}"
    with httpx.Client(base_url=echo.url, timeout=5) as c:
        for method in ("POST", "PUT", "PATCH", "DELETE", "PURGE"):
            r = c.request(method, "/x", content=b"payload")
            assert r.json()["method"] == method
            assert r.json()["body"] == "payload"
            assert "close" not in r.headers.get("connection", "")
        assert c.head("/x").status_code == 200


def test_echo_stops_with_idle_keep_alive_connections() -> None:
    server = EchoServer().start()
    with httpx.Client(base_url=server.url, timeout=5) as c:
        c.get("/")
        started = time.monotonic()
        server.stop()  # the client still holds its connection open
        assert time.monotonic() - started < 5
    server.stop()


# -- CLI --------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="authz")
    devidp_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_mint(idp: DevIdP, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        "dev-idp", "mint", "--url", idp.base_url, "--tenant", FABRIKAM, "--app", "--v1",
        "--role", "A", "--role", "B", "--lifetime", "60",
    )  # fmt: skip
    assert args.func(args) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["roles"] == ["A", "B"]
    assert claims["iss"] == idp.issuer(FABRIKAM, "1.0")
    assert claims["appid"] == "bbbbbbbb-0000-4000-8000-00000000000b"


@pytest.mark.parametrize(
    ("agent", "kind", "idtyp"),
    [("autonomous", "app", "app"), ("agent-user", "user", "user"), ("on-behalf-of", "user", None)],
)
def test_cli_mints_agent_and_bound_tokens(
    idp: DevIdP, capsys: pytest.CaptureFixture[str], agent: str, kind: str, idtyp: str | None
) -> None:
    args = parse("dev-idp", "mint", "--url", idp.base_url, "--agent", agent, "--cnf-x5t", "T")
    assert args.func(args) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["xms_par_app_azp"] == "30cf4c22-9985-4ef7-8756-91cc888176bd"
    assert "11" in claims["xms_act_fct"].split()
    assert claims.get("idtyp") == idtyp
    assert ("roles" in claims) == (kind == "app")
    assert claims["cnf"] == {"x5t#S256": "T"}


def test_mint_refuses_an_agent_kind_that_contradicts_the_token_kind(idp: DevIdP) -> None:
    with pytest.raises(ValueError, match="autonomous agent token is app-only"):
        idp.mint(kind="user", agent="autonomous")
    with pytest.raises(ValueError, match="agent must be one of"):
        idp.mint(agent="robot")
    reply = httpx.post(f"{idp.base_url}/_dev/token", json={"agent": 1}, timeout=5)
    assert reply.status_code == 400


def test_cli_mint_errors(idp: DevIdP, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("dev-idp", "mint", "--url", idp.base_url, "--aud", "x", "--scp", "A B")
    assert args.func(args) == 0
    assert jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})[
        "scp"
    ] == ("A B")
    idp.stop()
    args = parse("dev-idp", "mint", "--url", idp.base_url)
    assert args.func(args) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_cli_parsers_and_snippet(idp: DevIdP) -> None:
    serve = parse("dev-idp", "serve", "--port", "0", "--tenant", CONTOSO)
    assert (serve.host, serve.port, serve.tenant) == ("127.0.0.1", 0, [CONTOSO])
    assert serve.func is devidp_cli.cmd_serve
    assert parse("echo").port == 9500
    snippet = devidp_cli.config_snippet(idp)
    assert f'instance: "{idp.base_url}"' in snippet
    assert f'tenant: "{FABRIKAM}"' in snippet


_RUN_CLI = (
    "import argparse, sys\n"
    "from authz.dev.idp import cli\n"
    "p = argparse.ArgumentParser(prog='authz')\n"
    "cli.register(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


@pytest.mark.parametrize(
    ("argv", "probe"),
    [
        (["dev-idp", "serve", "--port", "0", "--tenant", CONTOSO], f"/{CONTOSO}/discovery/keys"),
        (["echo", "--port", "0"], "/anything"),
    ],
    ids=["dev-idp-serve", "echo"],
)
def test_cli_servers_run_until_sigterm(argv: list[str], probe: str) -> None:
    cmd = [sys.executable, "-W", "error", "-c", _RUN_CLI, *argv]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    ) as proc:
        # Reads below have no timeout of their own: a hung server is killed instead.
        killer = threading.Timer(20, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            assert url, line
            assert httpx.get(url.group(1) + probe, timeout=5).status_code == 200
            proc.send_signal(signal.SIGTERM)
            # Read through the same buffered pipe as readline() (communicate() would skip
            # whatever readline() already buffered).
            out = line + proc.stdout.read()
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.wait(timeout=10)
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    if argv[0] == "dev-idp":
        assert "NOT FOR PRODUCTION" in err
        assert "instance:" in out


def test_cli_serve_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("dev-idp", "serve", "--tenant", "not-a-guid")
    assert args.func(args) == 2
    args = parse("dev-idp", "serve", "--domain", "nodomain")
    assert args.func(args) == 2
    assert "DOMAIN=GUID" in capsys.readouterr().err


def test_cli_port_in_use(idp: DevIdP, echo: EchoServer, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(idp.base_url.rsplit(":", 1)[1])
    args = parse("dev-idp", "serve", "--port", port)
    assert args.func(args) == 1
    args = parse("echo", "--port", str(echo.port))
    assert args.func(args) == 1
    assert "cannot listen" in capsys.readouterr().err


def test_echo_reads_chunked_bodies(echo: EchoServer) -> None:
    def parts() -> Iterator[bytes]:
        yield b"hello "
        yield b"world"

    with httpx.Client(base_url=echo.url, timeout=5) as c:
        r = c.post("/up", content=parts())
        assert r.json()["headers"]["transfer-encoding"] == "chunked"
        assert r.json()["body"] == "hello world"
        assert c.get("/next").json()["path"] == "/next"  # the connection is still in sync
