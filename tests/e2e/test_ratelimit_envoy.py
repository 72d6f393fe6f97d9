"""Rate limiting through real Envoy.

Both transports, one process, no Redis (the session stacks): a caller over its limit gets a 429
with Retry-After, RateLimit-Policy, RateLimit and the JSON body; another caller is unaffected;
an anonymous route limits by the client address Envoy saw, whatever X-Forwarded-For or
x-authz-client-ip a client sends; the audit line and the metric name the limit.

Two replicas (two ``authz serve`` processes) behind one Envoy, one real redis-server: the caller
is limited on every replica; a limit resets after its period; the overshoot of a concurrent
burst stays within the bound the replicas report; Redis stopped -> every check is still answered
(no 503: within Envoy's 0.25 s budget), local limits apply, ``authz_redis_up 0``; Redis back ->
``authz_redis_up 1`` and the replicas converge on the shared count.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from authz.config import RedisSettings
from authz.dev.stack import Stack, stack_config, wait_until
from authz.state.ratelimit_sync import redis_key
from authz.state.redisconn import RedisLink
from tests.e2e.conftest import running

pytestmark = pytest.mark.e2e

QUOTA = "/orders/quota/items"  # stack config: per-user, 3 per minute
STATUS = "/orders/status/now"  # anonymous, per client address, 3 per minute
MEASURE = "/orders/measure/x"  # the shared stack: per-user, 20 per week (one long window)
WEEK = 7 * 86400


def new_user() -> str:
    return str(uuid.uuid4())


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ------------------------------------------------------------------ one process, both transports


def test_over_the_limit_is_429_with_the_ratelimit_headers(stack: Stack) -> None:
    token = stack.mint(scp="Orders.Read", oid=new_user())
    got = [stack.request("GET", QUOTA, token=token) for _ in range(4)]
    assert [r.status for r in got] == [200, 200, 200, 429]
    assert got[0].backend_headers["x-user-id"]  # the allowed ones reached the backend
    denied = got[3]
    assert denied.json() == {
        "error": "rate_limited",
        "code": "rate_limited",
        "request_id": denied.json()["request_id"],
    }
    wait = int(denied.headers["retry-after"])
    assert 1 <= wait <= 120
    assert denied.headers["ratelimit-policy"] == '"per-user";q=3;w=60'
    assert denied.headers["ratelimit"] == f'"per-user";r=0;t={wait}'
    assert "www-authenticate" not in denied.headers
    other = stack.mint(scp="Orders.Read", oid=new_user())
    assert stack.request("GET", QUOTA, token=other).status == 200
    wait_until(
        lambda: (
            metric(
                stack.metrics_text(),
                "authz_ratelimit_limited_total",
                api="orders",
                route="quota",
                limit="per-user",
                mode="enforce",
            )
            >= 1
        ),
        10,
        "the over-limit metric",
    )
    checks = metric(stack.metrics_text(), "authz_checks_total", route="quota", code="rate_limited")
    assert checks >= 1
    wait_until(lambda: '"code":"rate_limited"' in stack.logs(), 10, "the audit line")
    assert token.split(".")[2] not in stack.logs()


def test_anonymous_route_limits_by_the_address_envoy_saw(stack: Stack) -> None:
    statuses = []
    for i in range(5):
        spoof = [("x-forwarded-for", f"203.0.113.{i}"), ("x-authz-client-ip", f"198.51.100.{i}")]
        statuses.append(stack.request("GET", STATUS, headers=spoof).status)
    assert statuses == [200, 200, 200, 429, 429]


# ----------------------------------------------------------- two replicas, one real Redis

LIMITS = """\
      - name: burst    # 2 per second: resets quickly
        path_prefix: /orders/burst/
        methods: [GET]
        require: {scopes_any: [Orders.Read]}
        rate_limits:
          - {name: per-user, key: oid, limit: 2, period: 1s}
      - name: measure    # one long window: the overshoot of a burst
        path_prefix: /orders/measure/
        methods: [GET]
        require: {scopes_any: [Orders.Read]}
        rate_limits:
          - {name: per-user, key: oid, limit: 20, period: 7d}
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    text = stack_config("{instance}").replace("      - name: me ", LIMITS + "      - name: me ")
    s = Stack(tmp_path_factory.mktemp("rl-shared"), config_text=text, redis=True, replicas=2)
    yield from running(s)


def direct(stack: Stack, replica: int, path: str, token: str) -> int:
    """A check straight at one replica's HTTP ext_authz port (the answer Envoy would get)."""
    port = stack.ports["http" if replica == 0 else f"http{replica}"]
    r = httpx.get(
        f"http://127.0.0.1:{port}{path}",
        headers={"authorization": f"Bearer {token}"},
        timeout=5,
        trust_env=False,
    )
    return r.status_code


def both_metric(stack: Stack, name: str, **labels: str) -> list[float]:
    return [metric(stack.metrics_text(i), name, **labels) for i in (0, 1)]


