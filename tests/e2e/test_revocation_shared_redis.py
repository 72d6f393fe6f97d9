"""Revocation shared through a real Redis: two replicas (two ``authz serve`` processes) behind one
Envoy, one real redis-server, ``revocation.redis: true`` and no file. A rule added through one
replica's admin API, or with ``authz revoke add --config`` straight into Redis, denies the next
requests on the other replica (cached claims included); removing it restores them; the other
replica's propagation time is measured and printed (a bound is asserted, not a latency)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from authz.dev.stack import ADMIN_AUDIENCE, ADMIN_ROLE, Stack, stack_config
from tests.e2e.conftest import running

pytestmark = pytest.mark.e2e

SHARED = f"""\
revocation:
  redis: true
  redis_poll_interval_seconds: 0.2
  admin_api:
    enabled: true
    audiences: ["{ADMIN_AUDIENCE}"]
    issuers: [contoso]
    role: {ADMIN_ROLE}
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    text = stack_config("{instance}") + SHARED
    s = Stack(tmp_path_factory.mktemp("rev-shared"), config_text=text, redis=True, replicas=2)
    yield from running(s)


def check(stack: Stack, replica: int, token: str) -> tuple[int, str]:
    """A check straight at one replica's HTTP ext_authz port: (status, code)."""
    port = stack.ports["http" if replica == 0 else f"http{replica}"]
    r = httpx.get(
        f"http://127.0.0.1:{port}/orders/7",
        headers={"authorization": f"Bearer {token}"},
        timeout=5,
        trust_env=False,
    )
    code = r.json().get("code", "") if r.status_code >= 400 else ""
    return r.status_code, code


def until(
    stack: Stack, replica: int, token: str, want: tuple[int, str], limit_s: float = 10
) -> float:
    """Seconds until ``replica`` answers ``want`` for ``token`` (polled every 20 ms; bounded)."""
    start = time.monotonic()
    while True:
        got = check(stack, replica, token)
        took = time.monotonic() - start
        if got == want:
            return took
        assert took < limit_s, f"replica {replica} still answers {got}, not {want}"
        time.sleep(0.02)


REVOKED = (401, "token_revoked")


def test_admin_api_on_one_replica_revokes_on_the_other(shared: Stack) -> None:
    oid = str(uuid.uuid4())
    victim = shared.mint(scp="Orders.Read", oid=oid)
    assert check(shared, 0, victim) == (200, "")  # verified and cached on both replicas
    assert check(shared, 1, victim) == (200, "")
    url = f"{shared.admin_url}/admin/revocations"
    body = {"oid": oid, "expires_in": 600, "reason": "e2e: shared stolen token"}
    no_role = httpx.post(
        url,
        json=body,
        headers={"authorization": f"Bearer {shared.admin_token(roles=('Orders.Read.All',))}"},
        timeout=10,
        trust_env=False,
    )
    assert no_role.status_code == 403
    admin = {"authorization": f"Bearer {shared.admin_token(oid=str(uuid.uuid4()))}"}
    added = httpx.post(url, json=body, headers=admin, timeout=10, trust_env=False)
    assert added.status_code == 201, added.text
    rule = added.json()["rule"]
    assert rule["source"] == "redis"
    assert check(shared, 0, victim) == REVOKED  # the replica that took it: at once
    took = until(shared, 1, victim, REVOKED)
    print(f"\nrevocation reached the other replica in {took * 1000:.0f} ms (poll 200 ms)")
    # through Envoy too (either replica), and another user is unaffected
    assert shared.request("GET", "/orders/7", token=victim).status == 401
    other = shared.mint(scp="Orders.Read", oid=str(uuid.uuid4()))
    assert check(shared, 1, other) == (200, "")
    listed = httpx.get(url, headers=admin, timeout=10, trust_env=False).json()["rules"]
    assert [r["id"] for r in listed if r["source"] == "redis"] == [rule["id"]]
    gone = httpx.delete(f"{url}/{rule['id']}", headers=admin, timeout=10, trust_env=False)
    assert gone.status_code == 200, gone.text
    until(shared, 1, victim, (200, ""))
    audit = [json.loads(x) for x in shared.logs().splitlines() if '"revocation_added"' in x]
    assert any(e.get("source") == "redis" and e["rule"]["oid"] == oid for e in audit)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "authz", "revoke", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_cli_writes_redis_and_every_replica_enforces(shared: Stack) -> None:
    oid = str(uuid.uuid4())
    victim = shared.mint(scp="Orders.Read", oid=oid)
    assert check(shared, 0, victim) == (200, "")
    assert check(shared, 1, victim) == (200, "")
    config = str(shared.config_path)
    rule_id = "e2e-redis-cli"
    done = _cli("add", "--config", config, "--id", rule_id, "--oid", oid,
                "--expires-in", "1h", "--reason", "e2e: account disabled")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "to redis" in done.stdout
    times = [until(shared, r, victim, REVOKED) for r in (0, 1)]
    print(f"\nCLI rule in force on replicas after {[f'{t * 1000:.0f} ms' for t in times]}")
    listed = _cli("list", "--config", config, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)["rules"]] == [rule_id]
    assert _cli("remove", "--config", config, "nope").returncode == 1  # unknown id: refused
    done = _cli("remove", "--config", config, rule_id)
    assert done.returncode == 0, done.stderr
    for r in (0, 1):
        until(shared, r, victim, (200, ""))
    assert victim.split(".")[2] not in shared.logs()  # no token logged


def test_a_garbled_rule_in_redis_keeps_the_last_good_rules(shared: Stack) -> None:
    import redis

    assert shared.redis_server is not None
    oid = str(uuid.uuid4())
    victim = shared.mint(scp="Orders.Read", oid=oid)
    config = str(shared.config_path)
    done = _cli("add", "--config", config, "--id", "e2e-keep", "--oid", oid,
                "--expires-in", "1h", "--reason", "e2e: keep")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for r in (0, 1):
        until(shared, r, victim, REVOKED)
    client = redis.Redis.from_url(shared.redis_server.url)
    try:
        client.hset("authz:revocation:rules", "bad", "{not json")
        client.incr("authz:revocation:version")
        time.sleep(0.6)  # three polls: the garbled read is rejected whole
        assert check(shared, 1, victim) == REVOKED  # last good rules still in force
        assert 'result="invalid",source="redis"' in shared.metrics_text(1) or (
            'source="redis",result="invalid"' in shared.metrics_text(1)
        )
        client.hdel("authz:revocation:rules", "bad", "e2e-keep")
        client.incr("authz:revocation:version")
    finally:
        client.close()
    for r in (0, 1):
        until(shared, r, victim, (200, ""))
