"""``authz serve --workers 2`` as a real process tree on 127.0.0.1: both workers answer checks
(on their own ports, over HTTP and gRPC), /metrics sums across workers, SIGHUP reaches every
worker, a killed worker is restarted, SIGTERM stops everything gracefully. And the claims cache
stays at its configured size under a flood of unique valid tokens."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import prometheus_client as prom
import pytest

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.dev.idp import CONTOSO, DevIdP
from authz.dev.stack import ADMIN_AUDIENCE, ADMIN_ROLE, REVOCATION_CONFIG
from authz.observability import AuditLog, Metrics
from authz.service import Service

pytestmark = pytest.mark.integration

CONFIG = """\
server:
  shutdown_grace_seconds: 3
tokens:
  cache: {{max_entries: {cache_max}, max_ttl_seconds: 300}}
issuers:
  - name: contoso
    instance: "{instance}"
    tenant: "{tenant}"
    versions: ["2.0"]
apis:
  - name: orders
    audiences: ["api://orders"]
    issuers: [contoso]
    match:
      path_prefixes: ["/orders"]
    routes:
      - name: read
        path: "/orders/{{id}}"
        methods: [GET]
        require: {{scopes_any: [Orders.Read]}}
"""


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO,)) as idp:
        yield idp


def write_config(path: Path, idp: DevIdP, cache_max: int = 100) -> Path:
    path.write_text(CONFIG.format(cache_max=cache_max, instance=idp.base_url, tenant=CONTOSO))
    return path


def port_block(n: int) -> int:
    """The first of n consecutive free ports on 127.0.0.1."""
    for base in range(23000 + os.getpid() % 2000 * 10, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def wait(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@dataclass
class Tree:
    proc: subprocess.Popen[bytes]
    grpc: int
    http: int
    admin: int
    stderr: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.admin}{path}", timeout=5, trust_env=False)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def workers(self) -> list[int]:
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return sorted(int(k) for k in kids)


@pytest.fixture
def tree(tmp_path: Path, idp: DevIdP) -> Iterator[Tree]:
    with start_tree(tmp_path, write_config(tmp_path / "authz.yaml", idp)) as t:
        yield t


@contextlib.contextmanager
def start_tree(tmp_path: Path, cfg: Path) -> Iterator[Tree]:
    base = port_block(8)
    grpc_port, http_port, admin = base, base + 3, base + 7
    env = dict(os.environ)
    env.update(
        AUTHZ_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        AUTHZ_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        AUTHZ_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        # own ports inside the free block (the default, port + 100 * (i + 1), may be taken here)
        AUTHZ_WORKER_GRPC_PORT_BASE=str(grpc_port + 1),  # base+1, base+2
        AUTHZ_WORKER_HTTP_PORT_BASE=str(http_port + 1),  # base+4, base+5
    )
    err = tmp_path / "stderr"
    cmd = [sys.executable, "-m", "authz", "serve", "--config", str(cfg), "--transport", "both"]
    cmd += ["--workers", "2", "--plain-logs"]
    with err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    t = Tree(proc, grpc_port, http_port, admin, err)
    try:
        wait(lambda: t.get("/readyz").status_code == 200)
        yield t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def http_check(port: int, token: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{port}/orders/7",
        headers={"authorization": f"Bearer {token}", "host": "orders.example.com"},
        timeout=5,
        trust_env=False,
    )


def grpc_check(port: int, token: str) -> external_auth_pb2.CheckResponse:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/orders/7", "orders.example.com"
    http.headers["authorization"] = f"Bearer {token}"
    req.attributes.context_extensions["api"] = "orders"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(
            channel
        ).Check(req, timeout=5)
        return resp


def test_two_workers_answer_metrics_sum_sighup_reaches_all_sigterm_stops(
    tree: Tree, idp: DevIdP
) -> None:
    token = idp.mint(aud="api://orders")
    pids = tree.workers()
    assert len(pids) == 2
    # each worker on its own ports, and the shared ones
    for port in (tree.http + 1, tree.http + 2, tree.http):
        r = http_check(port, token)
        assert r.status_code == 200, r.text
        assert r.headers["x-user-id"]
    for port in (tree.grpc + 1, tree.grpc + 2):
        assert grpc_check(port, token).status.code == 0

    key = 'authz_checks_total{api="orders",code="ok",decision="allow",route="read"}'
    wait(lambda: tree.metrics().get(key) == 5.0)
    m = tree.metrics()
    assert m["authz_workers"] == 2.0
    assert m["authz_workers_ready"] == 2.0
    assert m["authz_ready"] == 1.0
    # process_* cover the whole tree: more CPU and memory than the supervisor alone uses
    own = Path(f"/proc/{tree.proc.pid}/stat").read_text().rpartition(")")[2].split()
    own_rss = int(own[21]) * os.sysconf("SC_PAGE_SIZE")
    assert m["process_resident_memory_bytes"] > 1.5 * own_rss  # the supervisor + two workers
    assert m["process_cpu_seconds_total"] > 0
    assert 0 < m["process_open_fds"] < m["process_max_fds"]

    tree.proc.send_signal(signal.SIGHUP)
    wait(lambda: tree.metrics().get('authz_config_reloads_total{result="ok"}') == 2.0)

    tree.proc.send_signal(signal.SIGTERM)
    assert tree.proc.wait(15) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    log = tree.stderr.read_text()
    assert log.count("stopped") >= 3  # two workers and the supervisor


def test_a_killed_worker_is_restarted(tree: Tree, idp: DevIdP) -> None:
    victim, survivor = tree.workers()
    os.kill(victim, signal.SIGKILL)
    wait(lambda: victim not in tree.workers() and len(tree.workers()) == 2)
    wait(lambda: tree.get("/readyz").status_code == 200)
    assert survivor in tree.workers()
    assert tree.metrics()["authz_worker_restarts_total"] == 1.0
    token = idp.mint(aud="api://orders")
    for port in (tree.http + 1, tree.http + 2):
        assert http_check(port, token).status_code == 200


async def test_claims_cache_stays_at_its_max_under_a_flood_of_unique_tokens(
    tmp_path: Path, idp: DevIdP
) -> None:
    from authz.policy.model import RequestAttrs

    settings = config_mod.load(write_config(tmp_path / "a.yaml", idp, cache_max=40))
    registry = prom.CollectorRegistry()
    service = Service(settings, metrics=Metrics(registry), audit=AuditLog(io.StringIO()))
    await service.start()
    try:
        for _ in range(120):
            attrs = RequestAttrs(
                method="GET",
                path="/orders/1",
                host="orders.example.com",
                headers={"authorization": f"Bearer {idp.mint(aud='api://orders')}"},
            )
            assert (await service.check(attrs)).allowed
        service.sync_cache_metrics()
        assert registry.get_sample_value("authz_token_cache_entries") == 40.0
        assert registry.get_sample_value("authz_token_cache_misses_total") == 120.0
    finally:
        await service.close()


def test_the_supervisor_serves_the_admin_api_and_every_worker_enforces(
    tmp_path: Path, idp: DevIdP
) -> None:
    """With workers, the admin listener (and so the admin API) is the supervisor's: a rule it
    takes lands in the file, and each worker, on its own port, denies the token once it polled."""
    cfg = tmp_path / "authz.yaml"
    rules = tmp_path / "revocations.json"
    revocation = REVOCATION_CONFIG.format(file=rules, audience=ADMIN_AUDIENCE, role=ADMIN_ROLE)
    cfg.write_text(revocation + CONFIG.format(cache_max=100, instance=idp.base_url, tenant=CONTOSO))
    victim = idp.mint(
        aud="api://orders", scp="Orders.Read", oid="99999999-9999-4999-8999-999999999999"
    )
    with start_tree(tmp_path, cfg) as t:
        for port in (t.http + 1, t.http + 2):
            assert http_check(port, victim).status_code == 200  # cached in both workers
        url = f"http://127.0.0.1:{t.admin}/admin/revocations"
        body = {"oid": "99999999-9999-4999-8999-999999999999", "expires_in": 600, "reason": "w"}
        denied = httpx.post(url, json=body, timeout=10, trust_env=False)
        assert denied.status_code == 401
        token = idp.mint(aud=ADMIN_AUDIENCE, roles=(ADMIN_ROLE,))
        added = httpx.post(
            url,
            json=body,
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
            trust_env=False,
        )
        assert added.status_code == 201, added.text
        assert [r["oid"] for r in json.loads(rules.read_text())["rules"]] == [body["oid"]]
        for port in (t.http + 1, t.http + 2):
            wait(lambda port=port: http_check(port, victim).status_code == 401)  # type: ignore[misc]
            assert http_check(port, victim).json()["code"] == "token_revoked"
        assert grpc_check(t.grpc + 1, victim).denied_response.status.code == 401
