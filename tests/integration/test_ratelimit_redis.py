"""Rate-limit counters shared through a real redis-server (the Debian package, started on a free
127.0.0.1 port): two independent counter sets (two "replicas") converge on the global count;
Redis stopped -> local counting goes on, ``authz_redis_up 0``, errors counted, one log line;
restarted (empty) -> the pending increments are pushed and both converge again. Password auth
from a file; a wrong password is "down", not a crash."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import prometheus_client as prom
import pytest
import redis

from authz.config import RedisSettings
from authz.dev.stack import RedisServer
from authz.observability import Metrics
from authz.policy.ratelimit import Counters
from authz.state.ratelimit_sync import RateLimitSync, redis_key
from authz.state.redisconn import RedisLink

pytestmark = pytest.mark.integration

LID = ("orders", "read", "per-user", 60)
NOW = 1_699_747_200.0
KEY = (LID, "user-1", int(NOW // 60))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as s:
        yield s


class Replica:
    def __init__(self, url: str, **kw: object) -> None:
        self.metrics = Metrics(prom.CollectorRegistry())
        self.counters = Counters()
        settings = RedisSettings(url=url, key_prefix="t:", **kw)  # type: ignore[arg-type]
        self.link = RedisLink(settings, self.metrics)
        self.sync = RateLimitSync(
            self.counters, self.link, interval_s=0.05, observer=self.metrics, clock=lambda: NOW
        )

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


async def test_two_replicas_converge_on_the_global_count(server: RedisServer) -> None:
    a, b = Replica(server.url), Replica(server.url)
    for _ in range(4):
        a.counters.hit(KEY)
    b.counters.hit(KEY)
    assert await a.sync.sync_once() == "ok"
    assert await b.sync.sync_once() == "ok"
    assert b.counters.count(KEY) == 5  # 4 from a, 1 of its own
    assert a.counters.count(KEY) == 4  # not yet: a pushed before b
    assert await a.sync.sync_once() == "ok"  # reads back what it pushed last round
    assert a.counters.count(KEY) == 5
    assert await a.sync.sync_once() == "idle"
    a.counters.hit(KEY)
    assert await a.sync.sync_once() == "ok"
    assert a.counters.count(KEY) == 6
    # what Redis holds: one hashed key per window, no user id, expiring after two periods
    client = redis.Redis(port=server.port)
    rkey = redis_key(a.link, KEY)
    assert rkey.startswith("t:rl:")
    assert "user-1" not in rkey
    assert int(client.get(rkey) or 0) == 6
    assert 0 < client.pttl(rkey) <= 121_000
    client.close()
    assert a.metric("authz_redis_up") == 1
    assert a.sync.max_delta == 4
    await a.link.close()
    await b.link.close()


async def test_a_new_counter_learns_its_previous_window(server: RedisServer) -> None:
    a, b = Replica(server.url), Replica(server.url)
    prev = (LID, "user-1", KEY[2] - 1)
    for _ in range(7):
        a.counters.hit(prev)
    assert await a.sync.sync_once() == "ok"
    b.counters.hit(KEY)  # b has never seen the previous window
    assert await b.sync.sync_once() == "ok"
    assert b.counters.count(prev) == 7
    await a.link.close()
    await b.link.close()


async def test_redis_down_keeps_counting_locally_and_converges_when_back(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = Replica(server.url), Replica(server.url)
    a.counters.hit(KEY)
    assert await a.sync.sync_once() == "ok"
    server.stop()
    caplog.set_level(logging.WARNING, logger="authz.redis")
    for _ in range(3):
        a.counters.hit(KEY)
    b.counters.hit(KEY)
    assert await a.sync.sync_once() == "down"
    assert await b.sync.sync_once() == "down"
    assert a.counters.count(KEY) == 4  # the last known total (1) + 3 local
    assert a.metric("authz_redis_up") == 0
    assert a.metric("authz_redis_errors_total", op="ratelimit_sync") == 1
    assert await a.sync.sync_once() == "down"  # backing off: no new attempt, no new error
    assert a.metric("authz_redis_errors_total", op="ratelimit_sync") == 1
    lost = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert len(lost) == 2  # one line per replica, not one per attempt
    server.start()  # same port, empty
    a.link._next_try = b.link._next_try = 0.0  # skip the backoff wait
    assert await a.sync.sync_once() == "ok"  # pushes its 3 pending
    assert await b.sync.sync_once() == "ok"  # pushes its 1: Redis holds 4
    # Redis restarted empty: it holds what was pushed since (a's 3 + b's 1), while a still
    # knows the 1 it had pushed before the outage (counts never go down)
    assert int(redis.Redis(port=server.port).get(redis_key(a.link, KEY)) or 0) == 4
    assert a.counters.count(KEY) == 3 + 1
    assert await a.sync.sync_once() == "ok"  # the read-back round
    assert await b.sync.sync_once() == "ok"
    assert a.counters.count(KEY) == 4
    assert b.counters.count(KEY) == 4  # converged: both see the same total
    assert a.metric("authz_redis_up") == 1
    assert any("redis available again" in r.getMessage() for r in caplog.records)
    await a.link.close()
    await b.link.close()


async def test_password_from_a_file_and_a_wrong_password(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-value\n")
    with RedisServer(tmp_path / "redis", args=("--requirepass", "s3cret-value")) as server:
        good = Replica(server.url, password_file=str(secret))
        assert await good.link.ping()
        bad = Replica(server.url, password="wrong")
        assert not await bad.link.ping()
        assert bad.metric("authz_redis_up") == 0
        none = Replica(server.url)
        none.counters.hit(KEY)
        assert await none.sync.sync_once() == "down"  # NOAUTH: a Redis error, not a crash
        for r in (good, bad, none):
            await r.link.close()


async def test_without_redis_the_task_only_prunes() -> None:
    counters = Counters()
    old = (LID, "user-1", KEY[2] - 5)
    counters.hit(old)
    counters.hit(KEY)
    sync = RateLimitSync(counters, None, interval_s=0.05, clock=lambda: NOW)
    assert await sync.sync_once() == "local"
    assert counters.count(old) == 0
    assert counters.count(KEY) == 1
    sync.start()
    await sync.stop()
