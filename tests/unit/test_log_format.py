"""The service's JSON log lines: RFC 3339 UTC timestamps (as in Envoy's access log) and the
worker index on every line a worker process writes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime

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
