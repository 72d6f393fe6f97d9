"""Audit log lines (valid JSON whatever the input, never the query), sampling, buffering, and the
redaction of anything token-shaped in the service's own logs."""

from __future__ import annotations

import io
import json
import logging

import pytest

from authz.observability import AuditLog, JsonFormatter, RedactFilter, outcome
from authz.policy.model import Decision, Principal, RequestAttrs, TokenKind

P = Principal(
    tid="t-1",
    oid="o-1",
    sub="s",
    client_id="c-1",
    kind=TokenKind.USER,
    version="2.0",
    issuer="i",
    audience="a",
    provider="p",
    expires_at=1,
    uti="uti-1",
)
ALLOW = Decision(
    allowed=True,
    status=200,
    code="ok",
    reason="r",
    decision_id="d1",
    api="orders",
    route="read",
    principal=P,
)
DENY = Decision(
    allowed=False, status=401, code="missing_token", reason="r", decision_id="d2", api="orders"
)
DRY = Decision(
    allowed=True, status=200, code="missing_role", reason="r", decision_id="d3", would_deny=True
)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_line_is_json_with_every_field_and_never_the_query() -> None:
    buf = io.StringIO()
    log = AuditLog(buf, clock=lambda: 1700000000.1234)
    attrs = RequestAttrs(method="GET", path='/a"b\n\u00e9?access_token=eyJsecret', request_id='r"1')
    log.record(attrs, ALLOW, 0.0000421)
    log.flush()
    assert "eyJsecret" not in buf.getvalue()
    assert lines(buf) == [
        {
            "ts": 1700000000.123,
            "log": "audit",
            "request_id": 'r"1',
            "decision_id": "d1",
            "api": "orders",
            "route": "read",
            "method": "GET",
            "path": '/a"b\n\u00e9',
            "decision": "allow",
            "would_deny": False,
            "status": 200,
            "code": "ok",
            "tid": "t-1",
            "oid": "o-1",
            "azp": "c-1",
            "uti": "uti-1",
            "latency_us": 42.1,
        }
    ]


@pytest.mark.parametrize(
    ("log_allows", "rate", "rand", "expected"),
    [(True, 1.0, 0.99, 3), (False, 1.0, 0.0, 2), (True, 0.5, 0.7, 2), (True, 0.5, 0.3, 3)],
    ids=["all", "denies-only", "sampled-out", "sampled-in"],
)
def test_denies_always_allows_sampled(
    log_allows: bool, rate: float, rand: float, expected: int
) -> None:
    buf = io.StringIO()
    log = AuditLog(buf, log_allows=log_allows, allow_sample_rate=rate, rand=lambda: rand)
    for d in (ALLOW, DENY, DRY):
        log.record(RequestAttrs(method="GET", path="/x"), d, 0.0)
    log.flush()
    got = lines(buf)
    assert len(got) == expected
    assert {"deny", "dry_run_deny"} <= {str(x["decision"]) for x in got}
    assert [outcome(d) for d in (ALLOW, DENY, DRY)] == ["allow", "deny", "dry_run_deny"]


def test_buffer_is_written_on_flush_or_when_large() -> None:
    buf = io.StringIO()
    log = AuditLog(buf)
    log.record(RequestAttrs(method="GET", path="/x"), DENY, 0.0)
    assert buf.getvalue() == ""
    log.flush()
    assert len(lines(buf)) == 1
    for _ in range(400):  # ~100 KiB: crosses the 64 KiB threshold without a flush
        log.record(RequestAttrs(method="GET", path="/" + "y" * 200), DENY, 0.0)
    assert len(buf.getvalue().splitlines()) > 1


def test_a_closed_stream_is_not_an_error() -> None:
    buf = io.StringIO()
    log = AuditLog(buf)
    log.record(RequestAttrs(method="GET", path="/x"), DENY, 0.0)
    buf.close()
    log.flush()  # must not raise


def test_redaction_and_json_formatter() -> None:
    record = logging.LogRecord(
        "authz.x", logging.INFO, __file__, 1, "got %s", ("eyJhbGciOi.eyJzdWIiOi.c2ln",), None
    )
    assert RedactFilter().filter(record)
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "got [redacted-token]"
    assert (out["level"], out["logger"]) == ("info", "authz.x")
