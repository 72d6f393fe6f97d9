"""Rate limiting, the pure core (authz.policy.ratelimit) and through the engine: the sliding
window, keys from claims and the client address, Retry-After and the IETF RateLimit headers, the
429 body, dry-run, and the counter bookkeeping the Redis sync relies on. A settable clock; no
network."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import pytest

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.entra import TokenVerifier
from authz.observability import AuditLog
from authz.policy.errors import Code
from authz.policy.model import LimitKeyPart, LimitSpec, Principal, RequestAttrs, TokenKind
from authz.policy.ratelimit import Counters, _key_fn, client_ip, retry_after, sliding_estimate

WEEK = 7 * 86400
T0 = 1_699_747_200.0  # a multiple of every period used below (aligned on a week)

CONFIG = """
issuers:
  - {name: contoso, tenant: 11111111-1111-4111-8111-111111111111}
apis:
  - name: orders
    audiences: [api://orders]
    issuers: [contoso]
    match: {path_prefixes: [/orders]}
    rate_limits:
      - {name: per-tenant, key: tid, limit: 100, period: 1m}
    routes:
      - name: health
        path: /orders/healthz
        require: anonymous
        rate_limits:
          - {name: per-ip, key: ip, limit: 2, period: 60}
      - name: read
        path: "/orders/{id}"
        rate_limits:
          - {name: per-user, key: oid, limit: 3, period: 10s}
      - name: shadow
        path: /orders/shadow/x
        rate_limits:
          - {name: soft, key: [tid, azp], limit: 1, period: 1h, mode: dry-run}
      - name: trial
        path: /orders/trial/x
        mode: dry-run
        rate_limits:
          - {name: hard, key: sub, limit: 1, period: 1d}
      - name: open
        path_prefix: /orders/open
        require: anonymous
        rate_limits:
          - {name: per-app, key: appid, limit: 1, period: 60}
"""
for _line in ("      - name: read\n", "      - name: shadow\n", "      - name: trial\n"):
    CONFIG = CONFIG.replace(_line, _line + "        require: authenticated\n")


class World:
    def __init__(self, env: SimpleNamespace, memory_keys: Any, minter: Any) -> None:
        self.now = [T0]
        self.counters = Counters()
        self.settings = authz_config.parse(CONFIG, env={})
        verifier = TokenVerifier(
            self.settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW)
        )
        self.engine = Engine(
            self.settings, verifier, counters=self.counters, clock=lambda: self.now[0]
        )
        self.minter = minter

    def token(self, **claims: Any) -> str:
        return str(self.minter.token(aud="api://orders", **claims))

    def check(self, path: str, token: str | None = None, ip: str = "10.0.0.1") -> Any:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return self.engine.check(
            RequestAttrs(method="GET", path=path, headers=headers, source_address=ip)
        )


@pytest.fixture
def w(env: SimpleNamespace, memory_keys: Any, minter: Any) -> World:
    return World(env, memory_keys, minter)


# ------------------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize(
    ("prev", "cur", "offset", "expected"),
    [(0, 0, 0.0, 0.0), (10, 0, 0.0, 10.0), (10, 2, 5.0, 7.0), (10, 2, 9.999, 2.001), (0, 4, 3, 4)],
    ids=["empty", "window-start", "half-way", "almost-over", "current-only"],
)
def test_sliding_estimate(prev: int, cur: int, offset: float, expected: float) -> None:
    assert sliding_estimate(prev, cur, offset, 10) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prev", "cur", "offset", "expected"),
    [
        (0, 3, 2.0, 8 + 4),  # next window: 3 * (1 - x/10) <= 2 -> x = 3.33 -> 8 + 3.33 -> 12
        (0, 3, 9.5, 4),  # 0.5 s to the boundary, then 3.33 s -> 4 (ceil)
        (3, 0, 0.0, 4),  # previous window decays: 3 * (1 - t/10) <= 2 -> t = 3.33 -> 4
        (4, 1, 5.0, 3),  # 4 * (1 - t/10) + 1 <= 2 -> t = 7.5, i.e. 2.5 s from now -> 3
        (0, 1, 0.0, 20),  # limit 1: the estimate reaches 0 at the end of the next window
        (0, 2, 3.0, 1),  # room left now (only the throttled request itself was over): 1 s
    ],
    ids=["next-window", "near-boundary", "previous-decays", "mixed", "limit-one", "room-now"],
)
def test_retry_after(prev: int, cur: int, offset: float, expected: int) -> None:
    limit = 1 if (prev, cur) == (0, 1) else 3
    got = retry_after(prev, cur, offset, 10, limit)

    # the promise Retry-After makes: after `got` seconds one more request fits, and not before
    # (to the second: `got - 1` seconds is too early)
    def estimate_at(t: float) -> float:
        at = offset + t
        if at < 10:
            return sliding_estimate(prev, cur, at, 10)
        return sliding_estimate(cur, 0, at - 10, 10)

    assert estimate_at(got) + 1 <= limit + 1e-9
    assert got == 1 or estimate_at(got - 1) + 1 > limit
    assert got == expected


ALICE_OID = "alice-oid"
KEYED = [
    ("ip", ("ip",), True, "10.0.0.1"),
    ("ip-anonymous", ("ip",), False, "10.0.0.1"),
    ("oid", ("oid",), True, ALICE_OID),
    ("oid-anonymous", ("oid",), False, None),
    ("ip+oid", ("ip", "oid"), True, "10.0.0.1\x1falice-oid"),
    ("oid+ip", ("oid", "ip"), True, "alice-oid\x1f10.0.0.1"),
    ("ip+oid-anonymous", ("ip", "oid"), False, None),
]


@pytest.mark.parametrize(
    ("key", "identified", "expected"), [k[1:] for k in KEYED], ids=[k[0] for k in KEYED]
)
def test_a_limit_key_joins_its_parts_and_a_claim_needs_an_identity(
    key: tuple[LimitKeyPart, ...], identified: bool, expected: str | None
) -> None:
    """Each limit's key function (built once): the client address and claims joined with a
    separator no claim holds; a key naming a claim does not apply without a verified identity."""
    fn = _key_fn(LimitSpec(name="x", key=key, limit=1, period_s=60))
    who = Principal(
        tid="t",
        oid=ALICE_OID,
        sub="s",
        client_id="c",
        kind=TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider="p",
        expires_at=0,
    )
    attrs = RequestAttrs(method="GET", path="/", host="h", headers={}, source_address="10.0.0.1")
    assert fn(who if identified else None, attrs) == expected


def test_client_ip_prefers_the_peer_then_the_envoy_header_then_one_shared_bucket() -> None:
    hdr = {"x-authz-client-ip": "192.0.2.7"}
    assert client_ip(RequestAttrs("GET", "/", source_address="10.1.1.1", headers=hdr)) == "10.1.1.1"
    assert client_ip(RequestAttrs("GET", "/", headers=hdr)) == "192.0.2.7"
    assert client_ip(RequestAttrs("GET", "/")) == "-"


# --------------------------------------------------------------------------- the engine


def test_over_the_limit_is_a_429_with_retry_after_and_ratelimit_headers(w: World) -> None:
    token = w.token()
    assert [w.check("/orders/1", token).status for _ in range(3)] == [200, 200, 200]
    d = w.check("/orders/1", token)
    assert (d.allowed, d.status, d.code) == (False, 429, Code.RATE_LIMITED)
    assert (d.api, d.route) == ("orders", "read")
    headers = dict(d.response_headers)
    assert headers == {
        "retry-after": "14",  # next window, 3 * (1 - x/10) <= 2: x = 3.33 -> 10 + 4
        "ratelimit-policy": '"per-user";q=3;w=10',
        "ratelimit": '"per-user";r=0;t=14',
        "content-type": "application/json",
    }
    assert json.loads(d.body) == {"error": "rate_limited", "code": "rate_limited", "request_id": ""}
    assert "www-authenticate" not in headers
    assert d.metadata["oid"] == d.principal.oid if d.principal else False
    assert w.counters.limited == {("orders", "read", "per-user", "enforce"): 1}


def test_denied_requests_are_not_counted_and_the_limit_slides_back(w: World) -> None:
    token = w.token()
    for _ in range(3):
        w.check("/orders/1", token)
    for _ in range(5):
        assert w.check("/orders/1", token).status == 429
    w.now[0] = T0 + 10  # next window: the previous 3 weigh fully at its start
    assert w.check("/orders/1", token).status == 429
    w.now[0] = T0 + 14  # 3 * 0.6 = 1.8 -> one more fits (1.8 + 1 <= 3)
    assert w.check("/orders/1", token).status == 200
    w.now[0] = T0 + 30  # two periods later nothing is left
    assert [w.check("/orders/1", token).status for _ in range(3)] == [200] * 3


def test_another_caller_has_its_own_budget(w: World, env: SimpleNamespace) -> None:
    first, other = w.token(), w.token(oid="77777777-7777-4777-8777-777777777777")
    for _ in range(4):
        w.check("/orders/1", first)
    assert w.check("/orders/1", first).status == 429
    assert w.check("/orders/1", other).status == 200


def test_an_api_wide_limit_counts_across_routes_and_a_denial_consumes_nothing(
    w: World, env: SimpleNamespace
) -> None:
    settings = authz_config.parse(
        CONFIG.replace("limit: 100, period: 1m", "limit: 4, period: 1m"), env={}
    )
    w.engine = Engine(settings, w.engine._verifier, counters=w.counters, clock=lambda: w.now[0])
    token = w.token()
    got = [w.check("/orders/1", token).status for _ in range(4)]  # per-user (3) limits first
    assert got == [200, 200, 200, 429]
    assert w.check("/orders/shadow/x", token).status == 200  # 4th of the API's 4
    d = w.check("/orders/shadow/x", token)
    assert (d.status, dict(d.response_headers)["ratelimit-policy"]) == (
        429,
        '"per-tenant";q=4;w=60',
    )
    # the per-user denial above did not take one of the tenant's four
    tenant = (("orders", "", "per-tenant", 60), env.TENANT, int(T0 // 60))
    assert w.counters.count(tenant) == 4


def test_a_dry_run_limit_allows_counts_and_reports(w: World) -> None:
    token = w.token()
    assert w.check("/orders/shadow/x", token).code == Code.OK
    d = w.check("/orders/shadow/x", token)
    assert (d.allowed, d.would_deny, d.status, d.code) == (True, True, 200, Code.RATE_LIMITED)
    assert d.metadata["code"] == "rate_limited"
    assert w.counters.limited == {("orders", "shadow", "soft", "dry-run"): 1}


def test_a_dry_run_route_never_enforces_its_limits(w: World) -> None:
    token = w.token()
    statuses = [(d.status, d.code) for d in (w.check("/orders/trial/x", token) for _ in range(3))]
    assert statuses == [(200, "ok"), (200, "rate_limited"), (200, "rate_limited")]
    assert w.counters.limited == {("orders", "trial", "hard", "dry-run"): 2}


def test_anonymous_routes_limit_by_client_address(w: World) -> None:
    assert [w.check("/orders/healthz", ip="10.0.0.9").status for _ in range(3)] == [200, 200, 429]
    assert w.check("/orders/healthz", ip="10.0.0.10").status == 200


def test_a_claim_keyed_limit_skips_requests_without_identity(w: World) -> None:
    assert [w.check("/orders/open/1").status for _ in range(3)] == [200, 200, 200]
    token = w.token()
    assert [w.check("/orders/open/1", token).status for _ in range(2)] == [200, 429]


def test_rejected_requests_never_reach_the_limiter(w: World) -> None:
    for _ in range(5):
        assert w.check("/orders/1").status == 401  # no token: identity fails first
    assert len(w.counters) == 0


def test_counts_survive_a_new_engine_over_the_same_counters(
    w: World, env: SimpleNamespace, memory_keys: Any
) -> None:
    token = w.token()
    for _ in range(3):
        w.check("/orders/1", token)
    verifier = TokenVerifier(
        w.settings.tokens, env.ISSUERS, memory_keys, clock=lambda: float(env.NOW)
    )
    reloaded = Engine(w.settings, verifier, counters=w.counters, clock=lambda: w.now[0])
    d = reloaded.check(
        RequestAttrs("GET", "/orders/1", headers={"authorization": f"Bearer {token}"})
    )
    assert d.status == 429


def test_no_limits_configured_means_no_limiter(env: SimpleNamespace, memory_keys: Any) -> None:
    settings = authz_config.parse(CONFIG.split("    rate_limits:")[0] + "    routes: []\n", env={})
    verifier = TokenVerifier(settings.tokens, env.ISSUERS, memory_keys)
    assert Engine(settings, verifier).limiter is None


# ------------------------------------------------------------ counters: the sync's contract


KEY = (("orders", "read", "per-user", 10), "u1", 5)


def test_pending_goes_in_flight_and_settles_on_the_global_total() -> None:
    c = Counters()
    for _ in range(3):
        c.hit(KEY)
    pending, new = c.take_pending()
    assert (pending, new) == ([(KEY, 3)], [KEY])
    c.hit(KEY)  # while the push is in flight
    assert c.count(KEY) == 4
    c.settle(KEY, 3, 10)  # Redis: 10 in all (7 from other replicas)
    assert c.count(KEY) == 11
    assert c.take_pending() == ([(KEY, 1)], [])


def test_nothing_pending_pushes_nothing() -> None:
    c = Counters()
    c.hit(KEY)
    c.take_pending()
    c.restore(KEY, 0)  # a failed push of nothing: the key is looked at, no zero increment sent
    assert c.take_pending() == ([], [])
    assert c.count(KEY) == 1


def test_a_failed_push_is_pending_again_and_the_previous_window_asked_again() -> None:
    c = Counters()
    c.hit(KEY)
    _, new = c.take_pending()
    c.restore(KEY, 1)
    c.renew(new)
    assert c.take_pending() == ([(KEY, 1)], [KEY])


def test_an_emptied_redis_never_lowers_what_we_know() -> None:
    c = Counters()
    c.hit(KEY)
    c.take_pending()
    c.settle(KEY, 1, 50)
    c.hit(KEY)
    c.take_pending()
    c.settle(KEY, 1, 1)  # Redis restarted empty: it only knows our last increment
    assert c.count(KEY) == 51  # what we knew, plus that increment


def test_observed_previous_windows_and_pruning() -> None:
    c = Counters()
    prev = (KEY[0], "u1", 4)
    c.observe(prev, 7)
    c.observe(prev, 5)
    assert c.count(prev) == 7
    c.hit(KEY)
    assert c.prune(now=6 * 10) == 1  # window 6 now: window 4 is over, window 5 is the previous
    assert c.count(prev) == 0
    assert c.count(KEY) == 1
    c.settle(prev, 1, 3)  # settling a pruned window is a no-op
    c.restore(prev, 1)
    assert len(c) == 1


# -------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("limit", "problem"),
    [
        ("{name: x, key: email, limit: 1, period: 1m}", "rate_limits[0].key: expected one or"),
        ("{name: x, key: [oid, oid], limit: 1, period: 1m}", "a key part is repeated"),
        ("{name: x, key: [azp, appid], limit: 1, period: 1m}", "a key part is repeated"),
        ("{name: x, key: [], limit: 1, period: 1m}", "expected one or a list"),
        ("{name: x, key: oid, limit: 0, period: 1m}", "rate_limits[0].limit"),
        ("{name: x, key: oid, limit: 1, period: 1w}", "expected seconds or a duration"),
        ("{name: x, key: oid, limit: 1, period: 32d}", "a period is 1 second to 31 days"),
        ("{name: x, key: oid, limit: 1, period: 0}", "a period is 1 second to 31 days"),
        ("{name: X Y, key: oid, limit: 1, period: 1}", "rate_limits[0].name"),
        ("{name: x, key: oid, limit: 1}", "rate_limits[0].period: required key is missing"),
    ],
    ids=[
        "unknown-key",
        "repeated",
        "alias-repeated",
        "empty",
        "zero",
        "unit",
        "too-long",
        "zero-period",
        "bad-name",
        "missing-period",
    ],
)
def test_bad_limits_are_rejected_with_their_key_path(limit: str, problem: str) -> None:
    text = CONFIG.replace("{name: per-tenant, key: tid, limit: 100, period: 1m}", limit)
    with pytest.raises(authz_config.ConfigError) as info:
        authz_config.parse(text, env={})
    assert any(
        p.startswith("apis[0].rate_limits[0]") and problem in p for p in info.value.problems
    ), info.value.problems


def test_duplicate_limit_names_are_rejected() -> None:
    text = CONFIG.replace(
        "          - {name: per-user, key: oid, limit: 3, period: 10s}",
        "          - {name: per-user, key: oid, limit: 3, period: 10s}\n"
        "          - {name: per-user, key: ip, limit: 3, period: 10s}",
    )
    with pytest.raises(authz_config.ConfigError) as info:
        authz_config.parse(text, env={})
    assert "apis[0].routes[1].rate_limits[1].name: duplicate rate limit name 'per-user'" in (
        info.value.problems
    )


def test_periods_and_key_aliases_compile() -> None:
    s = authz_config.parse(CONFIG, env={})
    api = s.apis[0]
    assert [(x.name, x.key, x.limit, x.period_s) for x in api.rate_limits] == [
        ("per-tenant", ("tid",), 100, 60)
    ]
    by_route = {r.name: r.rate_limits for r in api.routes}
    assert by_route["shadow"][0].key == ("tid", "azp")
    assert by_route["trial"][0].period_s == 86400
    assert by_route["open"][0].key == ("azp",)
    assert by_route["health"][0].period_s == 60


def test_unshared_counters_keep_no_sync_bookkeeping() -> None:
    c = Counters(shared=False)
    c.hit(KEY)
    c.hit(KEY)
    assert c.count(KEY) == 2
    assert c.take_pending() == ([], [])


def test_the_limit_name_reaches_metadata_and_the_audit_line(w: World) -> None:
    token = w.token()
    for _ in range(3):
        w.check("/orders/1", token)
    d = w.check("/orders/1", token)
    assert d.metadata["rate_limit"] == "per-user"
    out = io.StringIO()
    audit = AuditLog(out)
    audit.record(RequestAttrs("GET", "/orders/1"), d, 0.0001)
    audit.flush()
    line = json.loads(out.getvalue())
    assert (line["code"], line["rate_limit"]) == ("rate_limited", "per-user")
    ok = w.check("/orders/2", w.token(oid="88888888-8888-4888-8888-888888888888"))
    assert "rate_limit" not in ok.metadata