def test_a_caller_over_its_limit_gets_429_on_every_replica(shared: Stack) -> None:
    token = shared.mint(scp="Orders.Read", oid=new_user())
    allowed = 0
    for _ in range(12):
        status = shared.request("GET", QUOTA, token=token).status
        assert status in (200, 429)
        allowed += status == 200
        if status == 429:
            break
    assert 3 <= allowed <= 6  # the limit, plus at most one sync's worth per replica
    wait_until(
        lambda: direct(shared, 0, QUOTA, token) == 429 and direct(shared, 1, QUOTA, token) == 429,
        10,
        "both replicas limiting the caller",
    )
    before = both_metric(shared, "authz_checks_total", route="quota", code="rate_limited")
    assert {shared.request("GET", QUOTA, token=token).status for _ in range(30)} == {429}
    after = both_metric(shared, "authz_checks_total", route="quota", code="rate_limited")
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    other = shared.mint(scp="Orders.Read", oid=new_user())
    assert shared.request("GET", QUOTA, token=other).status == 200


def test_a_limit_resets_after_its_period(shared: Stack) -> None:
    token = shared.mint(scp="Orders.Read", oid=new_user())
    path = "/orders/burst/x"
    statuses = [shared.request("GET", path, token=token).status for _ in range(8)]
    assert statuses.count(200) >= 2
    assert 429 in statuses
    # two periods without requests: nothing is left in the sliding window
    wait_until(lambda: shared.request("GET", path, token=token).status == 200, 10, "a reset")


def test_the_overshoot_of_a_burst_stays_within_the_reported_bound(shared: Stack) -> None:
    token = shared.mint(scp="Orders.Read", oid=new_user())
    limit, total, threads = 20, 120, 8
    results: list[int] = []
    lock = threading.Lock()

    def fire(n: int) -> None:
        for _ in range(n):
            status = shared.request("GET", MEASURE, token=token).status
            with lock:
                results.append(status)

    workers = [threading.Thread(target=fire, args=(total // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert set(results) <= {200, 429}
    allowed = results.count(200)
    # every replica reports the most increments one counter held between two syncs: the sum is
    # the bound on what can be admitted beyond the limit
    bound = sum(both_metric(shared, "authz_ratelimit_max_unsynced_increments"))
    print(f"\novershoot: {allowed} allowed of limit {limit} (bound {limit} + {bound:.0f})")
    Path(shared.workdir / "overshoot.json").write_text(
        json.dumps({"limit": limit, "allowed": allowed, "bound": bound, "sent": total})
    )
    assert limit <= allowed <= limit + bound


def test_redis_outage_local_limits_then_convergence(shared: Stack) -> None:
    assert shared.redis_server is not None
    assert both_metric(shared, "authz_redis_up") == [1.0, 1.0]
    shared.redis_server.stop()
    try:
        wait_until(
            lambda: both_metric(shared, "authz_redis_up") == [0.0, 0.0], 15, "redis_up 0 on both"
        )
        # every check is still answered by authz itself (a 503 would be Envoy's status_on_error:
        # a check over its 0.25 s budget); local limits apply: each replica counts alone
        token = shared.mint(scp="Orders.Read", oid=new_user())
        statuses = [shared.request("GET", QUOTA, token=token).status for _ in range(20)]
        assert set(statuses) == {200, 429}, statuses
        assert 3 <= statuses.count(200) <= 6
        # a caller that uses both replicas during the outage: 11 + 11, each under its 20 alone
        split = shared.mint(scp="Orders.Read", oid=new_user())
        assert [direct(shared, r, MEASURE, split) for r in (0, 1) * 11] == [200] * 22
        assert min(both_metric(shared, "authz_redis_errors_total")) >= 1
    finally:
        shared.redis_server.start()  # same port, empty
    wait_until(
        lambda: both_metric(shared, "authz_redis_up") == [1.0, 1.0], 30, "redis_up 1 on both"
    )
    # the pending increments were pushed: Redis holds the caller's 22
    client = redis.Redis(port=shared.redis_server.port)
    link = RedisLink(RedisSettings(url=shared.redis_server.url))
    oid = json.loads(base64.urlsafe_b64decode(split.split(".")[1] + "=="))["oid"]
    window = int(time.time() // WEEK)
    key = redis_key(link, (("orders", "measure", "per-user", WEEK), oid, window))
    wait_until(lambda: int(client.get(key) or 0) == 22, 15, "the outage's counts in Redis")
    client.close()
    # each replica converges on it at the latest when it next counts the caller (its push of
    # that increment answers the shared total): what they admit meanwhile is within the bound
    admitted = 0
    for replica in (0, 1):
        for _ in range(25):
            status = direct(shared, replica, MEASURE, split)
            if status == 429:
                break
            admitted += 1
            time.sleep(0.1)  # let the sync push it (interval 0.05 s)
        assert status == 429, f"replica {replica} never saw the shared count"
    bound = sum(both_metric(shared, "authz_ratelimit_max_unsynced_increments"))
    assert admitted <= bound
    assert [direct(shared, r, MEASURE, split) for r in (0, 1)] == [429, 429]
