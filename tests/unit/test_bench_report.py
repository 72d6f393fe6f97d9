"""The benchmark's report: the aims table reads the measured figures and judges each aim."""

from __future__ import annotations

from typing import Any

from bench.__main__ import aims, median_round, report


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
