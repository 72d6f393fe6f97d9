"""Configuration: the example loads; every kind of mistake is reported with its key path;
the CLI exits 2 on a bad file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from authz import cli
from authz import config as config_mod

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
issuers:
  - {name: contoso, tenant: 11111111-1111-4111-8111-111111111111}
apis:
  - name: orders
    audiences: [api://orders]
    issuers: [contoso]
    routes:
      - {name: r, path: /x, require: authenticated}
"""


def test_example_config_loads() -> None:
    s = config_mod.load(ROOT / "config" / "example.yaml", env={})
    assert [a.name for a in s.apis] == ["orders"]
    assert s.issuer("partners").multi_tenant
    assert s.tokens.clock_skew_s == 60
    read = s.apis[0].routes[1]
    assert read.path_kind == "template"
    assert len(read.require.any_of) == 2


def test_minimal_defaults() -> None:
    s = config_mod.parse(MINIMAL, env={})
    assert s.server.grpc_listen == "127.0.0.1:9001"
    assert s.apis[0].default is None
    assert s.headers.user_id == "x-user-id"
    assert s.server.workers == 0  # one per available CPU (authz.server.procfs.available_cpus)


def test_env_overrides_listen_addresses() -> None:
    s = config_mod.parse(MINIMAL, env={"AUTHZ_GRPC_LISTEN": "0.0.0.0:7000", "AUTHZ_WORKERS": "3"})
    assert s.server.grpc_listen == "0.0.0.0:7000"
    assert s.server.workers == 3


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            ("require: authenticated", "require: {roles_any: Admin}"),
            "apis[0].routes[0].require.roles_any: expected a list of strings",
        ),
        (("require: authenticated", "require: anonymus"), "apis[0].routes[0].require: expected"),
        (("path: /x", "path: x"), "apis[0].routes[0].path: must start with '/'"),
        (("path: /x", "path: '/x/{id}/{id}'"), "apis[0].routes"),
        (("issuers: [contoso]", "issuers: [nope]"), "apis[0].issuers[0]: no issuer named 'nope'"),
        (
            ("audiences: [api://orders]", "audiences: api://orders"),
            "apis[0].audiences: expected a list",
        ),
        (
            ("tenant: 11111111-1111-4111-8111-111111111111", "tenant: common"),
            "issuers[0].allowed_tenants: required for a multi-tenant issuer",
        ),
        (("name: contoso,", "name: contoso, bogus: 1,"), "issuers[0].bogus: unknown key"),
        (
            ("name: contoso,", 'name: contoso, instance: "http://login.example.com",'),
            "issuers[0].instance: plain http is only allowed for a local dev-idp",
        ),
        (("{name: r,", "{name: r, methods: [get],"), "apis[0].routes[0].methods"),
        (
            ("{name: r,", "{name: r, path_prefix: /y,"),
            "set exactly one of 'path' and 'path_prefix'",
        ),
    ],
    ids=[
        "roles-not-list",
        "bad-require",
        "relative-path",
        "bad-template",
        "unknown-issuer",
        "audiences-not-list",
        "multi-tenant-needs-allowlist",
        "unknown-key",
        "plain-http",
        "lowercase-method",
        "path-and-prefix",
    ],
)
def test_errors_name_the_key(mutation: tuple[str, str], expected: str) -> None:
    text = MINIMAL.replace(*mutation)
    assert text != MINIMAL
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(text, env={})
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(config_mod.ConfigError, match="line 1"):
        config_mod.parse("apis: [", env={})


def test_unreachable_route_is_a_warning() -> None:
    text = MINIMAL.replace(
        "      - {name: r, path: /x, require: authenticated}",
        "      - {name: all, path_prefix: /, require: authenticated}\n"
        "      - {name: r, path: /x, require: authenticated}",
    )
    s = config_mod.parse(text, env={})
    assert any("routes[1] (r) is unreachable" in w for w in s.warnings), s.warnings


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    assert cli.main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("require: authenticated", "require: {roles_any: Admin}"))
    assert cli.main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "apis[0].routes[0].require.roles_any: expected a list of strings" in err
    assert cli.main(["check-config", str(tmp_path / "missing.yaml")]) == 2


def test_serve_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("audiences: [api://orders]", "audiences: []"))
    assert cli.main(["serve", "--config", str(bad), "--plain-logs"]) == 2
    assert "apis[0].audiences" in capsys.readouterr().err


CLIENT = "11111111-2222-4333-8444-555555555555"


