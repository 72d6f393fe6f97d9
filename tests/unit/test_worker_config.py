"""Worker-count detection (affinity, cgroup v1/v2 quotas) and per-worker port planning. The Envoy
configs that spread checks over per-worker endpoints are validated by the real Envoy in
tests/artefacts/test_worker_envoy_configs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from authz.server import ports
from authz.server.lifecycle import resolve_workers
from authz.server.ports import envoy_endpoints, plan_listens
from authz.server.procfs import available_cpus, cgroup_cpu_limit, parse_cfs, parse_cpu_max


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("max", None),
        ("150000 100000\n", 1.5),
        ("200000 100000", 2.0),
        ("50000 100000", 0.5),
        ("100000", 1.0),
        ("", None),
        ("abc 100000", None),
        ("100000 zero", None),
        ("0 100000", None),
        ("-1 100000", None),
        ("100000 0", None),
    ],
    ids=repr,
)
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("quota", "period", "cpus"),
    [("-1\n", "100000\n", None), ("50000", "100000", 0.5), ("x", "100000", None), ("1", "0", None)],
    ids=["unlimited", "half", "garbage", "zero-period"],
)
def test_parse_cfs(quota: str, period: str, cpus: float | None) -> None:
    assert parse_cfs(quota, period) == cpus


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [(8, None, 8), (8, 1.5, 2), (8, 0.2, 1), (2, 4.0, 2), (1, None, 1)],
    ids=["no-quota", "quota-rounds-up", "tiny-quota", "affinity-wins", "one"],
)
def test_available_cpus(affinity: int, quota: float | None, expected: int) -> None:
    assert available_cpus(affinity=lambda: affinity, limit=lambda: quota) == expected


def test_available_cpus_of_this_machine_is_positive() -> None:
    assert available_cpus() >= 1


def test_cgroup_v2_quota_is_read_up_to_the_root(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0


def test_cgroup_v1_quota_and_smallest_wins(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


def test_resolve_workers() -> None:
    assert resolve_workers(3, None) == 3
    assert resolve_workers(1, 2) == 2  # --workers wins over server.workers
    assert resolve_workers(4, 0) == available_cpus()
    with pytest.raises(ValueError, match="--workers"):
        resolve_workers(1, -1)


def test_per_worker_ports_follow_the_shared_ones() -> None:
    plans = plan_listens("127.0.0.1:9001", "", 3, {})
    assert [p.grpc_own for p in plans] == ["127.0.0.1:9101", "127.0.0.1:9201", "127.0.0.1:9301"]
    assert all(p.grpc == "127.0.0.1:9001" and p.http == "" and p.http_own == "" for p in plans)


def test_default_per_worker_ports_of_adjacent_shared_ports_do_not_collide() -> None:
    # the defaults 9001 (gRPC) and 9002 (HTTP) with both transports and many workers
    plans = plan_listens("127.0.0.1:9001", "127.0.0.1:9002", 64, {})
    ports = [p.grpc_own for p in plans] + [p.http_own for p in plans]
    assert len(set(ports)) == 128
    assert (plans[1].grpc_own, plans[1].http_own) == ("127.0.0.1:9201", "127.0.0.1:9202")


def test_per_worker_ports_that_collide_fail_at_startup() -> None:
    # a base that lands gRPC worker 1 on the shared HTTP port
    with pytest.raises(ValueError, match="collides") as e:
        plan_listens("127.0.0.1:9001", "127.0.0.1:9002", 2, {ports.GRPC_BASE_ENV: "9001"})
    assert ports.GRPC_BASE_ENV in str(e.value)
    # shared ports 100 apart: gRPC worker 0 (9101) would take the shared HTTP port
    with pytest.raises(ValueError, match="collides"):
        plan_listens("127.0.0.1:9001", "127.0.0.1:9101", 1, {})


def test_per_worker_port_bases_and_off() -> None:
    env = {ports.GRPC_BASE_ENV: "9101", ports.HTTP_BASE_ENV: "9201"}
    plans = plan_listens("127.0.0.1:9001", "127.0.0.1:9002", 2, env)
    assert [(p.grpc_own, p.http_own) for p in plans] == [
        ("127.0.0.1:9101", "127.0.0.1:9201"),
        ("127.0.0.1:9102", "127.0.0.1:9202"),
    ]
    off = plan_listens("127.0.0.1:9001", "127.0.0.1:9002", 2, {ports.PORTS_ENV: "off"})
    assert all(p.grpc_own == "" and p.http_own == "" for p in off)
    with pytest.raises(ValueError, match=ports.PORTS_ENV):
        plan_listens("127.0.0.1:9001", "", 2, {ports.PORTS_ENV: "sometimes"})
    with pytest.raises(ValueError, match="out of range"):
        plan_listens("127.0.0.1:65535", "", 1, {})


def test_envoy_endpoints_is_one_line_of_yaml() -> None:
    text = envoy_endpoints([9002, 9003])
    assert "\n" not in text
    parsed = yaml.safe_load(text)
    assert parsed == json.loads(text)
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in parsed] == [
        9002,
        9003,
    ]
