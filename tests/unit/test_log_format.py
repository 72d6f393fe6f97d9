"""The service's JSON log lines: RFC 3339 UTC timestamps (as in Envoy's access log) and the
worker index on every line a worker process writes."""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from authz.observability import JsonFormatter, configure_logging, rfc3339

RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1700000000.1234, "2023-11-14T22:13:20.123Z"),
        (1700000000.9999, "2023-11-14T22:13:20.999Z"),  # truncated, never rounded up
    ],
    ids=["epoch", "millis", "no-carry"],
)
def test_rfc3339(epoch: float, expected: str) -> None:
    assert rfc3339(epoch) == expected
    assert datetime.fromisoformat(expected).timestamp() == pytest.approx(epoch, abs=0.001)


def _record() -> logging.LogRecord:
    record = logging.LogRecord(
        "authz.keys", logging.WARNING, __file__, 1, "refresh failed", (), None
    )
    record.created = 1700000000.5
    return record


def test_line_has_an_rfc3339_timestamp_and_no_worker_outside_workers() -> None:
    out = json.loads(JsonFormatter().format(_record()))
    assert out["ts"] == "2023-11-14T22:13:20.500Z"
    assert RFC3339_MS.match(out["ts"])
    assert "worker" not in out


def test_worker_logging_stamps_every_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", worker=3)
    logging.getLogger("authz.test").info("one")
    logging.getLogger("authz.test").warning("two", extra={"issuer": "contoso"})
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["msg"], x["worker"]) for x in lines] == [("one", 3), ("two", 3)]
    assert all(RFC3339_MS.match(x["ts"]) for x in lines)
    assert lines[1]["issuer"] == "contoso"


def test_plain_worker_logs_name_the_worker(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", json_format=False, worker=1)
    logging.getLogger("authz.test").info("hello")
    assert capsys.readouterr().err == "[worker 1] hello\n"


AUTHZ = Path(__file__).resolve().parents[2] / "authz"


def _extra_keys_logged() -> dict[str, set[str]]:
    """Every key a module of authz/ passes to a logging call as a literal ``extra={...}``."""
    found: dict[str, set[str]] = {}
    for path in AUTHZ.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
                    keys = {k.value for k in kw.value.keys if isinstance(k, ast.Constant)}
                    found.setdefault(path.name, set()).update(str(k) for k in keys)
    return found


def test_every_extra_field_the_code_logs_is_kept() -> None:
    logged = _extra_keys_logged()
    # The HTTP transport's internal-error line is one of them (request_id, decision_id, method).
    assert {"request_id", "decision_id", "method", "error_type"} <= logged["http.py"]
    keys = set().union(*logged.values())
    record = _record()
    for key in keys:
        setattr(record, key, f"value-of-{key}")
    out = json.loads(JsonFormatter().format(record))
    assert {key: out.get(key) for key in keys} == {key: f"value-of-{key}" for key in keys}


def test_extra_fields_are_json_ready_and_redacted() -> None:
    logger = logging.getLogger("authz.test_extra")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
        logger.warning(
            "check failed",
            extra={"request_id": "r-1", "count": 3, "detail": f"bearer {token}", "gone": None},
        )
    finally:
        logger.removeHandler(handler)
    (line,) = lines
    out = json.loads(line)
    assert (out["msg"], out["request_id"], out["count"]) == ("check failed", "r-1", 3)
    assert "gone" not in out
    assert token not in line
    assert "eyJ" not in out["detail"]
