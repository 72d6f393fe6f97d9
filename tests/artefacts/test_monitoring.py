"""deploy/monitoring: the alert rules and the Grafana dashboard only reference series the service
(and Envoy) really export, with labels those series really carry; the monitoring component's
PrometheusRule and dashboard ConfigMap are generated from them and current; every alert has a
runbook section.

The reference is a real ``/metrics`` exposition: ``authz.observability.Metrics`` plus the process
collector on a private registry, with one sample of every labelled series recorded the way the
service records it, rendered by ``generate_latest`` and parsed back; for ``envoy_*`` series, the
real Envoy 1.40's ``/stats/prometheus`` after one check that failed (authz not listening).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import prometheus_client as prom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from authz.dev import stack as devstack
from authz.envoyconf import defaults, render
from authz.observability import Metrics
from authz.policy.errors import Code
from authz.policy.model import Decision

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "dashboard.json"

# Labels Prometheus attaches when it scrapes (target labels), not present in the exposition.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container"}
SEVERITIES = {"critical", "warning", "info"}
# A metric name, not a label name (``envoy_cluster_name="authz"``) nor a grouping label.
METRIC_RE = re.compile(
    r"(?<![A-Za-z0-9_:])((?:authz|process|envoy)_[a-z0-9_]+)(?![A-Za-z0-9_:])(?!\s*(?:=|!=|=~|!~))"
)
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR_RE = re.compile(r"((?:authz|process|envoy)_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")

# Codes by the HTTP status the policy gives them (authz.policy.errors); the rise alerts and the
# dashboard's share panels split denies by these lists.
NOT_401_OR_403 = {
    "ok",
    "invalid_request",
    "non_canonical_path",
    "rate_limited",
    "keys_unavailable",
    "internal_error",
}


# ------------------------------------------------------------------------------------ loading


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def _dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in _all_panels(dash) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    exprs.extend(a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a)
    return exprs


def _exprs() -> list[str]:
    return [r["expr"] for r in _alert_rules()] + _dashboard_exprs(_dashboard())


# --------------------------------------------------------------------------------- exposition


def _families(text: str) -> dict[str, set[str]]:
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).update(s.labels)
    return samples


def _raw_samples(text: str) -> dict[str, set[str]]:
    """Sample names exactly as written (prometheus_client's parser would append ``_total`` to
    Envoy's counters, which PromQL never sees)."""
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            labels = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', line.split("}")[0])
            samples.setdefault(name, set()).update(labels)
    return samples


@pytest.fixture(scope="module")
def envoy_exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """The central ingress (envoy/ingress-http.yaml) with authz not listening: one request
    through it makes the ext_authz filter count an error, then its stats are scraped."""
    template = (ROOT / "envoy" / "ingress-http.yaml").read_text(encoding="utf-8")
    ports = {k: str(devstack.free_port()) for k in ("LISTEN_PORT", "ADMIN_PORT", "STATS_PORT")}
    values = {
        **defaults(template),
        **ports,
        "AUTHZ_HOST": "127.0.0.1",
        "AUTHZ_HTTP_PORT": str(devstack.free_port()),  # nothing listens: the check errors
        "AUTHZ_ADMIN_PORT": str(devstack.free_port()),
        "ORDERS_HOST": "127.0.0.1",
        "INVENTORY_HOST": "127.0.0.1",
    }
    config = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    config.write_text(render(template, values), encoding="utf-8")
    base_id = str(random.randint(1000, 60000))
    proc = subprocess.Popen(
        [devstack.envoy_binary(), "-c", str(config), "--base-id", base_id, "--concurrency", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stats = f"http://127.0.0.1:{ports['STATS_PORT']}"
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(stats + "/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        devstack.wait_until(ready, 30, "envoy ready", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['LISTEN_PORT']}/orders/1",
            headers={"Host": "orders.example.com"},
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, timeout=5)
        assert denied.value.code == 503  # fail closed, status_on_error
        with urllib.request.urlopen(stats + "/stats/prometheus", timeout=5) as r:
            text = r.read().decode()
        yield _raw_samples(text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def exposition(envoy_exposition: dict[str, set[str]]) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from a real /metrics rendering."""
    registry = prom.CollectorRegistry()
    metrics = Metrics(registry)
    prom.ProcessCollector(registry=registry)
    d = Decision(
        allowed=False,
        status=401,
        code="missing_token",
        reason="x",
        decision_id="d",
        api="orders",
        route="read",
    )
    metrics.record_check(d, 0.001)
    metrics.on_refresh("contoso", "ok", 2)
    metrics.on_refresh("contoso", "error", 2)
    metrics.jwks_keys_expiry.labels("contoso").set(1)
    metrics.sync_cache(1, 1, 1)
    metrics.reloads.labels("ok").inc()
    metrics.on_revocation_reload("file", "ok")
    metrics.on_revocation_rules("file", 1)
    metrics.internal_errors.labels("grpc").inc()
    metrics.ready.set(1)
    metrics.sync_ratelimit({("orders", "read", "per-user", "enforce"): 1}, 1)
    metrics.on_ratelimit_sync("ok", 3, 1)
    metrics.on_redis_state(True)  # registered only when redis: is configured
    metrics.on_redis_error("ratelimit_sync")
    text = prom.generate_latest(registry).decode()
    return {**_families(text), **envoy_exposition}


def _strip_strings(expr: str) -> str:
    return STRING_RE.sub('""', expr)


def _referenced(expr: str) -> set[str]:
    return set(METRIC_RE.findall(_strip_strings(expr)))


def _resolve(name: str, samples: dict[str, set[str]]) -> str | None:
    """The exposed sample a referenced name stands for (histogram base names accepted)."""
    if name in samples:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) + "_bucket" in samples:
            return name
        if name + suffix in samples:
            return name + suffix
    return None


# ------------------------------------------------------------------------------------- alerts


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    assert len(rules) >= 10
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        name = rule.get("alert")
        assert name, f"not an alerting rule: {rule}"
        assert re.fullmatch(r"Authz[A-Za-z0-9]+", name), name
        assert isinstance(rule.get("expr"), str), name
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no valid for:"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        ann = rule.get("annotations", {})
        assert ann.get("summary"), name
        assert ann.get("description"), name
        runbook = ann.get("runbook", "")
        assert "authz explain" in runbook or "audit log" in runbook, f"{name}: no runbook hint"


def test_alerts_cover_what_the_issue_asks_for() -> None:
    rules = {r["alert"]: r for r in _alert_rules()}
    for name in (
        "AuthzUnauthenticatedRise",
        "AuthzForbiddenRise",
        "AuthzJwksRefreshFailing",
        "AuthzJwksKeysStale",
        "AuthzJwksNoKeys",
        "AuthzCheckLatencyHigh",
        "AuthzInternalErrorDenies",
        "AuthzInternalErrors",
        "AuthzNotReady",
        "AuthzConfigReloadFailing",
        "AuthzKeysUnavailableDenies",
    ):
        assert name in rules, name
    for name in ("AuthzUnauthenticatedRise", "AuthzForbiddenRise"):
        expr = rules[name]["expr"]
        assert "by (api)" in expr
        assert "offset 1d" in expr, "compare with the same window a day earlier"
        # every division guards its denominator against zero
        assert expr.count("/ (sum by (api)") == expr.count("/")
        assert expr.count("/") == expr.count("> 0)")


def _code_lists(expr: str) -> set[frozenset[str]]:
    return {frozenset(m.split("|")) for m in re.findall(r'code=~"([a-z_|]+)"', expr)}


def test_401_and_403_code_lists_classify_every_denial_code() -> None:
    """A new code must be placed in the 401 or 403 list (or the exceptions) deliberately."""
    rules = {r["alert"]: r for r in _alert_rules()}
    (c401,) = _code_lists(rules["AuthzUnauthenticatedRise"]["expr"])
    (c403,) = _code_lists(rules["AuthzForbiddenRise"]["expr"])
    codes = {c.value for c in Code}
    assert c401 <= codes
    assert c403 <= codes
    assert not c401 & c403
    assert c401 | c403 | NOT_401_OR_403 == codes
    assert {"missing_token", "bad_signature", "token_expired", "audience_mismatch"} <= c401
    assert {"missing_role", "missing_scope", "no_matching_route", "unknown_api"} <= c403
    # the dashboard's share panels use the same lists
    dash_lists = set().union(*(_code_lists(e) for e in _dashboard_exprs(_dashboard())))
    assert dash_lists == {c401, c403}


def test_single_code_matchers_name_real_codes() -> None:
    codes = {c.value for c in Code}
    for expr in _exprs():
        for name, op, value in MATCHER_RE.findall(expr):
            if name == "code" and op in ("=", "!="):
                assert value in codes, value


# ---------------------------------------------------------------------------------- dashboard


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["title"]
    assert dash["uid"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _all_panels(dash) if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in _all_panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        assert p["title"], p
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["refId"], p["title"]
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    joined = "\n".join(_dashboard_exprs(dash))
    for needle in (
        "sum by (api, decision) (rate(authz_checks_total",
        "sum by (code)",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "time() - authz_jwks_last_success_timestamp_seconds",
        "authz_jwks_keys",
        "authz_jwks_refreshes_total",
        "authz_token_cache_hits_total",
        "authz_config_reloads_total",
        "authz_ready",
        "authz_internal_errors_total",
    ):
        assert needle in joined, needle


# ----------------------------------------------------------------------- against /metrics


def test_every_referenced_metric_is_exported(exposition: dict[str, set[str]]) -> None:
    referenced = set().union(*(_referenced(e) for e in _exprs()))
    assert "authz_checks_total" in referenced
    assert "authz_check_duration_seconds_bucket" in referenced
    missing = sorted(n for n in referenced if _resolve(n, exposition) is None)
    assert not missing, f"not in /metrics: {missing}"


def test_every_exported_authz_metric_is_used(exposition: dict[str, set[str]]) -> None:
    """The other direction: nothing the service exports is forgotten by the dashboard."""
    used = set().union(*(_referenced(e) for e in _dashboard_exprs(_dashboard())))
    families = {
        re.sub(r"_(bucket|sum|count|created)$", "", n)
        for n in exposition
        if n.startswith("authz_") and not n.endswith("_created")
    }
    used_families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= used_families, sorted(families - used_families)


def test_matcher_labels_exist_on_their_metric(exposition: dict[str, set[str]]) -> None:
    for expr in _exprs():
        for name, body in SELECTOR_RE.findall(expr):
            sample = _resolve(name, exposition)
            assert sample is not None, name
            for label, _op, _value in MATCHER_RE.findall(body):
                assert label in exposition[sample] | TARGET_LABELS, f"{name}{{{label}}}"


def _aggregations(expr: str) -> list[tuple[str, list[str], str]]:
    """(keyword, labels, argument) for every ``agg by|without (labels) (argument)``."""
    out = []
    for m in re.finditer(r"\b(by|without)\s*\(([^)]*)\)\s*\(", expr):
        start = m.end() - 1
        depth = 0
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                break
        labels = [x.strip() for x in m.group(2).split(",") if x.strip()]
        out.append((m.group(1), labels, expr[start : i + 1]))
    return out


def test_grouping_labels_exist_on_their_metrics(exposition: dict[str, set[str]]) -> None:
    for raw in _exprs():
        expr = _strip_strings(raw)
        assert not re.search(r"\)\s*(by|without)\s*\(", expr), f"use the prefix form: {raw}"
        for kw, labels, argument in _aggregations(expr):
            metrics = _referenced(argument)
            assert metrics, argument
            have = [exposition[_resolve(m, exposition) or m] | TARGET_LABELS for m in metrics]
            for label in labels:
                if kw == "by":  # grouping by a label some series lack silently merges them
                    assert all(label in h for h in have), f"by ({label}) in {raw}"
                else:  # without: it must at least exist somewhere in the argument
                    assert any(label in h for h in have), f"without ({label}) in {raw}"
        # on/ignoring/group_*: the label must exist on some metric of the expression
        everything = set().union(
            *(exposition[_resolve(m, exposition) or m] for m in _referenced(expr))
        )
        for kw, body in GROUPING_RE.findall(expr):
            if kw in ("by", "without"):
                continue
            for label in (x.strip() for x in body.split(",") if x.strip()):
                assert label in everything | TARGET_LABELS, f"{kw} ({label}) in {raw}"


def test_expressions_are_balanced() -> None:
    """A cheap syntax check for machines without promtool."""
    for raw in _exprs():
        expr = _strip_strings(raw)
        for open_, close in ("()", "{}", "[]"):
            depth = 0
            for ch in expr:
                depth += (ch == open_) - (ch == close)
                assert depth >= 0, raw
            assert depth == 0, raw


def test_promtool_check_rules(tmp_path: Path) -> None:
    """The source rule file and the PrometheusRule's groups (what the Operator loads).
    promtool comes from Debian's `prometheus` package: `make test` installs it."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (make test does)"
    rule = yaml.safe_load(
        (ROOT / "deploy/k8s/components/monitoring/prometheusrule.yaml").read_text()
    )
    spec = tmp_path / "prometheusrule-spec.yaml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    for path in (ALERTS, spec):
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------- generated objects, runbook, Envoy side


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", MONITORING / "generate.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_component_objects_are_generated_from_the_source_and_current() -> None:
    gen = _generator()
    for path, text in gen.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: python deploy/monitoring/generate.py"
        )
    rule = yaml.safe_load((gen.COMPONENT / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    source = yaml.safe_load(ALERTS.read_text())
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            r["annotations"].pop("runbook_url")
    assert rule["spec"]["groups"] == source["groups"]  # every alert, unchanged
    dash = yaml.safe_load((gen.COMPONENT / "dashboard.yaml").read_text())
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["entra-authz.json"]) == _dashboard()
    assert gen.main(["--check"]) == 0


def test_dashboard_json_is_generated_and_check_catches_a_stale_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = _generator()
    assert DASHBOARD in gen.outputs()
    source = yaml.safe_load((MONITORING / "dashboard.yaml").read_text())
    assert _dashboard() == gen.dashboard(source)
    assert "Generated by deploy/monitoring/generate.py" in _dashboard()["description"]
    # a hand edit of dashboard.json (in a copy of the tree) makes --check fail
    for name in ("alerts.yaml", "dashboard.yaml", "dashboard.json"):
        shutil.copy(MONITORING / name, tmp_path / name)
    component = tmp_path / "component"
    component.mkdir()
    for path in gen.COMPONENT.iterdir():
        shutil.copy(path, component / path.name)
    monkeypatch.setattr(gen, "HERE", tmp_path)
    monkeypatch.setattr(gen, "COMPONENT", component)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 0
    edited = json.loads((tmp_path / "dashboard.json").read_text())
    edited["panels"][1]["title"] = "hand-edited"
    (tmp_path / "dashboard.json").write_text(json.dumps(edited, indent=2) + "\n")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0  # regenerates it
    assert gen.main(["--check"]) == 0


def _runbook_anchors() -> set[str]:
    text = (ROOT / "docs" / "runbook.md").read_text(encoding="utf-8")
    return {m.lower() for m in re.findall(r"^## (\w+)\s*$", text, re.MULTILINE)}


def test_every_alert_links_a_runbook_section() -> None:
    gen = _generator()
    rule = yaml.safe_load((gen.COMPONENT / "prometheusrule.yaml").read_text())
    anchors = _runbook_anchors()
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            url = r["annotations"]["runbook_url"]
            base, _, anchor = url.partition("#")
            assert base.endswith("/docs/runbook.md"), url
            assert anchor in anchors, f"{r['alert']}: add '## {r['alert']}' to docs/runbook.md"
    names = {r["alert"].lower() for r in _alert_rules()}
    assert anchors == names, "a runbook section without an alert (or the reverse)"


def test_alerts_cover_targets_and_envoys_view() -> None:
    rules = {r["alert"]: r for r in _alert_rules()}
    assert "up{" in rules["AuthzTargetDown"]["expr"]
    assert "absent(" in rules["AuthzMetricsAbsent"]["expr"]
    assert "envoy_http_ext_authz_error" in rules["AuthzEnvoyExtAuthzErrors"]["expr"]
    assert "envoy_cluster_upstream_rq_timeout" in rules["AuthzEnvoyExtAuthzTimeouts"]["expr"]


def test_envoy_counted_the_failed_check(envoy_exposition: dict[str, set[str]]) -> None:
    """The series the Envoy alerts read exist with the labels they match on."""
    labels = envoy_exposition["envoy_http_ext_authz_error"]
    assert {"envoy_ext_authz_prefix", "envoy_http_conn_manager_prefix"} <= labels
    assert "envoy_cluster_name" in envoy_exposition["envoy_cluster_upstream_rq_timeout"]