def test_acl_mode_warns_about_requirements_open_to_any_client() -> None:
    text = MINIMAL.replace(
        "    routes:\n",
        "    require_scope_or_role: false\n    routes:\n",
    ).replace(
        "      - {name: r, path: /x, require: authenticated}",
        "      - {name: r, path: /x, require: authenticated}\n"
        "      - {name: apps, path: /y, require: {clients: [" + CLIENT + "]}}",
    )
    s = config_mod.parse(text, env={})
    acl = [w for w in s.warnings if "ACL mode" in w]
    assert len(acl) == 1, s.warnings
    assert acl[0].startswith("apis[0].routes[0] (r):")
    assert not [w for w in config_mod.parse(MINIMAL, env={}).warnings if "ACL mode" in w]


# ------------------------------------------------- config/example.yaml documents every key

EXAMPLE = ROOT / "config" / "example.yaml"

# Keys typed ``Any`` in the schema because authz.config validates them by hand: a route's
# ``require`` and an API's ``default`` are 'anonymous', 'authenticated', a clause mapping
# (_Clause) or {any_of: [clause, ...]} (_AnyOf).
HAND_VALIDATED: dict[tuple[type[BaseModel], str], tuple[type[BaseModel], ...]] = {
    (config_mod._Route, "require"): (config_mod._AnyOf, config_mod._Clause),
    (config_mod._Api, "default"): (config_mod._AnyOf, config_mod._Clause),
}

# (model, field) pairs that genuinely cannot be shown in the example. Empty on purpose: every key
# can be written in a loadable example (at its default where another value would be wrong there).
NOT_SHOWN: frozenset[tuple[type[BaseModel], str]] = frozenset()


def _key(model: type[BaseModel], name: str) -> str:
    """The key an operator writes: the field's alias if it has one."""
    return model.model_fields[name].alias or name


