"""The real app in-process: grpc.aio on 127.0.0.1:0, the dev IdP over HTTP, the admin listener;
readiness, health, reflection, metrics, hot reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import jwt
import prometheus_client as prom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import stack_config
from authz.observability import AuditLog, Metrics
from authz.policy.model import Decision, RequestAttrs
from authz.server.app import App
from authz.service import Service

pytestmark = pytest.mark.integration


@pytest.fixture
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


def write_config(path: Path, idp: DevIdP, *, interval: float = 300, extra: str = "") -> Path:
    text = stack_config(idp.base_url, unknown_kid_interval=interval)
    path.write_text(text + extra)
    return path


class Running:
    def __init__(self, app: App, audit: io.StringIO, registry: prom.CollectorRegistry) -> None:
        self.app = app
        self.audit = audit
        self.registry = registry
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        self.authz = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def check(
        self, path: str, token: str | None = None, method: str = "GET"
    ) -> external_auth_pb2.CheckResponse:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host, http.id = method, path, "orders.example.com", "rid-1"
        if token:
            http.headers["authorization"] = f"Bearer {token}"
        req.attributes.context_extensions["api"] = "orders"
        return await self.authz.Check(req, timeout=5)

    async def admin(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False) as c:
            return await c.get(f"http://127.0.0.1:{self.app.admin_port}{path}", timeout=5)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


@contextlib.asynccontextmanager
async def serve(path: Path) -> AsyncIterator[Running]:
    """The app on the config at ``path``: gRPC, HTTP and admin listeners on free ports."""
    settings = config_mod.load(path)
    registry = prom.CollectorRegistry()
    audit = io.StringIO()
    service = Service(
        settings, metrics=Metrics(registry), audit=AuditLog(audit), config_path=str(path)
    )
    app = App(
        service,
        metrics_body=lambda: (prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST),
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        watch_interval_s=0.1,
    )
    await app.start()
    r = Running(app, audit, registry)
    try:
        yield r
    finally:
        await r.channel.close()
        await app.stop()


@pytest.fixture
async def running(tmp_path: Path, idp: DevIdP) -> AsyncIterator[Running]:
    async with serve(write_config(tmp_path / "authz.yaml", idp)) as r:
        yield r


async def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_serving_health_metrics_and_a_check(running: Running, idp: DevIdP) -> None:
    async def serving() -> bool:
        resp = await running.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    await wait_for(serving)
    named = await running.health.Check(
        health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=2
    )
    assert named.status == health_pb2.HealthCheckResponse.SERVING
    assert (await running.admin("/healthz")).status_code == 200
    assert (await running.admin("/readyz")).status_code == 200

    ok = await running.check("/orders/7", idp.mint(aud="api://orders", scp="Orders.Read"))
    assert ok.status.code == 0
    denied = await running.check("/orders/7")
    assert denied.status.code == 16
    assert denied.denied_response.status.code == 401

    body = (await running.admin("/metrics")).text
    assert 'authz_checks_total{api="orders",code="ok",decision="allow",route="read"} 1.0' in body
    assert "authz_check_duration_seconds_bucket" in body
    assert "authz_jwks_keys" in body
    assert "authz_build_info" in body
    running.app.service.audit.flush()
    audit = running.audit.getvalue().splitlines()
    assert len(audit) == 2
    assert '"code":"missing_token"' in audit[1]


async def test_reflection_lists_the_services(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in stub.ServerReflectionInfo(one(), timeout=5):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"envoy.service.auth.v3.Authorization", "grpc.health.v1.Health"} <= names


async def test_not_ready_while_the_idp_is_down(tmp_path: Path, idp: DevIdP) -> None:
    idp.set_outage(True)
    path = write_config(tmp_path / "authz.yaml", idp)
    registry = prom.CollectorRegistry()
    service = Service(
        config_mod.load(path), metrics=Metrics(registry), audit=AuditLog(io.StringIO())
    )
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
    )
    await app.start()
    try:
        running = Running(app, io.StringIO(), registry)
        assert (await running.admin("/readyz")).status_code == 503
        resp = await running.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        denied = await running.check("/orders/7", idp.mint(aud="api://orders", scp="Orders.Read"))
        assert denied.denied_response.status.code == 503  # keys_unavailable: fail closed
        await running.channel.close()
    finally:
        await app.stop()


async def test_hot_reload_good_then_bad(running: Running, tmp_path: Path, idp: DevIdP) -> None:
    token = idp.mint(aud="api://orders", scp="Orders.Read")
    assert (await running.check("/orders/7", token)).status.code == 0
    # good: a new config where reading orders needs a role the token lacks
    path = Path(running.app.service.config_path or "")
    text = path.read_text().replace("scopes_any: [Orders.Read]", "scopes_any: [Orders.Nope]")
    tmp = tmp_path / "next.yaml"
    tmp.write_text(text)
    tmp.replace(path)

    async def reloaded() -> bool:
        return running.metric("authz_config_reloads_total", {"result": "ok"}) >= 1

    await wait_for(reloaded)
    assert (await running.check("/orders/7", token)).denied_response.status.code == 403
    # bad: rejected with a metric, the previous config keeps serving
    tmp.write_text("apis: [")
    tmp.replace(path)

    async def rejected() -> bool:
        return running.metric("authz_config_reloads_total", {"result": "invalid"}) >= 1

    await wait_for(rejected)
    assert (await running.check("/orders/7", token)).denied_response.status.code == 403
    assert (await running.admin("/readyz")).status_code == 200


class SlowService(Service):
    """Holds each check for a moment so that checks are provably in flight at shutdown."""

    async def check(self, attrs: RequestAttrs) -> Decision:
        await asyncio.sleep(0.3)
        return await super().check(attrs)


async def test_graceful_stop_answers_in_flight_checks(tmp_path: Path, idp: DevIdP) -> None:
    path = write_config(tmp_path / "authz.yaml", idp)
    registry = prom.CollectorRegistry()
    service = SlowService(
        config_mod.load(path), metrics=Metrics(registry), audit=AuditLog(io.StringIO())
    )
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen="127.0.0.1:0",
        admin_listen="",
    )
    await app.start()
    running = Running(app, io.StringIO(), registry)
    tokens = [idp.mint(aud="api://orders", scp="Orders.Read") for _ in range(20)]
    inflight = [asyncio.create_task(running.check("/orders/7", t)) for t in tokens]
    await asyncio.sleep(0.15)  # the checks are now inside the server, sleeping
    stop = asyncio.create_task(app.stop())
    await asyncio.sleep(0.05)
    late = await asyncio.gather(running.check("/orders/7", tokens[0]), return_exceptions=True)
    results = await asyncio.gather(*inflight, return_exceptions=True)
    await stop
    await running.channel.close()
    # every check in flight got its real answer (allow), none was cut off
    assert [getattr(r, "status", r).code for r in results] == [0] * len(tokens)
    # a check arriving after shutdown began is refused, not silently dropped
    assert isinstance(late[0], grpc.aio.AioRpcError)


async def test_dry_run_is_counted_and_logged(running: Running, idp: DevIdP) -> None:
    token = idp.mint(aud="api://orders", scp="Orders.Read")  # lacks the role Orders.Reports
    resp = await running.check("/orders/reports/q3", token)
    assert resp.status.code == 0  # allowed: the route is in dry-run
    assert resp.dynamic_metadata.fields["code"].string_value == "missing_role"
    labels = {
        "api": "orders",
        "route": "reports",
        "decision": "dry_run_deny",
        "code": "missing_role",
    }
    assert running.metric("authz_checks_total", labels) == 1
    running.app.service.audit.flush()
    line = json.loads(running.audit.getvalue().splitlines()[-1])
    assert (line["decision"], line["would_deny"], line["code"]) == (
        "dry_run_deny",
        True,
        "missing_role",
    )


async def test_a_new_signing_key_is_fetched_once_and_allows_the_same_check(
    tmp_path: Path, idp: DevIdP
) -> None:
    """The IdP rotates its key; the first token signed with it meets an unknown kid, and the check
    refreshes the issuer's keys and decides again: allowed on that one check, one JWKS fetch."""
    async with serve(write_config(tmp_path / "authz.yaml", idp, interval=300)) as running:
        new_kid = idp.rotate()
        token = idp.mint(aud="api://orders", scp="Orders.Read")
        assert jwt.get_unverified_header(token)["kid"] == new_kid
        refreshed = {"issuer": "contoso", "result": "ok"}
        loaded = running.metric("authz_jwks_refreshes_total", refreshed)  # the start
        idp.reset_counts()
        ok = await running.check("/orders/7", token)
        # Allowed on that check when the refresh lands within tokens.unknown_kid_wait_seconds
        # (the usual case on loopback); on a loaded machine it may take longer: then the check is
        # 401 unknown_signing_key and the refresh lands in the background (bounded re-checks).
        for _ in range(300):
            if ok.status.code == 0:
                break
            assert ok.dynamic_metadata.fields["code"].string_value == "unknown_signing_key"
            await asyncio.sleep(0.01)
            ok = await running.check("/orders/7", token)
        assert ok.status.code == 0
        assert ok.dynamic_metadata.fields["code"].string_value == "ok"
        # one refresh of the token's issuer: each of its JWKS (v1, v2) served exactly once more
        assert idp.request_count(f"/{CONTOSO}/discovery/v2.0/keys") == 1
        assert idp.request_count(f"/{CONTOSO}/discovery/keys") == 1
        assert idp.request_count("keys") == 2  # and no other issuer's
        assert running.metric("authz_jwks_refreshes_total", refreshed) == loaded + 1

        # right after, yet another unknown kid: denied at once, no fetch (the rate limit)
        served = idp.request_count()  # discovery documents and JWKS
        stranger = idp.mint(aud="api://orders", header_extra={"kid": "never-published"})
        denied = await running.check("/orders/7", stranger)
        assert denied.status.code == 16
        assert denied.denied_response.status.code == 401
        assert denied.dynamic_metadata.fields["code"].string_value == "unknown_signing_key"
        assert idp.request_count() == served
        assert (await running.check("/orders/7", token)).status.code == 0
        assert idp.request_count() == served


async def test_key_expiry_gauge_follows_the_key_store(tmp_path: Path, idp: DevIdP) -> None:
    """authz_jwks_keys_expiry_timestamp_seconds (AuthzJwksKeysExpired): when each issuer's oldest
    key set in use passes max_key_age_seconds; 0 while an allowed tenant has no keys."""
    idp.delete_tenant(FABRIKAM)  # the partners issuer's only allowed tenant
    try:
        async with serve(write_config(tmp_path / "authz.yaml", idp)) as running:
            running.app.service.housekeeping()
            keys = running.app.service._state.keys
            snap = keys.snapshot("contoso")
            assert snap is not None
            expiry = running.metric(
                "authz_jwks_keys_expiry_timestamp_seconds", {"issuer": "contoso"}
            )
            assert expiry == snap.fetched_at + 86400
            name = "authz_jwks_keys_expiry_timestamp_seconds"
            assert running.registry.get_sample_value(name, {"issuer": "partners"}) == 0.0
            assert keys.keys_expire_at("partners") == 0.0
            assert not running.app.service.ready  # partners can verify no tenant's tokens
    finally:
        idp.restore_tenant(FABRIKAM)
