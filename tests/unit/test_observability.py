"""Audit log lines (valid JSON whatever the input, never the query), sampling, buffering, and the
redaction of anything token-shaped in the service's own logs."""

from __future__ import annotations

import gc
import io
import json
import logging

import prometheus_client as prom
import pytest

from authz.observability import AuditLog, GcPauses, JsonFormatter, Metrics, RedactFilter, outcome
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
            "actor": "human",
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


# --------------------------------------------- bounded, redacted client fields (issue 11, #15)

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4IiwidGlkIjoieSJ9.c2lnbmF0dXJlLWJ5dGVz"
OPAQUE_JWS = "QWxhZGRpbjpvcGVuIHNlc2FtZQ.c2VjcmV0LXBheWxvYWQtYnl0ZXM.c2lnbmF0dXJlLWJ5dGVzLTEyMw"
SECRETS = (JWT, OPAQUE_JWS, "opaque-bearer-credential-42", "c2lnbmF0dXJlLWJ5dGVz")


def _one_line(attrs: RequestAttrs, d: Decision = DENY) -> tuple[str, dict[str, object]]:
    buf = io.StringIO()
    log = AuditLog(buf)
    log.record(attrs, d, 0.0)
    log.flush()
    text = buf.getvalue()
    assert text.count("\n") == 1
    return text, json.loads(text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"/orders#access_token={JWT}", "/orders"),
        (f"/orders#frag?x={JWT}", "/orders"),
        (f"/orders?x=1#access_token={JWT}", "/orders"),
        (f"/files/{JWT}/x", "/files/[redacted-token]/x"),
        (f"/files/{OPAQUE_JWS}", "/files/[redacted-token]"),
        ("/auth/Bearer%20opaque-bearer-credential-42", "/auth/[redacted-token]"),
        ("/files/report.2024.pdf", "/files/report.2024.pdf"),
    ],
    ids=["fragment", "fragment-then-query", "query-then-fragment", "jwt", "jws", "bearer", "dots"],
)
def test_audit_path_never_carries_a_fragment_or_a_token(raw: str, expected: str) -> None:
    text, line = _one_line(RequestAttrs(method="GET", path=raw))
    assert line["path"] == expected
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize(
    "value",
    [
        JWT,
        f"Bearer {JWT}",
        "Bearer opaque-bearer-credential-42",
        "bEaReR opaque-bearer-credential-42",
    ],
    ids=["jwt", "bearer-jwt", "bearer-opaque", "mixed-case-bearer"],
)
def test_token_shaped_request_ids_are_redacted(value: str) -> None:
    text, line = _one_line(RequestAttrs(method="GET", path="/x", request_id=f"id {value}"))
    assert line["request_id"] == "id [redacted-token]"
    for secret in SECRETS:
        assert secret not in text


def test_every_client_supplied_field_is_bounded() -> None:
    huge = "A" * 100_000
    who = Principal(
        tid=huge,
        oid=huge,
        sub="s",
        client_id=huge,
        kind=TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider="p",
        expires_at=1,
        uti=huge,
    )
    d = Decision(
        allowed=False, status=403, code="missing_role", reason="r", decision_id="d", principal=who
    )
    attrs = RequestAttrs(method=huge, path="/" + huge, request_id=huge)
    text, line = _one_line(attrs, d)
    limits = {"request_id": 128, "method": 16, "path": 512, "tid": 128, "oid": 128, "azp": 128}
    for field_name, limit in {**limits, "uti": 128}.items():
        assert len(str(line[field_name])) == limit, field_name
    assert len(text) < 2048


def test_token_in_a_principal_field_is_redacted() -> None:
    who = Principal(
        tid="t",
        oid="o",
        sub="s",
        client_id="c",
        kind=TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider="p",
        expires_at=1,
        uti=JWT,
    )
    d = Decision(allowed=True, status=200, code="ok", reason="r", decision_id="d", principal=who)
    text, line = _one_line(RequestAttrs(method="GET", path="/x"), d)
    assert line["uti"] == "[redacted-token]"
    assert JWT not in text


