"""`authz import-apim`: APIM policy files (tests/fixtures/apim, written from Microsoft's documented
policy schemas) -> a config our loader accepts, and `authz explain` on it decides tokens minted by
the dev IdP as APIM would; unsafe or untranslatable policies are refused with exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from authz import apim_import, cli
from authz import config as config_mod
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import CLIENT_APP, ORDERS_API_ID

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "apim"
ENTRA = "https://login.microsoftonline.com"
OTHER_CLIENT = "cccccccc-0000-4000-8000-00000000000c"


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


def translated(name: str, **kw: object) -> tuple[dict[str, object], tuple[str, ...]]:
    result = apim_import.translate((FIXTURES / name).read_bytes(), source=name, **kw)  # type: ignore[arg-type]
    config_mod.parse(result.yaml_text, env={})  # loads as is
    return yaml.safe_load(result.yaml_text), result.notes


def import_for_idp(
    name: str, idp: DevIdP, tmp: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, str]:
    """The fixture pointed at the dev IdP (its host for Entra's), through the CLI."""
    policy = tmp / name
    policy.write_text((FIXTURES / name).read_text().replace(ENTRA, idp.base_url))
    rc = cli.main(["import-apim", str(policy), "--api", "orders"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    config = tmp / (name + ".yaml")
    config.write_text(out.out)
    return config, out.err


def explain(
    capsys: pytest.CaptureFixture[str], config: Path, token: str, path: str = "/orders/7"
) -> tuple[int, str]:
    rc = cli.main(
        ["explain", "--config", str(config), "--path", path, "--api", "orders", "--token", token]
    )
    return rc, capsys.readouterr().out


# ------------------------------------------------------------------------- what is translated


def test_validate_jwt_translation() -> None:
    doc, notes = translated("validate-jwt.xml", api="orders", path_prefix="/orders")
    assert doc == {
        "tokens": {"clock_skew_seconds": 0},  # APIM's default clock-skew is 0
        "issuers": [
            {"name": "entra", "instance": ENTRA, "tenant": CONTOSO, "versions": ["2.0"]},
        ],
        "apis": [
            {
                "name": "orders",
                "audiences": ["api://orders", ORDERS_API_ID],
                "issuers": ["entra"],
                "match": {"path_prefixes": ["/orders"]},
                "default": {"scopes_any": ["Orders.Read", "Orders.Write"]},
                "rate_limits": [
                    {"name": "apim-rate-1", "key": "ip", "limit": 100, "period": 60},
                    {"name": "apim-quota-2", "key": "sub", "limit": 10000, "period": 86400},
                ],
            }
        ],
    }
    text = "\n".join(notes)
    for expected in (
        "quota-by-key #2: increment-condition not translated",
        "rate-limit-by-key #1: remaining-calls-header-name not translated",
        "<inbound>/<set-header> not translated",
        "<base/>",
        "failed-validation-error-message not translated",
        "require_scope_or_role is on",
    ):
        assert expected in text, expected


def test_validate_azure_ad_token_translation() -> None:
    doc, notes = translated("validate-azure-ad-token.xml", api="orders")
    (issuer,) = doc["issuers"]  # type: ignore[misc]
    assert issuer == {
        "name": "entra",
        "instance": ENTRA,
        "tenant": CONTOSO,
        "versions": ["1.0", "2.0"],
    }
    (api,) = doc["apis"]  # type: ignore[misc]
    assert api["audiences"] == ["api://orders", ORDERS_API_ID]  # backend-application-ids too
    assert api["default"] == {
        "roles_all": ["Orders.Read.All", "Orders.Export"],
        "clients": [CLIENT_APP],
    }
    assert api["rate_limits"] == [{"name": "apim-rate-1", "key": "azp", "limit": 50, "period": 10}]
    text = "\n".join(notes)
    assert "counter-key '@(context.Subscription.Id)' names nothing" in text
    assert "failed-validation-httpcode='403' not translated" in text


def test_multi_tenant_allowlist_comes_from_issuers() -> None:
    doc, _ = translated("multi-tenant.xml", api="orders")
    (issuer,) = doc["issuers"]  # type: ignore[misc]
    assert issuer["tenant"] == "organizations"
    assert issuer["allowed_tenants"] == [FABRIKAM]
    assert doc["tokens"] == {"clock_skew_seconds": 30}
    (api,) = doc["apis"]  # type: ignore[misc]
    assert api["default"] == {"roles_any": ["Orders.Read.All"], "token_kind": "app"}


@pytest.mark.parametrize(
    ("counter", "key"),
    [
        ("@(context.Request.IpAddress)", "ip"),
        (
            '@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()?.Subject)',
            "sub",
        ),
        (
            '@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()'
            '?.Claims.GetValueOrDefault("oid", ""))',
            "oid",
        ),
        (
            '@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()'
            '?.Claims["appid"].FirstOrDefault())',
            "azp",
        ),
        (
            '@(context.Request.Headers.GetValueOrDefault("Authorization").AsJwt()'
            '?.Claims.GetValueOrDefault("tid"))',
            "tid",
        ),
    ],
    ids=["ip", "subject", "oid", "appid-indexer", "tid"],
)
def test_counter_keys(counter: str, key: str) -> None:
    assert apim_import._limit_key(counter) == key


# ---------------------------------------------------------------------- round trip: explain


def test_validate_jwt_round_trip_through_explain(
    idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, notes = import_for_idp("validate-jwt.xml", idp, tmp_path, capsys)
    assert "note: <inbound>/<set-header> not translated" in notes
    rc, out = explain(capsys, config, idp.mint(aud="api://orders", scp="Orders.Write Other"))
    assert rc == 0, out
    assert "decision: ALLOW 200 ok" in out
    rc, out = explain(capsys, config, idp.mint(aud="api://orders", scp="Other"))
    assert rc == 1
    assert "decision: DENY 403 missing_scope" in out
    rc, out = explain(capsys, config, idp.mint(aud="api://inventory", scp="Orders.Read"))
    assert rc == 1
    assert "decision: DENY 401 audience_mismatch" in out
    # A v1 token of the tenant: APIM's <issuers> named the v2 issuer only.
    rc, out = explain(capsys, config, idp.mint(aud="api://orders", version="1.0"))
    assert rc == 1
    assert "DENY 401" in out


def test_validate_azure_ad_token_round_trip_through_explain(
    idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = import_for_idp("validate-azure-ad-token.xml", idp, tmp_path, capsys)
    both = ["Orders.Read.All", "Orders.Export"]
    rc, out = explain(capsys, config, idp.mint(aud=ORDERS_API_ID, kind="app", roles=both))
    assert rc == 0, out
    assert "decision: ALLOW 200 ok" in out
    v1 = idp.mint(aud="api://orders", kind="app", roles=both, version="1.0")
    rc, out = explain(capsys, config, v1)  # validate-azure-ad-token takes v1 tokens too
    assert rc == 0, out
    rc, out = explain(capsys, config, idp.mint(aud="api://orders", kind="app", roles=both[:1]))
    assert rc == 1
    assert "decision: DENY 403 missing_role" in out
    stranger = idp.mint(aud="api://orders", kind="app", roles=both, client_id=OTHER_CLIENT)
    rc, out = explain(capsys, config, stranger)
    assert rc == 1
    assert "decision: DENY 403 client_not_allowed" in out


def test_multi_tenant_round_trip_through_explain(
    idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = import_for_idp("multi-tenant.xml", idp, tmp_path, capsys)
    app = {"aud": "api://orders", "kind": "app", "roles": ["Orders.Read.All"]}
    rc, out = explain(capsys, config, idp.mint(tid=FABRIKAM, **app))  # type: ignore[arg-type]
    assert rc == 0, out
    rc, out = explain(capsys, config, idp.mint(tid=CONTOSO, **app))  # type: ignore[arg-type]
    assert rc == 1
    assert "decision: DENY 401 tenant_not_allowed" in out
    user = idp.mint(tid=FABRIKAM, aud="api://orders", roles=["Orders.Read.All"])
    rc, out = explain(capsys, config, user)
    assert rc == 1
    assert "DENY 403" in out  # idtyp=app was required


# -------------------------------------------------------------------------------- refusals

MT = (
    '<policies><inbound><validate-jwt header-name="Authorization">'
    '<openid-config url="https://login.microsoftonline.com/{tenant}/v2.0/.well-known/'
    'openid-configuration" />{inner}</validate-jwt></inbound></policies>'
)
AUD = "<audiences><audience>api://orders</audience></audiences>"
BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
    "<policies><inbound>&lol2;</inbound></policies>"
)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (MT.format(tenant="common", inner=AUD), "tenant 'common' admits tokens of every"),
        (MT.format(tenant="organizations", inner=AUD), "tenant 'organizations' admits"),
        (
            '<policies><inbound><validate-azure-ad-token tenant-id="common">'
            f"{AUD}</validate-azure-ad-token></inbound></policies>",
            "tenant 'common' admits tokens of every",
        ),
        (MT.format(tenant=CONTOSO, inner=""), "no <audiences>"),
        (
            MT.format(
                tenant=CONTOSO,
                inner=AUD + '<required-claims><claim name="department" match="any">'
                "<value>sales</value></claim></required-claims>",
            ),
            "cannot require the claim 'department'",
        ),
        (
            MT.format(
                tenant=CONTOSO,
                inner=AUD + '<required-claims><claim name="groups" match="all">'
                f"<value>{CONTOSO}</value><value>{FABRIKAM}</value></claim></required-claims>",
            ),
            "match=all of several values",
        ),
        (
            MT.format(
                tenant=CONTOSO,
                inner="<audiences><audience>@(context.Variables[&quot;aud&quot;])</audience>"
                "</audiences>",
            ),
            "a policy expression",
        ),
        (
            MT.format(
                tenant=CONTOSO,
                inner=AUD + "<issuer-signing-keys><key>AAAA</key></issuer-signing-keys>",
            ),
            "static keys are not supported",
        ),
        (
            MT.format(
                tenant=CONTOSO,
                inner=AUD + "<issuers><issuer>https://login.microsoftonline.com/"
                f"{FABRIKAM}/v2.0</issuer></issuers>",
            ),
            "is not the issuer of tenant",
        ),
        (
            '<policies><inbound><validate-jwt><openid-config url="https://contoso.b2clogin.com/'
            'contoso.onmicrosoft.com/B2C_1_signin/v2.0/.well-known/openid-configuration" />'
            f"{AUD}</validate-jwt></inbound></policies>",
            "is not an Entra ID tenant's metadata URL",
        ),
        (
            '<policies><inbound><choose><when condition="@(true)">'
            + MT.format(tenant=CONTOSO, inner=AUD)[
                len("<policies><inbound>") : -len("</inbound></policies>")
            ]
            + "</when></choose></inbound></policies>",
            "under a condition",
        ),
        ("<policies><inbound><base /></inbound></policies>", "found 0"),
        (
            "<policies><inbound>"
            + 2 * MT.format(tenant=CONTOSO, inner=AUD)[19:-21]
            + "</inbound></policies>",
            "found 2",
        ),
        (BOMB, "unsafe XML refused"),
        ("<policies><inbound>", "not well-formed XML"),
        (
            MT.format(tenant=CONTOSO, inner=AUD).replace(
                "<validate-jwt ", '<validate-jwt clock-skew="900" '
            ),
            "clock-skew='900'",
        ),
        (
            MT.format(
                tenant=CONTOSO,
                inner=AUD + "<client-application-ids><application-id>"
                f"{CONTOSO}-x</application-id></client-application-ids>",
            ),
            "clients: expected GUIDs",
        ),
    ],
    ids=[
        "common",
        "organizations",
        "aad-token-common",
        "no-audiences",
        "unknown-claim",
        "groups-all",
        "expression-audience",
        "static-keys",
        "foreign-issuer",
        "b2c",
        "conditional",
        "no-validation",
        "two-validations",
        "entity-bomb",
        "malformed",
        "clock-skew",
        "client-id-not-a-guid",
    ],
)
def test_refused_with_exit_2(
    policy: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.xml"
    path.write_text(policy)
    assert cli.main(["import-apim", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing half-translated on stdout
    assert message in out.err


def test_allow_tenant_makes_a_multi_tenant_issuer_translatable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.xml"
    path.write_text(MT.format(tenant="common", inner=AUD))
    assert cli.main(["import-apim", str(path), "--allow-tenant", FABRIKAM.upper()]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["issuers"][0]["allowed_tenants"] == [FABRIKAM]
    assert cli.main(["import-apim", str(path), "--allow-tenant", "contoso"]) == 2
    assert "expected tenant id GUIDs" in capsys.readouterr().err


def test_unreadable_or_bad_api_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["import-apim", str(tmp_path / "missing.xml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "policy.xml"
    path.write_text(MT.format(tenant=CONTOSO, inner=AUD))
    assert cli.main(["import-apim", str(path), "--api", "Bad Name"]) == 2
    assert "--api 'Bad Name'" in capsys.readouterr().err
