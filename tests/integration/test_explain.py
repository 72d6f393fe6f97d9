"""`authz explain`: every check, pass/fail, for allowed and denied requests; keys from live
discovery (the dev IdP over HTTP) or from a JWKS file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from authz import cli
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import stack_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


@pytest.fixture(scope="module")
def config(idp: DevIdP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explain") / "authz.yaml"
    path.write_text(stack_config(idp.base_url))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = cli.main(["explain", *args])
    return rc, capsys.readouterr().out


def test_allowed_request_lists_every_check(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.mint(aud="api://orders", scp="Orders.Read")
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", token)
    assert rc == 0
    for line in (
        "PASS path canonical: /orders/7",
        "PASS api: orders",
        "PASS route: read (template /orders/{id})",
        "PASS aud in",
        "PASS iss is issuer 'contoso'",
        "PASS not expired",
        "PASS valid already (nbf)",
        "PASS not issued in the future (iat)",
        "allowed by issuer 'contoso'",
        "PASS verify:",
        "PASS alternative 1: {token_kind=user, scopes_any=['Orders.Read']}",
        "FAIL alternative 2",
        "decision: ALLOW 200 ok",
        "sets x-user-id:",
    ):
        assert line in out, line
    assert token.split(".")[2] not in out  # never the signature


def test_denied_request_says_why(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.mint(aud="api://orders", scp="Orders.Read")
    rc, out = run(
        capsys,
        "--config",
        str(config),
        "--method",
        "POST",
        "--path",
        "/orders",
        "--api",
        "orders",
        "--token",
        f"Bearer {token}",
    )
    assert rc == 1
    assert "FAIL any role of ['Orders.Write']" in out
    assert "decision: DENY 403 missing_role" in out
    assert 'scope="Orders.Write"' in out


def test_wrong_audience_and_no_token(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.mint(aud="api://inventory", scp="Orders.Read")
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", token)
    assert rc == 1
    assert "FAIL aud in" in out
    assert "FAIL verify: audience_mismatch" in out
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7")
    assert rc == 1
    assert "token: none sent" in out
    assert "decision: DENY 401 missing_token" in out


def test_paths_and_routes(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/a;b=1")
    assert rc == 1
    assert "FAIL path: non_canonical_path" in out
    rc, out = run(capsys, "--config", str(config), "--path", "/nowhere")
    assert "FAIL api: none matches" not in out or "unknown_api" in out
    rc, out = run(capsys, "--config", str(config), "--method", "PATCH", "--path", "/orders/7/x")
    assert "FAIL route: none matches" in out
    assert "no_matching_route" in out


def test_keys_from_a_jwks_file(
    idp: DevIdP, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = httpx.get(f"{idp.base_url}/{CONTOSO}/discovery/v2.0/keys", trust_env=False).content
    path = tmp_path / "keys.json"
    path.write_bytes(jwks)
    token = idp.mint(aud="api://orders", scp="Orders.Read")
    rc, out = run(
        capsys,
        "--config",
        str(config),
        "--path",
        "/orders/7",
        "--token",
        token,
        "--jwks",
        str(path),
    )
    # the dev IdP's issuer is not an Entra-shaped login host, so the offline issuer strings are
    # the instance-relative ones; the signature check uses the file's keys either way
    assert "kid known" in out or "iss is issuer" in out
    assert rc in (0, 1)
    path.write_text(json.dumps({"keys": "garbled"}))
    rc, out = run(
        capsys,
        "--config",
        str(config),
        "--path",
        "/orders/7",
        "--token",
        token,
        "--jwks",
        str(path),
    )
    assert rc == 2


def test_token_from_stdin(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    token = idp.mint(aud="api://orders", scp="Orders.Read")
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", "-")
    assert rc == 0
    assert "decision: ALLOW" in out


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apis: [")
    rc, _ = run(capsys, "--config", str(bad), "--path", "/x")
    assert rc == 2


def test_a_revoked_token_is_explained(
    idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "revocations.json"
    config = tmp_path / "authz.yaml"
    config.write_text(stack_config(idp.base_url, revocations=rules))
    oid = "99999999-9999-4999-8999-999999999999"
    token = idp.mint(aud="api://orders", scp="Orders.Read", oid=oid)
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", token)
    assert rc == 0
    assert "PASS not revoked (0 rule(s) in force)" in out
    assert cli.main(["revoke", "add", "--file", str(rules), "--id", "gone", "--oid", oid,
                     "--expires-in", "1h", "--reason", "left the company"]) == 0  # fmt: skip
    capsys.readouterr()
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", token)
    assert rc == 1
    assert "FAIL not revoked (1 rule(s) in force)" in out
    assert f"FAIL rule gone: {{'oid': '{oid}'}}: left the company" in out
    assert "decision: DENY 401 token_revoked" in out
    rules.write_text('{"rules": [{"id": "bad"}]}')
    rc = cli.main(["explain", "--config", str(config), "--path", "/orders/7", "--token", token])
    assert rc == 2
    assert "rules[0].reason: required key is missing" in capsys.readouterr().err


def test_the_actor_check_is_explained(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.mint(aud="api://orders", agent="agent-user")
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/7", "--token", token)
    assert rc == 1
    for line in (
        "xms_par_app_azp = '30cf4c22-9985-4ef7-8756-91cc888176bd'",
        "xms_sub_fct = '13'",
        "PASS verify: signature, issuer, key issuer, lifetime, tenant, claim types "
        "(user token, actor agent)",
        "FAIL actor agent admitted by actor=(default: no agents)",
        "decision: DENY 403 actor_not_allowed",
    ):
        assert line in out, line
    rc, out = run(capsys, "--config", str(config), "--path", "/orders/agents/x", "--token", token)
    assert rc == 0
    assert "PASS requirement: {actor=agent}" in out
    assert "PASS actor agent admitted by actor=agent" in out
    assert "sets x-actor-kind: agent" in out


def test_the_binding_check_is_explained(
    idp: DevIdP, config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from authz.dev.certs import DevCA

    ca = DevCA()
    mine, other = ca.issue("mine"), ca.issue("other")
    mine_path, _ = mine.write(tmp_path, "mine")
    other_path, _ = other.write(tmp_path, "other")
    token = idp.mint(aud="api://orders", cnf_x5t=mine.x5t)
    base = ("--config", str(config), "--path", "/orders/7", "--token", token)
    rc, out = run(capsys, *base, "--client-cert", str(mine_path))
    assert rc == 0
    assert "PASS certificate binding (require_bound_tokens=when_present)" in out
    assert f"token bound to {mine.x5t}; client certificate {mine.x5t}" in out
    rc, out = run(capsys, *base, "--client-cert", str(other_path))
    assert rc == 1
    assert (
        "FAIL certificate binding (require_bound_tokens=when_present): token_binding_mismatch"
        in out
    )
    assert "decision: DENY 401 token_binding_mismatch" in out
    rc, out = run(capsys, *base)
    assert "token_binding_missing" in out
    assert run(capsys, *base, "--client-cert", str(tmp_path / "nope.pem"))[0] == 2
