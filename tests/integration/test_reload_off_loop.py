"""A reload parses the file in a worker thread: checks keep being answered on the event loop
while the new file is still being read (here: a FIFO whose writer waits for the check)."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from pathlib import Path

import prometheus_client as prom
import pytest

from authz import config as config_mod
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import stack_config
from authz.observability import AuditLog, Metrics
from authz.policy.model import RequestAttrs
from authz.service import Service

pytestmark = pytest.mark.integration


async def test_checks_are_answered_while_a_reload_parses(tmp_path: Path) -> None:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        text = stack_config(idp.base_url)
        fifo = tmp_path / "authz.yaml"
        service = Service(
            config_mod.parse(text),
            metrics=Metrics(prom.CollectorRegistry()),
            audit=AuditLog(io.StringIO()),
            config_path=str(fifo),
        )
        os.mkfifo(fifo)  # reading it blocks until the writer below has written and closed
        order: list[str] = []
        answered = threading.Event()

        def writer() -> None:
            # The timeout only breaks the deadlock a blocking reload would cause (then the
            # order below shows it); it is not a threshold.
            answered.wait(timeout=10)
            order.append("file written")
            with open(fifo, "w", encoding="utf-8") as f:
                f.write(text + "\n# generation 2\n")

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            await service.start()
            reload = asyncio.create_task(service.reload())
            await asyncio.sleep(0)  # the reload runs up to its first suspension
            attrs = RequestAttrs("GET", "/orders/7", context={"api": "orders"})
            decision = await service.check(attrs)  # no token: denied, but answered
            order.append("check answered")
            assert decision.status == 401
            assert not reload.done()
            answered.set()
            assert await reload
            assert order == ["check answered", "file written"]
        finally:
            answered.set()
            thread.join()
            await service.close()
