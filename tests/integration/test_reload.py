"""Hot reload: a Kubernetes ConfigMap symlink swap, SIGHUP, and reloads under load with no failed
check; a bad config never replaces a good one."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import certifi
import grpc
import prometheus_client as prom
import pytest

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import stack_config
from authz.identity.keys import KeyStore
from authz.observability import AuditLog, Metrics
from authz.policy.model import RequestAttrs
from authz.server.app import App
from authz.service import Service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


def render(idp: DevIdP, scope: str = "Orders.Read") -> str:
    text = stack_config(idp.base_url)
    return text.replace("scopes_any: [Orders.Read]", f"scopes_any: [{scope}]")


def configmap_dir(root: Path, text: str, generation: int) -> Path:
    """Lay out a directory the way the kubelet mounts a ConfigMap: authz.yaml -> ..data/authz.yaml,
    ..data -> ..<timestamp>/ ; an update writes a new timestamp dir and swaps ..data atomically."""
    gen = root / f"..2026_11_22_{generation:04d}"
    gen.mkdir()
    (gen / "authz.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(gen.name)
    tmp.replace(root / "..data")
    link = root / "authz.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/authz.yaml")
    return link


class Harness:
    def __init__(self, app: App, registry: prom.CollectorRegistry) -> None:
        self.app = app
        self.registry = registry
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    async def check(self, token: str) -> int:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path = "GET", "/orders/7"
        http.headers["authorization"] = f"Bearer {token}"
        req.attributes.context_extensions["api"] = "orders"
        resp = await self.stub.Check(req, timeout=5)
        return int(resp.status.code)

    def reloads(self, result: str) -> float:
        return (
            self.registry.get_sample_value("authz_config_reloads_total", {"result": result}) or 0.0
        )

    async def until(self, result: str, count: float) -> None:
        for _ in range(200):
            if self.reloads(result) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {result} reload #{count}")


async def start(
    path: Path, watch: float, after_reload: Callable[[], None] | None = None
) -> Harness:
    registry = prom.CollectorRegistry()
    service = Service(
        config_mod.load(path),
        metrics=Metrics(registry),
        audit=AuditLog(io.StringIO()),
        config_path=str(path),
    )
    app = App(
        service,
        metrics_body=lambda: (b"", "text/plain"),
        grpc_listen="127.0.0.1:0",
        admin_listen="",
        watch_interval_s=watch,
        after_reload=after_reload,
    )
    await app.start()
    return Harness(app, registry)


@pytest.fixture
async def cm(tmp_path: Path, idp: DevIdP) -> AsyncIterator[tuple[Harness, Path]]:
    link = configmap_dir(tmp_path, render(idp), 1)
    h = await start(link, watch=0.05)
    yield h, tmp_path
    await h.channel.close()
    await h.app.stop()


async def test_configmap_symlink_swap_is_picked_up(cm: tuple[Harness, Path], idp: DevIdP) -> None:
    h, root = cm
    token = idp.mint(aud="api://orders", scp="Orders.Read")
    assert await h.check(token) == 0
    configmap_dir(root, render(idp, scope="Orders.Other"), 2)
    await h.until("ok", 1)
    assert await h.check(token) == 7  # PERMISSION_DENIED under the new rules
    configmap_dir(root, "apis: [", 3)  # a broken update: rejected, old rules keep serving
    await h.until("invalid", 1)
    assert await h.check(token) == 7
    assert h.app.service.ready


async def test_sighup_forces_a_reload(tmp_path: Path, idp: DevIdP) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(render(idp))
    h = await start(path, watch=3600)  # the watcher won't look: only the signal can reload
    h.app.install_signal_handlers()
    try:
        token = idp.mint(aud="api://orders", scp="Orders.Read")
        assert await h.check(token) == 0
        path.write_text(render(idp, scope="Orders.Other"))
        os.kill(os.getpid(), signal.SIGHUP)
        await h.until("ok", 1)
        assert await h.check(token) == 7
    finally:
        await h.channel.close()
        await h.app.stop()


async def test_each_good_reload_and_only_a_good_one_calls_after_reload(
    tmp_path: Path, idp: DevIdP
) -> None:
    # lifecycle passes settle_heap (gc.freeze the new configuration) as the hook.
    path = tmp_path / "authz.yaml"
    path.write_text(render(idp))
    calls: list[int] = []
    h = await start(path, watch=0.05, after_reload=lambda: calls.append(1))
    try:
        path.write_text(render(idp, scope="Orders.Other"))  # the watcher reloads it
        await h.until("ok", 1)
        assert calls == [1]
        path.write_text("apis: [")  # rejected: the old config serves on, no hook
        await h.until("invalid", 1)
        assert calls == [1]
        path.write_text(render(idp))
        h.app.request_reload()  # SIGHUP's path
        await h.until("ok", 2)
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(calls) >= 2
    finally:
        await h.channel.close()
        await h.app.stop()


async def test_reloads_under_load_fail_no_check(cm: tuple[Harness, Path], idp: DevIdP) -> None:
    h, root = cm
    tokens = [idp.mint(aud="api://orders", scp="Orders.Read") for _ in range(20)]
    results: list[int] = []
    done = asyncio.Event()

    async def load(i: int) -> None:
        while not done.is_set():
            results.append(await h.check(tokens[(i + len(results)) % len(tokens)]))

    workers = [asyncio.create_task(load(i)) for i in range(8)]
    for gen in range(2, 7):
        # every generation allows the request: any failure would be the reload's fault
        text = render(idp) + f"\n# generation {gen}\n"
        configmap_dir(root, text, gen)
        await h.until("ok", gen - 1)
    done.set()
    await asyncio.gather(*workers)
    assert len(results) > 50
    assert set(results) == {0}


async def held(idp: DevIdP) -> None:
    """Until a JWKS request is waiting at the dev IdP's gate (``hold_jwks``)."""
    assert await asyncio.to_thread(idp.wait_jwks_held, 1, 5)


