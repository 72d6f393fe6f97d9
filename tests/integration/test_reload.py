"""Hot reload: a Kubernetes ConfigMap symlink swap, SIGHUP, and reloads under load with no failed
check; a bad config never replaces a good one."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import prometheus_client as prom
import pytest

from authz import config as config_mod
from authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from authz.devidp import CONTOSO, FABRIKAM, DevIdP
from authz.devstack import stack_config
from authz.observability import AuditLog, Metrics
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


async def start(path: Path, watch: float) -> Harness:
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
