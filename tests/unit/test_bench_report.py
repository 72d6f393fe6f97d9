"""The benchmark's report: the aims table reads the measured figures and judges each aim."""

from __future__ import annotations

from typing import Any

from bench import wrk
from bench.__main__ import _gc_delta, aims, median_round, report


def mode(name: str, rps: float, authz_us: float | None) -> dict[str, Any]:
    return {
        "mode": name,
        "rps": rps,
        "authz_us": authz_us,
        "envoy_us": 100.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "non_2xx": 0,
        "steal_pct": 0.0,
    }


RESULT: dict[str, Any] = {
    "meta": {"when": "now", "machine": "test", "duration": 1.0},
    "inprocess": {
        "raw_rsa_verify_us": 20.0,
        "cold_verify_us": 38.0,
        "cached_verify_us": 2.0,
        "route_match_us": 1.0,
        "engine_check_cached_us": 10.0,
        "cold_over_raw": 1.9,
        "cached_over_raw": 0.1,
    },
    "modes": [
        mode("native jwt_authn + RBAC", 6000, None),
        mode("gRPC floor (grpc.aio, does nothing)", 4000, 200.0),
        mode("HTTP floor (our HTTP server, constant allow)", 8000, 30.0),
        mode("entra-authz gRPC", 2500, 400.0),
        mode("entra-authz HTTP", 6600, 45.0),
    ],
}


def test_aims_are_judged_from_the_measured_figures() -> None:
    rows = {line.split(" | ")[0].lstrip("| "): line for line in aims(RESULT)[4:] if line}
    assert rows["cold check in-process <= 2x raw RSA verify"].endswith("| 1.90x | yes |")
    assert rows["HTTP: Python CPU per cached check <= 50 µs"].endswith("| 45 µs | yes |")
    assert rows["HTTP: throughput >= 1.0x native jwt_authn+RBAC"].endswith(
        "| 6600 vs 6000 req/s (1.10x) | yes |"
    )
    assert rows["gRPC: CPU per check <= 1.1x the do-nothing grpc.aio server"].endswith(
        "| 400 vs 200 µs (2.00x) | no |"
    )
    assert "(1.50x)" in rows["(HTTP: ours vs our transport with a constant answer)"]


def test_the_median_round_stands_for_a_mode_with_the_spread_of_all() -> None:
    rounds = [mode("m", 5000, 60.0), mode("m", 7000, 90.0), mode("m", 6000, 70.0)]
    row = median_round(rounds)
    assert (row["rps"], row["authz_us"]) == (6000, 70.0)
    assert row["rps_range"] == (5000, 7000)
    assert row["authz_us_range"] == (60.0, 90.0)
    line = next(line for line in report({**RESULT, "modes": [row]}).splitlines() if "| m |" in line)
    assert "6000 [5000-7000]" in line
    assert "70 [60-90]" in line


def test_report_includes_the_aims_and_tolerates_missing_parts() -> None:
    text = report(RESULT)
    assert "### Against the aims (this run" in text
    assert "| entra-authz HTTP | 6600 | 1.10 |" in text
    assert aims({"meta": RESULT["meta"]}) == []


def users_mode(name: str, tokens: int, p99: float) -> dict[str, Any]:
    return {
        **mode(name, 3000, None if name.startswith("native") else 100.0),
        "tokens": tokens,
        "p99_ms": p99,
        "max_ms": 3 * p99,
        "cache_hit_pct": None if name.startswith("native") else 0.0,
        "gc2_count": None if name.startswith("native") else 0.0,
        "gc2_ms": 0.0,
        "gc_max_ms": 5.0,
    }


USERS: dict[str, Any] = {
    "cache_max": 10_000,
    "many": 20_000,
    "few": 5_000,
    "rounds": 3,
    "modes": [
        users_mode("native jwt_authn + RBAC, 1 token", 1, 8.0),
        users_mode("native jwt_authn + RBAC, 20000 tokens", 20_000, 10.0),
        users_mode("entra-authz HTTP, 1 token", 1, 12.0),
        users_mode("entra-authz HTTP, 20000 tokens", 20_000, 18.0),
        users_mode("entra-authz gRPC, 1 token", 1, 30.0),
        users_mode("entra-authz gRPC, 20000 tokens", 20_000, 70.0),
    ],
}


def test_many_users_aims_compare_p99_with_one_token_and_with_native() -> None:
    rows = {line.split(" | ")[0].lstrip("| "): line for line in aims({"users": USERS})[4:] if line}
    assert rows["HTTP: p99 with 20000 users <= 2x p99 with one token"].endswith(
        "| 18.00 vs 12.00 ms (1.50x) | yes |"
    )
    assert rows["HTTP: p99 with 20000 users <= 2x native's p99 (same tokens)"].endswith(
        "| 18.00 vs 10.00 ms (1.80x) | yes |"
    )
    assert rows["gRPC: p99 with 20000 users <= 2x p99 with one token"].endswith("(2.33x) | no |")
    text = report({**RESULT, "users": USERS})
    assert "### (e) Many users" in text
    assert "| entra-authz HTTP, 20000 tokens | 0 % | 3000 |" in text


def test_gc_and_cache_figures_come_from_the_metric_deltas() -> None:
    g2 = 'generation="2"'
    before = {
        f"authz_gc_pause_seconds_count{{{g2}}}": 1.0,
        f"authz_gc_pause_seconds_sum{{{g2}}}": 0.01,
        f'authz_gc_pause_seconds_bucket{{{g2},le="0.025"}}': 1.0,
        f'authz_gc_pause_seconds_bucket{{{g2},le="0.05"}}': 1.0,
        "authz_token_cache_hits_total": 10.0,
        "authz_token_cache_misses_total": 0.0,
    }
    after = {
        **before,
        f"authz_gc_pause_seconds_count{{{g2}}}": 3.0,
        f"authz_gc_pause_seconds_sum{{{g2}}}": 0.07,
        f'authz_gc_pause_seconds_bucket{{{g2},le="0.025"}}': 2.0,  # one new pause <= 25 ms
        f'authz_gc_pause_seconds_bucket{{{g2},le="0.05"}}': 3.0,  # and one in (25, 50] ms
        "authz_token_cache_hits_total": 10.0,
        "authz_token_cache_misses_total": 30.0,
    }
    d = _gc_delta(before, after)
    assert d["gc2_count"] == 2
    assert round(d["gc2_ms"], 6) == 60.0
    assert d["gc_max_ms"] == 50.0
    assert d["cache_hit_pct"] == 0.0
    assert d["gc0_count"] == 0


def test_wrk_reports_the_slowest_request() -> None:
    out = (
        "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
        "    Latency     1.93ms  807.23us  24.45ms   89.01%\n"
        "  Latency Distribution\n     50%    1.80ms\n     99%    4.10ms\n"
        "  1000 requests in 1.00s, 1.00MB read\nRequests/sec:   1000.00\n"
    )
    r = wrk.parse(out, 1.0)
    assert (r.max_ms, r.p99_ms, r.requests) == (24.45, 4.1, 1000)