def denied_unknown_kid(h: Harness) -> float:
    labels = {"api": "orders", "route": "read", "decision": "deny", "code": "unknown_signing_key"}
    return h.registry.get_sample_value("authz_checks_total", labels) or 0.0


async def test_a_key_refresh_in_flight_survives_a_reload(tmp_path: Path) -> None:
    """A check meets an unknown kid while the issuer hangs: it is answered unknown_signing_key
    at once (tokens.unknown_kid_wait_seconds), and the refresh runs on. The reload swaps the
    state and retires that store: the new state gets the keys that refresh brought without
    fetching them again, and the same token is then allowed."""
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        path = tmp_path / "authz.yaml"
        path.write_text(render(idp))
        h = await start(path, watch=3600)  # reloads only when the test says so
        try:
            idp.rotate()
            token = idp.mint(aud="api://orders", scp="Orders.Read")  # signed by the new key
            idp.reset_counts()
            idp.hold_jwks()
            assert await h.check(token) == 16  # denied while the refresh is held, not stuck
            assert idp.jwks_held >= 1
            path.write_text(render(idp) + "\n# generation 2\n")
            assert await h.app.service.reload()
            idp.release_jwks()
            await h.app.service._state.keys.wait_refreshes()  # the adopted refresh, joined
            assert await h.check(token) == 0  # the new state has the key
            assert idp.request_count("keys") == 2  # one refresh: the v1 and v2 JWKS, once each
            assert denied_unknown_kid(h) == 1
        finally:
            idp.release_jwks()
            await h.channel.close()
            await h.app.stop()


async def test_a_reload_grants_no_extra_unknown_kid_fetch(tmp_path: Path, idp: DevIdP) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(render(idp))  # unknown_kid_min_interval_seconds: 300
    h = await start(path, watch=3600)
    try:
        before = idp.request_count(f"/{CONTOSO}/discovery")
        stranger = idp.mint(aud="api://orders", header_extra={"kid": "not-published-1"})
        assert await h.check(stranger) == 16
        assert idp.request_count(f"/{CONTOSO}/discovery") == before + 2  # the forced refresh
        path.write_text(render(idp) + "\n# generation 2\n")
        assert await h.app.service.reload()
        other = idp.mint(aud="api://orders", header_extra={"kid": "not-published-2"})
        assert await h.check(other) == 16
        assert await h.check(stranger) == 16
        assert idp.request_count(f"/{CONTOSO}/discovery") == before + 2  # still rate-limited
        assert denied_unknown_kid(h) == 3
    finally:
        await h.channel.close()
        await h.app.stop()