def _nested(annotation: Any) -> list[type[BaseModel]]:
    """The models inside an annotation: bare, or inside list/dict/Optional/Annotated/unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _nested(arg)]


def _children(model: type[BaseModel], name: str) -> list[type[BaseModel]]:
    return [
        *_nested(model.model_fields[name].annotation),
        *HAND_VALIDATED.get((model, name), ()),
    ]


def _schema_models() -> list[type[BaseModel]]:
    """Every model reachable from the root, in walk order."""
    out: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [config_mod._Root]
    while todo:
        model = todo.pop(0)
        if model in out:
            continue
        out.append(model)
        for name in model.model_fields:
            todo.extend(_children(model, name))
    return out


def _keys_used(model: type[BaseModel], data: Any, seen: dict[type[BaseModel], set[str]]) -> None:
    """Record, per model, the keys the parsed example writes for it (so ``routes[].hosts`` is not
    satisfied by ``match.hosts``)."""
    if not isinstance(data, dict):
        return  # e.g. require: anonymous
    seen.setdefault(model, set()).update(data)
    for name in model.model_fields:
        key = _key(model, name)
        if key not in data:
            continue
        value = data[key]
        if (model, name) in HAND_VALIDATED:
            if isinstance(value, dict):
                target = config_mod._AnyOf if "any_of" in value else config_mod._Clause
                _keys_used(target, value, seen)
            continue
        annotation = model.model_fields[name].annotation
        for target in _nested(annotation):
            if isinstance(value, list):
                items = value
            elif isinstance(value, dict) and get_origin(annotation) is dict:
                items = list(value.values())
            else:
                items = [value]
            for item in items:
                _keys_used(target, item, seen)


def test_schema_walk_reaches_every_model() -> None:
    """A new model only reachable through a hand-validated ``Any`` key must be added above."""
    defined = {
        obj
        for obj in vars(config_mod).values()
        if isinstance(obj, type)
        and issubclass(obj, config_mod._Model)
        and obj is not config_mod._Model
    }
    assert set(_schema_models()) == defined


def test_example_config_shows_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    seen: dict[type[BaseModel], set[str]] = {}
    _keys_used(config_mod._Root, yaml.safe_load(text), seen)
    missing = []
    for model in _schema_models():
        for name in model.model_fields:
            key = _key(model, name)
            if (model, name) in NOT_SHOWN or key in seen.get(model, set()):
                continue
            if re.search(rf"^\s*#\s*-?\s*{re.escape(key)}:", text, re.MULTILINE):
                continue  # shown as a commented-out line
            missing.append(f"{model.__name__}.{key}")
    assert not missing, f"config/example.yaml does not show: {missing}"


def test_readme_configuration_block_is_the_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("\n```yaml\n", 1)[1].split("\n```\n", 1)[0] + "\n"
    assert block == EXAMPLE.read_text(encoding="utf-8")


# ------------------------------------------------------------------ names (issue 11, item 14)


def _problems(text: str) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(text, env={})
    return list(err.value.problems)


@pytest.mark.parametrize(
    "instance",
    [
        "http://127.0.0.1:80@remote.example",
        "http://localhost@remote.example",
        "http://127.0.0.1@remote.example:8080/base",
        "http://[::1]:80@remote.example",
    ],
)
def test_instance_with_userinfo_is_a_remote_plain_http_instance(instance: str) -> None:
    text = MINIMAL.replace("name: contoso,", f'name: contoso, instance: "{instance}",')
    assert any(
        p.startswith("issuers[0].instance: plain http is only allowed") for p in _problems(text)
    )


@pytest.mark.parametrize(
    "instance", ["https://user@login.microsoftonline.com", "http://u:p@127.0.0.1:8080"]
)
def test_instance_userinfo_is_refused_even_with_https_or_a_local_host(instance: str) -> None:
    text = MINIMAL.replace("name: contoso,", f'name: contoso, instance: "{instance}",')
    assert any("issuers[0].instance: must not carry user info" in p for p in _problems(text))


@pytest.mark.parametrize(
    "instance", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9", "http://[::1]"]
)
def test_local_plain_http_instance_is_accepted(instance: str) -> None:
    text = MINIMAL.replace("name: contoso,", f'name: contoso, instance: "{instance}",')
    assert config_mod.parse(text, env={}).issuers[0].instance == instance


BAD_ROUTE_NAMES = ['"a\\r\\nx-evil: 1"', '"a\\nb"', '"with space"', '""', '"-lead"', '"é"']


@pytest.mark.parametrize("name", BAD_ROUTE_NAMES)
def test_route_names_are_checked(name: str) -> None:
    text = MINIMAL.replace("{name: r,", f"{{name: {name},")
    assert any(p.startswith("apis[0].routes[0].name:") for p in _problems(text))


@pytest.mark.parametrize("name", ["r", "read-orders", "orders.read_v2", "Export:All", "r" * 128])
def test_good_route_names_pass(name: str) -> None:
    text = MINIMAL.replace("{name: r,", f'{{name: "{name}",')
    assert config_mod.parse(text, env={}).apis[0].routes[0].name == name


RESERVED_NAMES = [
    "x-envoy-original-path",
    "X-Envoy-Upstream-Rq-Timeout-Ms",
    "x-authz-code",
    "x-authz-route",
    ":path",
    ":authority",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
    "content-length",
    "authorization",
    "x-request-id",
    "x-forwarded-for",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
]
INVALID_NAMES = ["x-a\r\nx-b", "x a", "x-a\n", "x:a", "", "x-é", "x-a,b", 'x-"q"']


def _claim_header(name: str) -> str:
    quoted = name.encode("unicode_escape").decode().replace('"', '\\"')
    return MINIMAL.replace(
        "issuers: [contoso]\n", f'issuers: [contoso]\n    claim_headers: {{"{quoted}": upn}}\n', 1
    )


@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_reserved_claim_header_names_are_refused(name: str) -> None:
    problems = _problems(_claim_header(name))
    assert any("apis[0].claim_headers." in p and "reserved" in p for p in problems), problems


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_claim_header_names_are_refused(name: str) -> None:
    problems = _problems(_claim_header(name))
    assert any("apis[0].claim_headers." in p and "not a valid header name" in p for p in problems)
    assert not any("\r" in p or "\n" in p for p in problems), "names are shown escaped"


@pytest.mark.parametrize("name", ["x-envoy-user", "x-authz-user", "proxy-user", "x-request-id"])
def test_reserved_contract_header_names_are_refused(name: str) -> None:
    text = MINIMAL.replace("apis:\n", f"headers: {{user_id: {name}}}\napis:\n", 1)
    assert any(p.startswith("headers.user_id:") and "reserved" in p for p in _problems(text))


def test_claim_header_names_that_differ_only_in_case_are_refused() -> None:
    text = MINIMAL.replace(
        "issuers: [contoso]\n",
        "issuers: [contoso]\n    claim_headers: {X-Upn: upn, x-upn: upn}\n",
        1,
    )
    assert any("x-upn" in p and "twice" in p for p in _problems(text))


def test_good_claim_header_names_are_lower_cased() -> None:
    text = MINIMAL.replace(
        "issuers: [contoso]\n", "issuers: [contoso]\n    claim_headers: {X-User-Upn: upn}\n", 1
    )
    assert config_mod.parse(text, env={}).apis[0].claim_headers == (("x-user-upn", "upn"),)


def test_strip_method_override_is_on_by_default_and_can_be_turned_off() -> None:
    assert config_mod.parse(MINIMAL, env={}).apis[0].strip_method_override is True
    text = MINIMAL.replace(
        "issuers: [contoso]\n", "issuers: [contoso]\n    strip_method_override: false\n", 1
    )
    assert config_mod.parse(text, env={}).apis[0].strip_method_override is False


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            ("name: contoso,", "name: contoso, unknown_kid_min_interval_seconds: 0,"),
            "issuers[0].unknown_kid_min_interval_seconds",
        ),
        (
            ("name: contoso,", "name: contoso, max_key_age_seconds: 3600,"),
            "issuers[0].max_key_age_seconds: must exceed refresh_interval_seconds",
        ),
        (
            ("issuers:\n", "tokens: {unknown_kid_wait_seconds: 0.25}\nissuers:\n"),
            "tokens.unknown_kid_wait_seconds",
        ),
    ],
    ids=["no-unknown-kid-floor", "keys-expire-between-refreshes", "wait-reaches-envoy-timeout"],
)
def test_key_lifecycle_limits(mutation: tuple[str, str], expected: str) -> None:
    text = MINIMAL.replace(*mutation, 1)
    assert text != MINIMAL
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(text, env={})
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_key_lifecycle_defaults() -> None:
    s = config_mod.parse(MINIMAL, env={})
    assert s.tokens.unknown_kid_wait_s == 0.1
    assert s.issuer("contoso").max_key_age_s == 86400  # Microsoft's AadIssuerValidator: 24 h
    assert s.issuer("contoso").unknown_kid_min_interval_s == 300


def test_consumers_is_a_single_tenant_issuer() -> None:
    """``consumers`` documents name one concrete tenant (the Microsoft-account tenant), so the
    configuration treats it as the model and the key store do: no allowlist, none accepted."""
    text = MINIMAL.replace("tenant: 11111111-1111-4111-8111-111111111111", "tenant: consumers")
    (issuer,) = config_mod.parse(text, env={}).issuers
    assert (issuer.tenant, issuer.multi_tenant, issuer.allowed_tenants) == (
        "consumers",
        False,
        frozenset(),
    )
    listed = text.replace(
        "tenant: consumers",
        "tenant: consumers, allowed_tenants: [9188040d-6c67-4c5b-b112-36a304b66dad]",
    )
    assert any(p.startswith("issuers[0].allowed_tenants: only for") for p in _problems(listed))


@pytest.mark.parametrize("tenant", ["common", "organizations"])
def test_multi_tenant_names_require_an_allowlist(tenant: str) -> None:
    text = MINIMAL.replace("tenant: 11111111-1111-4111-8111-111111111111", f"tenant: {tenant}")
    (issuer,) = config_mod.parse(
        text.replace(
            f"tenant: {tenant}",
            f"tenant: {tenant}, allowed_tenants: [{'1' * 8}-1111-4111-8111-111111111111]",
        ),
        env={},
    ).issuers
    assert issuer.multi_tenant
    assert any("required for a multi-tenant issuer" in p for p in _problems(text))


# A value that ends in a newline: `^...$` with re.match accepts "name\n" ($ matches before a final
# newline), so every whole-value pattern is checked with fullmatch.
@pytest.mark.parametrize(
    ("mutation", "key"),
    [
        (
            (
                "    issuers: [contoso]\n",
                "    issuers: [contoso]\n    rate_limits:\n"
                '      [{name: "per-user\\n", key: oid, limit: 5, period: 1m}]\n',
            ),
            "apis[0].rate_limits[0].name",
        ),
        (
            (
                "    issuers: [contoso]\n",
                "    issuers: [contoso]\n    rate_limits:\n"
                '      [{name: per-user, key: oid, limit: 5, period: "1m\\n"}]\n',
            ),
            "apis[0].rate_limits[0].period",
        ),
        (("{name: r,", '{name: r, methods: ["GET\\n"],'), "apis[0].routes[0].methods"),
        (
            ("tenant: 11111111-1111-4111-8111-111111111111", 'tenant: "contoso.com\\n"'),
            "issuers[0].tenant",
        ),
    ],
    ids=["rate-limit-name", "rate-limit-period", "method", "tenant-domain"],
)
def test_a_trailing_newline_is_not_a_valid_value(mutation: tuple[str, str], key: str) -> None:
    text = MINIMAL.replace(*mutation)
    assert text != MINIMAL
    assert any(p.startswith(key) for p in _problems(text)), _problems(text)
