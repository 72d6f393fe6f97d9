"""The Envoy configs that spread checks over per-worker endpoints (envoy/sidecar-workers.yaml and
the benchmark's bench/envoy-*.yaml), rendered with real worker ports and validated by the real
Envoy (``envoy --mode validate``)."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import yaml

from authz.dev.stack import envoy_binary
from authz.envoyconf import defaults, render
from authz.server.ports import envoy_endpoints

ROOT = Path(__file__).resolve().parents[2]


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--base-id",
            str(random.randint(1000, 60000)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sidecar_workers_template_spreads_over_every_worker_and_validates(tmp_path: Path) -> None:
    text = (ROOT / "envoy" / "sidecar-workers.yaml").read_text()
    values = {**defaults(text), "AUTHZ_ENDPOINTS": envoy_endpoints([19002, 19003, 19004])}
    values.update(LISTEN_PORT="18380", ADMIN_PORT="19931", STATS_PORT="19932", APP_PORT="18381")
    rendered = render(text, values)
    config = yaml.safe_load(rendered)
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "authz"]
    assert cluster["lb_policy"] in ("LEAST_REQUEST", "ROUND_ROBIN")
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        19002,
        19003,
        19004,
    ]
    out = tmp_path / "sidecar-workers.yaml"
    out.write_text(rendered)
    proc = _validate(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the defaults (two workers on 9101/9201) render and validate too
    out.write_text(render(text, defaults(text)))
    proc = _validate(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "name", ["envoy-noauth.yaml", "envoy-ext-grpc.yaml", "envoy-ext-http.yaml"]
)
def test_bench_envoy_configs_validate(tmp_path: Path, name: str) -> None:
    text = (ROOT / "bench" / name).read_text()
    values = {**defaults(text)}
    if "AUTHZ_ENDPOINTS" in values:
        values["AUTHZ_ENDPOINTS"] = envoy_endpoints([19102, 19103])
    out = tmp_path / name
    out.write_text(render(text, values))
    proc = _validate(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