async def test_a_cancelled_refresh_is_answered_and_a_cancelled_check_propagates(
    tmp_path: Path, idp: DevIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(render(idp))
    h = await start(path, watch=3600)
    service = h.app.service
    stranger = idp.mint(aud="api://orders", header_extra={"kid": "not-published-3"})
    attrs = RequestAttrs(
        method="GET",
        path="/orders/7",
        host="orders.example.com",
        headers={"authorization": f"Bearer {stranger}"},
        context={"api": "orders"},
    )
    gate = asyncio.Event()

    async def stuck(self: KeyStore, issuer: str, tenant: str = "") -> bool:
        await gate.wait()
        return False

    try:
        # The refresh the check awaits is cancelled under it: its store closes without draining.
        idp.hold_jwks()
        pending = asyncio.create_task(service.check(attrs))
        await held(idp)
        await service._state.keys.close(drain=False)
        decision = await pending
        assert (decision.status, decision.code) == (401, "unknown_signing_key")
        assert await h.check(stranger) == 16  # the same through gRPC: a decision, not an error

        monkeypatch.setattr(KeyStore, "refresh_unknown_kid", stuck)
        check = asyncio.create_task(service.check(attrs))
        await asyncio.sleep(0.05)
        check.cancel()  # the check's own task: the cancellation is not swallowed
        with pytest.raises(asyncio.CancelledError):
            await check
    finally:
        idp.release_jwks()
        gate.set()
        await h.channel.close()
        await h.app.stop()


def _without_partners(text: str) -> str:
    block = text[text.index("  - name: partners\n") : text.index("headers:\n")]
    return text.replace(block, "").replace("issuers: [contoso, partners]", "issuers: [contoso]")


async def test_a_reload_that_adds_an_issuer_fetches_its_keys_before_the_swap(
    tmp_path: Path, idp: DevIdP
) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(_without_partners(render(idp)))
    h = await start(path, watch=3600)
    try:
        partner = idp.mint(tid=FABRIKAM, aud="api://orders", scp="Orders.Read")
        assert await h.check(partner) == 16  # no issuer of this API vouches for fabrikam yet
        path.write_text(render(idp))
        assert await h.app.service.reload()
        # The very first check after the swap is decided with the new issuer's keys in place.
        assert await h.check(partner) == 0
        assert h.reloads("ok") == 1
    finally:
        await h.channel.close()
        await h.app.stop()


async def test_a_reload_whose_new_keys_cannot_be_fetched_keeps_the_old_config(
    tmp_path: Path, idp: DevIdP
) -> None:
    path = tmp_path / "authz.yaml"
    good = _without_partners(render(idp))
    path.write_text(good)
    h = await start(path, watch=3600)
    try:
        token = idp.mint(aud="api://orders", scp="Orders.Read")
        assert await h.check(token) == 0
        broken = good.replace(
            "headers:\n",
            '  - name: gone\n    instance: "http://127.0.0.1:9"\n'
            '    tenant: "33333333-3333-4333-8333-333333333333"\n'
            "    fetch_timeout_seconds: 1\nheaders:\n",
            1,
        ).replace("issuers: [contoso]", "issuers: [contoso, gone]", 1)
        path.write_text(broken)
        assert not await h.app.service.reload()
        assert h.reloads("error") == 1
        assert h.reloads("ok") == 0
        assert await h.check(token) == 0  # the previous configuration keeps serving
        assert h.app.service.settings.issuer("contoso")
        assert [s.name for s in h.app.service.settings.issuers] == ["contoso"]
    finally:
        await h.channel.close()
        await h.app.stop()


async def test_a_changed_ca_bundle_is_announced_as_needing_a_restart(
    tmp_path: Path, idp: DevIdP, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(render(idp))
    bundle = certifi.where()  # any PEM CA bundle
    h = await start(path, watch=3600)
    try:
        text = render(idp).replace("tokens:\n", f'tokens:\n  ca_bundle: "{bundle}"\n', 1)
        assert text != render(idp)
        path.write_text(text)
        with caplog.at_level(logging.WARNING, logger="authz"):
            assert await h.app.service.reload()
        assert "tokens.ca_bundle changed; it takes effect at the next restart" in caplog.text
    finally:
        await h.channel.close()
        await h.app.stop()
