"""``describe_fetch_error``: the cause a failed key fetch is logged with, read from the whole
exception chain (pure: exceptions built here, no connection made; the real failures, TLS and
proxies, are tests/integration/test_fetch.py)."""

from __future__ import annotations

import itertools

import pytest

from authz.identity.fetch import MAX_DESCRIPTION, describe_fetch_error


def chain(*excs: BaseException) -> BaseException:
    """``excs[0]`` raised from ``excs[1]``, raised from ``excs[2]``, ..."""
    for outer, inner in itertools.pairwise(excs):
        outer.__cause__ = inner
    return excs[0]


class Quiet(Exception):
    """An exception without a message."""


CASES = [
    ("message", chain(ValueError("not JSON")), "ValueError: not JSON"),
    ("no-message", chain(Quiet()), "Quiet"),
    (
        "root-cause",
        chain(RuntimeError("fetch failed"), OSError("boom")),
        "RuntimeError: OSError: boom",
    ),
    ("silent-wrapper", chain(Quiet(), KeyError("kid")), "Quiet: KeyError: 'kid'"),
    ("refused", chain(RuntimeError("x"), ConnectionRefusedError(111, "no")), "connection refused"),
    ("timeout", chain(RuntimeError("x"), TimeoutError()), "timeout (TimeoutError)"),
    (
        "dns-text",
        chain(OSError("[Errno -2] Name or service not known")),
        "DNS resolution failed: [Errno -2] Name or service not known",
    ),
    (
        "userinfo-redacted",
        chain(RuntimeError("via http://user:secret@proxy:3128/?sig=abc")),
        "RuntimeError: via http://***@proxy:3128/",
    ),
]


@pytest.mark.parametrize(("exc", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_describe_fetch_error(exc: BaseException, expected: str) -> None:
    assert describe_fetch_error(exc) == expected


def test_a_cycle_in_the_chain_ends_the_walk() -> None:
    a, b = RuntimeError("outer"), ValueError("inner")
    a.__cause__, b.__context__ = b, a
    assert describe_fetch_error(a) == "RuntimeError: ValueError: inner"


def test_the_description_is_bounded() -> None:
    text = describe_fetch_error(RuntimeError("x" * 1000))
    assert len(text) == MAX_DESCRIPTION
    assert text.startswith("RuntimeError: xxx")
    assert text.endswith("...")