def _who(oid: str, uti: str = "u") -> Principal:
    return Principal(
        tid="t",
        oid=oid,
        sub="s",
        client_id="c",
        kind=TokenKind.USER,
        version="2.0",
        issuer="i",
        audience="a",
        provider="p",
        expires_at=1,
        uti=uti,
    )


def test_repeat_lines_of_different_callers_never_mix() -> None:
    # The per-caller stretch of the line is encoded once and reused: every line must still be
    # its own caller's and decision's, in any order, and the same as a fresh log writes it.
    alice, bob = _who("alice"), _who("bob", uti=JWT)
    decisions = [
        Decision(
            allowed=True, status=200, code="ok", reason="r", decision_id="d1", principal=alice
        ),
        Decision(allowed=True, status=200, code="ok", reason="r", decision_id="d2", principal=bob),
        Decision(
            allowed=False,
            status=403,
            code="missing_role",
            reason="r",
            decision_id="d3",
            principal=alice,
        ),
        DRY,
    ]
    buf = io.StringIO()
    log = AuditLog(buf, clock=lambda: 1.0)
    for d in [*decisions, *reversed(decisions), *decisions]:
        log.record(RequestAttrs(method="GET", path="/x", request_id=d.decision_id), d, 1e-6)
    log.flush()
    got = lines(buf)
    for d, line in zip([*decisions, *reversed(decisions), *decisions], got, strict=True):
        fresh = io.StringIO()
        fresh_log = AuditLog(fresh, clock=lambda: 1.0)
        fresh_log.record(RequestAttrs(method="GET", path="/x", request_id=d.decision_id), d, 1e-6)
        fresh_log.flush()
        assert line == json.loads(fresh.getvalue())
        assert line["decision_id"] == d.decision_id
        assert line["oid"] == (d.principal.oid if d.principal else "")
    assert JWT not in buf.getvalue()


def test_cached_line_stretches_are_bounded() -> None:
    from authz.observability import _SEGMENTS_MAX

    buf = io.StringIO()
    log = AuditLog(buf)
    for i in range(_SEGMENTS_MAX + 10):
        d = Decision(
            allowed=False, status=403, code="c", reason="r", decision_id="d", principal=_who(f"{i}")
        )
        log.record(RequestAttrs(method="GET", path="/x"), d, 1e-6)
        assert len(log._segments) <= _SEGMENTS_MAX
    log.flush()
    assert [line["oid"] for line in lines(buf)] == [str(i) for i in range(_SEGMENTS_MAX + 10)]
    # full: the oldest stretches went one by one, not all at once (a bulk free skews the GC)
    assert len(log._segments) == _SEGMENTS_MAX
    assert {key[8] for key in log._segments} == {str(i) for i in range(10, _SEGMENTS_MAX + 10)}


def test_gc_pauses_are_counted_per_generation() -> None:
    registry = prom.CollectorRegistry()
    pauses = GcPauses(Metrics(registry).gc_pause)

    def count(generation: int) -> float:
        value = registry.get_sample_value(
            "authz_gc_pause_seconds_count", {"generation": str(generation)}
        )
        return value or 0.0

    pauses.install()
    pauses.install()  # once only
    try:
        assert gc.callbacks.count(pauses) == 1
        before = [count(g) for g in range(3)]
        gc.collect(0)
        gc.collect(2)
        assert count(2) == before[2]  # the callback itself takes no metric lock
        pauses.flush()
        assert count(0) >= before[0] + 1
        assert count(2) >= before[2] + 1
    finally:
        pauses.uninstall()
        pauses.uninstall()  # not installed: nothing to do
    assert pauses not in gc.callbacks
    after = count(2)
    gc.collect(2)
    pauses.flush()
    assert count(2) == after  # uninstalled: no longer observed
